r"""Paired comparisons of two recipes over seeds, with a 95 % confidence interval.

    python -m scripts.compare --root results/sweeps/vit_fmnist --a mdgf-exp --b srste --nm 1:16,1:32
    python -m scripts.compare --root R --a mdgf-exp --b srste --setting epochs5 --json out.json

A pair is the same seed (same initialisation and data order) of recipe A and recipe B in the
same setting and N:M. For each cell it prints the per-seed differences A - B of the final
metric (percentage points for accuracies), their mean, the sample standard deviation, the
95 % confidence interval of the mean difference from Student's t with n - 1 degrees of
freedom (paired t), and how many seeds are positive. An interval that contains 0 is
reported as "not shown": the data do not establish the sign of the difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Optional

if __package__ in (None, ''):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import tables  # pylint: disable=g-import-not-at-top


def t_quantile(p: float, df: int) -> float:
  """Student's t quantile (scipy's), e.g. t_quantile(0.975, 4) = 2.776."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(p, df))


def paired(diffs: Sequence[float], confidence: float = 0.95) -> dict:
  """Mean, sample std, paired-t interval and signs of per-seed differences."""
  n = len(diffs)
  if n == 0:
    raise ValueError('no paired seeds.')
  mean = sum(diffs) / n
  out = dict(n=n, diffs=list(diffs), mean=mean, positive=sum(d > 0 for d in diffs))
  if n < 2:
    return out | dict(std=None, low=None, high=None, shown=False)
  std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
  low, high = mean - half, mean + half
  return out | dict(std=std, low=low, high=high, shown=low > 0 or high < 0)


def cells(records: Sequence[tables.Record], metric: tables.Metric, a: str, b: str,
          setting: Optional[str], nms: Optional[Sequence[str]]) -> list[dict]:
  """One comparison per (setting, N:M) where both recipes have finished seeds in common."""
  values: dict[tuple, dict[int, float]] = {}
  for r in records:
    if r.state != 'finished' or r.variant not in (a, b) or (setting and r.setting != setting):
      continue
    v = tables.metric_value(r, metric)
    if v is not None and r.seed is not None:
      values.setdefault((r.variant, r.setting, r.nm), {})[r.seed] = v
  out = []
  for (variant, s, nm), va in sorted(values.items(), key=lambda kv: (kv[0][1], tables.nm_sort_key(kv[0][2] or ''))):
    if variant != a or (nms and nm not in nms):
      continue
    vb = values.get((b, s, nm)) or values.get((b, s, None))  # B may be dense (no N:M).
    if not vb:
      continue
    seeds = sorted(set(va) & set(vb))
    if seeds:
      out.append(dict(a=a, b=b, setting=s, nm=nm, seeds=seeds,
                      **paired([va[k] - vb[k] for k in seeds])))
  return out


def describe(c: dict, unit: str = 'points') -> str:
  diffs = ', '.join(f'{d:+.2f}' for d in c['diffs'])
  if c['std'] is None:
    return f'{c["a"]} - {c["b"]} at {c["nm"]} [{c["setting"]}]: {c["mean"]:+.2f} {unit} (1 seed: {diffs})'
  verdict = 'shown' if c['shown'] else 'not shown'
  return (f'{c["a"]} - {c["b"]} at {c["nm"]} [{c["setting"]}]: {c["mean"]:+.2f} ± {c["std"]:.2f} {unit}, '
          f'95 % CI [{c["low"]:+.2f}, {c["high"]:+.2f}] (paired t, n = {c["n"]}), {c["positive"]} of '
          f'{c["n"]} seeds positive: {verdict} (seeds: {diffs})')


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--root', action='append', required=True, help='Sweep folder (repeatable).')
  ap.add_argument('--a', required=True, help='Recipe variant A, e.g. mdgf-exp.')
  ap.add_argument('--b', required=True, help='Recipe variant B, e.g. srste (or dense).')
  ap.add_argument('--nm', default=None, help='Comma-separated N:M patterns (default: all).')
  ap.add_argument('--setting', default=None, help='Only this setting, e.g. epochs5.')
  ap.add_argument('--metric', default=None, help='A key of final_metrics.json (default: the task\'s).')
  ap.add_argument('--json', default=None, help='Also write the comparisons here.')
  args = ap.parse_args(argv)
  records = tables.collect(args.root)
  task = next((r.config or {}).get('task') for r in records if r.config)
  metric = tables.choose_metric(task, args.metric)
  found = cells(records, metric, args.a, args.b, args.setting, args.nm.split(',') if args.nm else None)
  if not found:
    print(f'no finished seeds of both {args.a} and {args.b} in {args.root}', file=sys.stderr)
    return 1
  for c in found:
    print(describe(c))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(found, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
