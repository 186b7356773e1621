r"""Where STEP's AutoSwitch fired, and why: one row per STEP run, and a figure of its statistic.

    python -m scripts.step_autoswitch --root results/sweeps/vit_fmnist [--figure autoswitch.png]

For each finished STEP run under the roots it reads the run's config (T_min, T_max, threshold,
window, statistic) and its ``metrics.jsonl`` (``sparsity/autoswitch_zbar``, ``switch_step``,
``sparsity/autoswitch_z``, logged by the recipe) and prints: the switch step and its fraction of
the run, what fired it (the threshold test after T_min, or the T_max bound), the window mean Zbar
at the last row before the switch against the threshold, and the final metric. Runs from before
the statistic was logged give the switch step from ``sparsity/phase`` only (to the logging
interval) and no Zbar. ``--figure`` plots Zbar (log scale) against the fraction of the run, with
each run's threshold and switch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import Optional

if __package__ in (None, ''):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nmsparse import recipes  # pylint: disable=g-import-not-at-top
from scripts import sweep, tables  # pylint: disable=g-import-not-at-top


def _finite(x) -> Optional[float]:
  return float(x) if x is not None and math.isfinite(float(x)) else None


def analyse(record: tables.Record, metric: tables.Metric) -> dict:
  """The AutoSwitch facts of one STEP run (see the module docstring)."""
  rows = list(sweep.read_jsonl(os.path.join(record.workdir, 'metrics.jsonl')))
  total = tables.total_steps_of(record)
  if not total:
    raise ValueError(f'{record.name}: no step count in final_metrics.json or config (unfinished run?).')
  s = record.config['sparsity']['recipe']['step']
  t_min, t_max = recipes.step_bounds(s, total)
  logged = [r for r in rows if 'switch_step' in r or 'sparsity/switch_step' in r]
  switch, exact, zbar_before = None, False, None
  for r in logged:
    k = r.get('sparsity/switch_step', r.get('switch_step'))
    if k is not None and k >= 0:
      switch, exact = int(k), True
      break
    zbar_before = _finite(r.get('sparsity/autoswitch_zbar')) or zbar_before
  if switch is None:  # Older runs: the first row in the sparse phase bounds it.
    switch = tables.step_switch(record.workdir)
  if switch is None:
    fired = 'never'
  elif t_max is not None and switch > t_max:
    fired = 'T_max bound'
  else:
    fired = 'threshold (after T_min)'
  curve = [(int(r['step']), _finite(r.get('sparsity/autoswitch_zbar'))) for r in logged
           if switch is None or int(r['step']) <= switch]  # The window stops at the switch.
  return dict(name=record.name, variant=record.variant, nm=record.nm, seed=record.seed, setting=record.setting,
              total=total, t_min=t_min, t_max=t_max, threshold=float(s['threshold']),
              scale_free=bool(s['scale_free']), window=s['window'], statistic=s['statistic'], switch=switch,
              exact=exact, fired=fired, zbar_before=zbar_before, metric=tables.metric_value(record, metric),
              curve=[(k, z) for k, z in curve if z is not None])


def table(found: Sequence[dict], metric: tables.Metric) -> str:
  header = ['run', 'steps', 'T_min', 'T_max', 'threshold', 'switch step', 'of run', 'fired by',
            'Zbar before switch', metric.label]
  rows = []
  for f in found:
    sw = '-' if f['switch'] is None else (str(f['switch']) if f['exact'] else f'<= {f["switch"]}')
    frac = '-' if f['switch'] is None else f'{f["switch"] / f["total"]:.1%}'
    thr = f'{f["threshold"]:g}' + (' (of mean v)' if f['scale_free'] else '')
    rows.append([f['name'], str(f['total']), str(f['t_min']), str(f['t_max']), thr, sw, frac, f['fired'],
                 '-' if f['zbar_before'] is None else f'{f["zbar_before"]:.2e}',
                 '-' if f['metric'] is None else f'{f["metric"]:.2f}'])
  return tables.md_table(header, rows)


def figure(found: Sequence[dict], path: str) -> str:
  from scripts import figures  # pylint: disable=g-import-not-at-top
  plt = figures._pyplot()  # pylint: disable=protected-access
  fig, ax = plt.subplots(figsize=(7, 4.2))
  cmap = plt.get_cmap('tab10')
  settings = sorted({f['setting'] for f in found})
  seeds = sorted({f['seed'] for f in found})
  for f in (x for x in found if x['curve']):
    c = cmap(settings.index(f['setting']) % 10)  # A colour per setting, a line style per seed.
    steps, z = zip(*f['curve'])
    label = f'{f["nm"]}, {f["total"]} steps, T_min {f["t_min"]}, seed {f["seed"]}'
    ax.plot([k / f['total'] for k in steps], z, color=c, label=label,
            ls=['-', '--', ':', '-.'][seeds.index(f['seed']) % 4])
    ax.axhline(f['threshold'], color=c, lw=0.7, ls=':')
    if f['switch'] is not None:
      ax.axvline(f['switch'] / f['total'], color=c, lw=0.7, alpha=0.5)
  ax.set_yscale('log')
  ax.set_xlabel('fraction of the run')
  ax.set_ylabel('AutoSwitch window mean Zbar (mean |dv|)')
  ax.set_title('Zbar until the switch (thin vertical line); threshold (dotted). Runs that train alike\n'
               'until an earlier switch lie under the longer curve.', fontsize=9)
  ax.legend(fontsize=7)
  return figures.save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--root', action='append', required=True, help='Sweep folder (repeatable).')
  ap.add_argument('--setting', default=None, help='Only these settings, comma-separated.')
  ap.add_argument('--figure', default=None, help='Also plot Zbar against the run here (PNG).')
  args = ap.parse_args(argv)
  settings = args.setting.split(',') if args.setting else None
  records = [r for r in tables.collect(args.root)
             if r.state == 'finished' and r.config and r.config['sparsity']['recipe']['name'] == 'step'
             and (not settings or r.setting in settings)]
  if not records:
    print(f'no finished STEP runs in {args.root}', file=sys.stderr)
    return 1
  metric = tables.choose_metric(records[0].config.get('task'))
  found = [analyse(r, metric) for r in sorted(records, key=lambda r: r.name)]
  print(table(found, metric))
  if args.figure:
    print('wrote', figure(found, args.figure))
  return 0


if __name__ == '__main__':
  sys.exit(main())
