r"""Paired comparisons of two recipes over seeds, with a 95 % confidence interval.

    python -m scripts.compare --root results/sweeps/vit_fmnist --a mdgf-exp --b srste --nm 1:16,1:32
    python -m scripts.compare --root R --a mdgf-exp --b srste --setting epochs5 --json out.json
    python -m scripts.compare --root R --a mdgf-exp,sdgf-stepwise --b srste --nm 1:16,1:32 \
        --setting epochs1,epochs5_diagnostics_points60 --figure gap_vs_length.png

A pair is the same seed (same initialisation and data order) of recipe A and recipe B in the
same setting and N:M. For each cell it prints the per-seed differences A - B of the final
metric (percentage points for accuracies), their mean, the sample standard deviation, the
95 % confidence interval of the mean difference from Student's t with n - 1 degrees of
freedom (paired t), and how many seeds are positive. An interval that contains 0 is
reported as "not shown": the data do not establish the sign of the difference.

``--figure`` plots each cell's mean difference and interval against the runs' length
(``--x``, a config key: ``total_epochs`` by default), one line per recipe A and N:M.
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


def _nm_key(nm: Optional[str]) -> tuple:
  return tables.nm_sort_key(nm or 'dense')


def cells(records: Sequence[tables.Record], metric: tables.Metric, a: str, b: str,
          setting: Optional[str], nms: Optional[Sequence[str]], setting_b: Optional[str] = None) -> list[dict]:
  """One comparison per (setting, N:M) where both recipes have finished seeds in common.

  ``setting_b``: pair A's runs in each setting with B's runs in this one (e.g. a STEP variant
  against SR-STE's default runs); by default B's setting is A's.
  """
  values: dict[tuple, dict[int, float]] = {}
  for r in records:
    if r.state != 'finished' or r.variant not in (a, b):
      continue
    v = tables.metric_value(r, metric)
    if v is not None and r.seed is not None:
      values.setdefault((r.variant, r.setting, r.nm), {})[r.seed] = v
  out = []
  for (variant, s, nm), va in sorted(values.items(), key=lambda kv: (kv[0][1], _nm_key(kv[0][2]))):
    if variant != a or (nms and nm not in nms) or (setting and s != setting):
      continue
    sb = setting_b or s
    vb = values.get((b, sb, nm)) or values.get((b, sb, None))  # B may be dense (no N:M).
    if not vb:
      continue
    seeds = sorted(set(va) & set(vb))
    if seeds:
      out.append(dict(a=a, b=b, setting=s if sb == s else f'{s} vs {sb}', setting_a=s, nm=nm, seeds=seeds,
                      **paired([va[k] - vb[k] for k in seeds])))
  return out


def setting_pairs(settings: Optional[Sequence[str]], settings_b: Optional[Sequence[str]]
                  ) -> list[tuple[Optional[str], Optional[str]]]:
  """(A's setting, B's setting or None for A's own) pairs: ``settings_b`` has one setting per
  ``settings`` or a single one for all; a ValueError names a count that matches neither."""
  if not settings_b:
    return [(a, None) for a in (settings or [None])]
  if len(settings_b) == 1:
    return [(a, settings_b[0]) for a in (settings or [None])]
  if not settings or len(settings_b) != len(settings):
    raise ValueError(f'--setting_b {",".join(settings_b)}: give one B setting per --setting '
                     f'({len(settings or [])}), or a single one for all.')
  return list(zip(settings, settings_b))


def by_length(records: Sequence[tables.Record], metric: tables.Metric, a: Sequence[str], b: str,
              settings: Optional[Sequence[str]], nms: Optional[Sequence[str]],
              key: str = 'total_epochs', settings_b: Optional[Sequence[str]] = None) -> list[dict]:
  """:func:`cells` of every recipe in ``a`` against ``b``, each with ``x``: its runs' ``config[key]``,
  in the order of ``a``, then by length (``epochs15`` after ``epochs5``), then by N:M.

  ``settings_b``: B's setting for each of ``settings`` in turn (A's runs of ``settings[i]``
  against B's of ``settings_b[i]``); x is A's length. Raises ValueError when one setting's runs
  disagree on ``key``, when a setting has no ``key``, or when two settings give the same recipe,
  N:M and length (choose one with ``settings``).
  """
  lengths: dict[str, set] = {}
  for r in records:
    if r.config is not None and (not settings or r.setting in settings):
      lengths.setdefault(r.setting, set()).add(r.config.get(key))
  out, seen = [], {}
  for variant in a:
    for c in (c for s_a, s_b in setting_pairs(settings, settings_b)
              for c in cells(records, metric, variant, b, s_a, nms, s_b)):
      xs = lengths.get(c['setting_a'], set())
      if len(xs) != 1 or None in xs:
        raise ValueError(f'setting {c["setting_a"]!r}: its runs give {key} = {sorted(map(str, xs))}; '
                         f'a length figure needs one value per setting (choose --x or --setting).')
      c = c | {'x': float(next(iter(xs)))}
      k = (c['a'], c['nm'], c['x'])
      if k in seen:
        raise ValueError(f'{c["a"]} at {c["nm"]}: settings {seen[k]!r} and {c["setting"]!r} both have '
                         f'{key} = {c["x"]:g}; keep one with --setting.')
      seen[k] = c['setting']
      out.append(c)
  return sorted(out, key=lambda c: (list(a).index(c['a']), c['x'], _nm_key(c['nm'])))  # By length, not name.


def pair_label(c: dict) -> str:
  """A comparison's legend label: "A - B", or "A at R's FLOPs - B" for runs of ``--match_flops R``."""
  from scripts import sweep  # pylint: disable=g-import-not-at-top
  a = sweep.label(c['a'])
  if 'flops_of_' in c['setting']:
    a += f' at {sweep.label(c["setting"].split("flops_of_")[1].split(" ")[0])}\'s FLOPs'
  return f'{a} - {sweep.label(c["b"])}'


def gap_figure(found: Sequence[dict], path: str, xlabel: str, unit: str = 'points') -> str:
  """Mean paired difference (markers) and its 95 % interval (bars) against length, log x; one panel
  per N:M, one colour per recipe.

  Lines of the same length are offset sideways by a few percent so that no bar hides another.
  """
  from scripts import figures  # pylint: disable=g-import-not-at-top
  from scripts import sweep  # pylint: disable=g-import-not-at-top
  plt = figures._pyplot()  # pylint: disable=protected-access
  order = list(dict.fromkeys(c['a'] for c in found))
  nms = sorted({c['nm'] for c in found}, key=_nm_key)
  fig, axes = plt.subplots(1, len(nms), figsize=(1.0 + 5.2 * len(nms), 4.4), sharey=True, squeeze=False)
  ticks = sorted({c['x'] for c in found})
  for ax, nm in zip(axes[0], nms):
    here = [a for a in order if any(c['a'] == a and c['nm'] == nm for c in found)]
    for i, a in enumerate(here):
      cs = sorted((c for c in found if (c['a'], c['nm']) == (a, nm)), key=lambda c: c['x'])
      shift = 1 + 0.06 * (i - (len(here) - 1) / 2)  # Room for each point's k/n label before the next.
      x = [c['x'] * shift for c in cs]
      err = [[c['mean'] - c['low'] if c['low'] is not None else 0 for c in cs],
             [c['high'] - c['mean'] if c['high'] is not None else 0 for c in cs]]
      ax.errorbar(x, [c['mean'] for c in cs], yerr=err, color=figures.color(a), marker='o', capsize=3,
                  label=pair_label(cs[0]))
      for xi, c in zip(x, cs):  # k/n above the interval's cap (above the point if there is no interval).
        top = c['high'] if c['high'] is not None else c['mean']
        ax.annotate(f'{c["positive"]}/{c["n"]}', (xi, top), textcoords='offset points', xytext=(0, 3),
                    ha='center', fontsize=7, color=figures.color(a))
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xscale('log')
    ax.set_xticks(ticks, [f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.set_xlim(min(ticks) / 1.35, max(ticks) * 1.35)
    ax.set_xlabel(xlabel)
    ax.set_title(nm or 'dense', fontsize=10)
    ax.legend(fontsize=7)
  axes[0][0].set_ylabel(f'paired difference ({unit})')
  fig.suptitle('Mean over seeds, 95 % CI (paired t); k/n: seeds positive', fontsize=9)
  return figures.save(fig, path)


def stat_cells(c: dict) -> list[str]:
  """A paired comparison's table cells: difference ± std, 95 % interval, seeds positive, verdict."""
  std = '' if c['std'] is None else f' ± {c["std"]:.2f}'
  ci = '-' if c['std'] is None else f'[{c["low"]:+.2f}, {c["high"]:+.2f}]'
  return [f'{c["mean"]:+.2f}{std}', ci, f'{c["positive"]} of {c["n"]}', '**shown**' if c['shown'] else 'not shown']


def markdown(found: Sequence[dict], unit: str = 'points') -> str:
  """The comparisons as one Markdown table."""
  rows = [[f'{c["a"]} - {c["b"]}', c['nm'] or 'dense', c['setting'], *stat_cells(c)] for c in found]
  return tables.md_table(['pair', 'N:M', 'setting', f'difference ({unit})', '95 % CI (paired t)',
                          'seeds positive', 'verdict'], rows)


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
  ap.add_argument('--a', required=True, help='Recipe variant A, e.g. mdgf-exp (comma-separated: several).')
  ap.add_argument('--b', required=True, help='Recipe variant B, e.g. srste (or dense).')
  ap.add_argument('--nm', default=None, help='Comma-separated N:M patterns (default: all).')
  ap.add_argument('--setting', default=None, help='Only these settings, comma-separated, e.g. epochs5.')
  ap.add_argument('--setting_b', default=None,
                  help='Pair A with B\'s runs of this setting (default: the same setting as A); '
                  'comma-separated: one per --setting, in order.')
  ap.add_argument('--figure', default=None, help='Also plot the differences against run length here (PNG).')
  ap.add_argument('--x', default='total_epochs', help='--figure: the config key that measures length.')
  ap.add_argument('--metric', default=None, help='A key of final_metrics.json (default: the task\'s).')
  ap.add_argument('--json', default=None, help='Also write the comparisons here.')
  ap.add_argument('--markdown', action='store_true', help='Print one Markdown table instead of a line per cell.')
  args = ap.parse_args(argv)
  records = tables.collect(args.root)
  task = next((r.config or {}).get('task') for r in records if r.config)
  metric = tables.choose_metric(task, args.metric)
  settings = args.setting.split(',') if args.setting else None
  nms = args.nm.split(',') if args.nm else None
  settings_b = args.setting_b.split(',') if args.setting_b else None
  try:
    pairs = setting_pairs(settings, settings_b)
  except ValueError as e:
    ap.error(str(e))
  if args.figure:
    found = by_length(records, metric, args.a.split(','), args.b, settings, nms, args.x, settings_b)
  else:
    found = [c for a in args.a.split(',') for s, sb in pairs
             for c in cells(records, metric, a, args.b, s, nms, sb)]
  if not found:
    print(f'no finished seeds of both {args.a} and {args.b} in {args.root}', file=sys.stderr)
    return 1
  if args.markdown:
    print(markdown(found))
  else:
    for c in found:
      print(describe(c))
  if args.figure:
    print('wrote', gap_figure(found, args.figure, xlabel=args.x.replace('_', ' ')))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(found, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
