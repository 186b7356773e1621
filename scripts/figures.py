r"""Figures of a sweep (PNG, matplotlib Agg): metric vs sparsity, schedules, training dynamics.

    python -m scripts.figures --root results/sweeps/vit_fmnist              # -> ROOT/figures/
    python -m scripts.figures --root A --metric hard_accuracy --out results/figures/a
    python -m scripts.figures --workdirs workdirs/vit_fmnist --out /tmp/figs

Per experiment (config file) of the runs (``scripts/tables.py`` finds them the same way):

* ``<exp>_metric_vs_sparsity.png``: final metric per recipe over the N:M patterns (x: N:M
  ordered by sparsity 1 - N/M), mean with sample-std error bars over seeds; dense as a band.
* ``<exp>_schedules_nm<N>x<M>.png``: MDGF decay a(t) and the density of the sparsified kernels
  over the run for every recipe, from ``nmsparse``'s schedules at the run's recipe config and
  length (STEP, whose switch is data dependent: the logged ``sparsity/*`` columns).
* ``<exp>_dynamics_nm<N>x<M>.png``: from metrics.jsonl, averaged over seeds: mask flip rate,
  kept vs pruned gradient norm and RMS, and the gradient noise ratio when logged.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np

if __package__ in (None, ''):  # `python scripts/figures.py`: make the repository importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import sweep  # pylint: disable=g-import-not-at-top
from scripts import tables  # pylint: disable=g-import-not-at-top

DYNAMICS = (  # (panel title, y label, [(metrics key, line style)], log scale)
    ('mask flip rate', 'fraction of mask entries flipped per step',
     [('sparsity/mask_flip_rate', '-')], False),
    ('gradient norm', 'L2 norm', [('grad/kept_grad_norm', '-'), ('grad/pruned_grad_norm', '--')], True),
    ('gradient RMS', 'RMS per weight', [('grad/kept_grad_rms', '-'), ('grad/pruned_grad_rms', '--')], True),
    ('gradient noise ratio', 'noise / signal',
     [('grad/kept_grad_noise_ratio', '-'), ('grad/pruned_grad_noise_ratio', '--')], True),
)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save(fig, path: str, dpi: int = 120, rect: Optional[tuple] = None) -> str:
  """Lays out ``fig``, writes it to ``path`` (making its folder) and closes it; returns ``path``."""
  fig.tight_layout(**({'rect': rect} if rect else {}))
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=dpi)
  _pyplot().close(fig)
  return path


def color(variant: str) -> str:
  """A fixed colour per recipe variant, the same in every figure."""
  order = list(sweep.PAPER) + [v for v in sweep.VARIANTS if v not in sweep.PAPER]
  palette = ['#000000', '#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2',
             '#17becf', '#bcbd22', '#7f7f7f', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5']
  i = order.index(variant) if variant in order else len(order) + sum(map(ord, variant))
  return palette[i % len(palette)]


def slug(text: str) -> str:
  base = os.path.splitext(os.path.basename(text))[0] if text.endswith('.py') else text
  return re.sub(r'[^A-Za-z0-9]+', '_', base).strip('_') or 'experiment'


def nm_slug(nm: str) -> str:
  return 'nm{}x{}'.format(*sweep.parse_nm(nm))


# ----------------------------------------------------------------------------- data

def series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, values)`` of the metrics rows that have ``key`` (finite values only)."""
  pts = sorted((int(r['step']), float(r[key])) for r in rows
               if key in r and 'step' in r and r[key] is not None and np.isfinite(float(r[key])))
  if not pts:
    return np.zeros(0, int), np.zeros(0)
  steps, values = zip(*pts)
  return np.asarray(steps), np.asarray(values)


def seed_mean(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean over seeds at every logged step: ``(steps, mean, count)``; a step missing in a seed is skipped."""
  sums: dict[int, float] = {}
  counts: dict[int, int] = {}
  for steps, values in curves:
    for s, v in zip(np.asarray(steps).tolist(), np.asarray(values).tolist()):
      sums[s] = sums.get(s, 0.0) + v
      counts[s] = counts.get(s, 0) + 1
  steps = np.asarray(sorted(sums), int)
  count = np.asarray([counts[s] for s in steps], int)
  return steps, np.asarray([sums[s] for s in steps]) / np.maximum(count, 1), count


def metrics_rows(record: tables.Record) -> list[dict]:
  return sweep.read_jsonl(os.path.join(record.workdir, 'metrics.jsonl'))


def schedule_curves(recipe_config: dict, total_steps: int, nm: str,
                    points: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, a(t), density)`` of a recipe over a run, from nmsparse's schedules.

  The density is that of kernels at target ``nm`` (every sparsified kernel under one preset).
  STEP's schedule depends on the data (AutoSwitch): use the logged columns instead.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import nmsparse  # pylint: disable=g-import-not-at-top
  n, m = sweep.parse_nm(nm)
  recipe = nmsparse.Recipe.from_config(recipe_config, total_steps)
  if recipe.name == 'step':
    raise ValueError('recipe "step" switches at a data-dependent step: read its logged schedule.')
  sp = nmsparse.Sparsifier(recipe, {'w': nmsparse.NMSpec(n, m, (-2,))}, {'w': 1})
  steps = np.unique(np.linspace(0, total_steps - 1, min(points, total_steps)).round().astype(int))
  info = jax.vmap(sp.info)(steps)
  decay = np.broadcast_to(np.asarray(info['decay'], float), steps.shape)
  density = np.broadcast_to(np.asarray(info['density'], float), steps.shape)
  return steps, decay, density


# ----------------------------------------------------------------------------- figures

def _setting(common: Optional[str]) -> str:
  """The setting all curves share, once in the title instead of in every legend label."""
  return f'\nsetting: {common}' if common else ''


def fig_metric_vs_sparsity(title: str, records: Sequence[tables.Record], metric: tables.Metric,
                           path: str) -> Optional[str]:
  """Final metric per recipe over N:M (categorical, by sparsity) with sample-std error bars."""
  rows, columns, cells = tables.grid(records, metric)
  columns = [c for c in columns if c != 'dense']
  if not columns or not any(c.values for c in cells.values()):
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  x = np.arange(len(columns))
  sparse_rows = [row for row in rows if row[0] != 'dense']
  common = tables.common_setting(rows)
  for row in rows:
    pts = [(i, tables.summarize(cells[(row, c)].values)) for i, c in enumerate(columns)
           if cells.get((row, c)) and cells[(row, c)].values]
    if not pts:
      continue
    label = tables.row_label(row, common)
    if row[0] == 'dense':
      mean, std, n = pts[0][1]
      ax.axhline(mean, color=color(row[0]), lw=1.2, ls=':', label=f'{label} (n={n})')
      if std:
        ax.axhspan(mean - std, mean + std, color=color(row[0]), alpha=0.1)
      continue
    shift = 0.04 * (sparse_rows.index(row) - (len(sparse_rows) - 1) / 2)  # Error bars side by side.
    xs = [i + shift for i, _ in pts]
    means = [s[0] for _, s in pts]
    stds = [s[1] or 0.0 for _, s in pts]
    ax.errorbar(xs, means, yerr=stds, marker='o', capsize=3, color=color(row[0]), label=label)
  ax.set_xticks(x, [f'{c}\n{1 - np.divide(*sweep.parse_nm(c)):.1%}' for c in columns])
  ax.set_xlabel('N:M pattern (sparsity 1 - N/M of the sparsified kernels)')
  ax.set_ylabel(f'final {metric.label}')
  ax.set_title(f'{title}{_setting(common)}\nfinal {metric.label} vs N:M (mean ± sample std over seeds)',
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='best')
  return save(fig, path)


def _length(record: tables.Record) -> Optional[int]:
  steps = tables.total_steps_of(record)
  return steps if steps else None


def fig_schedules(title: str, records: Sequence[tables.Record], nm: str, path: str) -> Optional[str]:
  """a(t) and density over the run (x: fraction of training) for each recipe at ``nm``."""
  by_row: dict = {}
  for r in records:
    if r.nm == nm and r.config and r.row not in by_row and _length(r):
      by_row[r.row] = r
  if not by_row:
    return None
  plt = _pyplot()
  fig, (ax_a, ax_d) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  notes = []
  common = tables.common_setting(by_row)
  for row in sorted(by_row, key=tables.row_sort_key):
    r = by_row[row]
    total = _length(r)
    recipe_cfg = r.config['sparsity']['recipe']
    label = tables.row_label(row, common)
    if recipe_cfg.get('name') == 'step':
      logged = metrics_rows(r)
      s_a, a = series(logged, 'sparsity/decay')
      s_d, d = series(logged, 'sparsity/density')
      if not s_d.size:
        notes.append(f'{label}: data-dependent switch, no logged schedule')
        continue
      # A row logged at step s holds the schedule of step s - 1.
      ax_a.step((s_a - 1) / total, a, where='post', color=color(row[0]), label=f'{label} (logged)')
      ax_d.step((s_d - 1) / total, d, where='post', color=color(row[0]), label=f'{label} (logged)')
      continue
    steps, a, d = schedule_curves(recipe_cfg, total, nm)
    ax_a.plot(steps / total, a, color=color(row[0]), label=label)
    ax_d.plot(steps / total, d, color=color(row[0]), label=label)
  ax_a.set_ylabel('decay a(t)')
  ax_a.set_title(f'{title}{_setting(common)}\nN:M {nm}: MDGF decay a(t) and kernel density over training', fontsize=10)
  ax_d.set_ylabel('density of sparsified kernels')
  ax_d.set_xlabel('fraction of training (step / total steps)')
  ax_d.set_yscale('log', base=2)
  for ax in (ax_a, ax_d):
    ax.grid(alpha=0.3)
  ax_a.legend(fontsize=8, loc='best')
  if notes:
    ax_d.text(0.01, 0.02, '; '.join(notes), transform=ax_d.transAxes, fontsize=7)
  return save(fig, path)


def fig_dynamics(title: str, records: Sequence[tables.Record], nm: str, path: str) -> Optional[str]:
  """Mask flip rate and kept/pruned gradient statistics over training, mean over seeds per recipe."""
  by_row: dict = {}
  for r in records:
    if r.nm == nm:
      rows = metrics_rows(r)
      if rows:
        by_row.setdefault(r.row, []).append(rows)
  if not by_row:
    return None
  plt = _pyplot()
  fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), sharex=True)
  legend: dict[str, object] = {}  # One figure legend: a recipe per colour.
  common = tables.common_setting(by_row)
  for ax, (panel, ylabel, keys, log) in zip(axes.flat, DYNAMICS):
    drawn = False
    for row in sorted(by_row, key=tables.row_sort_key):
      for key, style in keys:
        curves = [series(rows, key) for rows in by_row[row]]
        curves = [c for c in curves if c[0].size]
        if not curves:
          continue
        steps, mean, _ = seed_mean(curves)
        if log:
          keep = mean > 0
          steps, mean = steps[keep], mean[keep]
          if not steps.size:
            continue
        line, = ax.plot(steps, mean, ls=style, color=color(row[0]), lw=1.2)
        legend.setdefault(f'{tables.row_label(row, common)} (n={len(curves)})', line)
        drawn = True
    ax.set_title(panel, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
      if log:
        ax.set_yscale('log')
    else:
      ax.text(0.5, 0.5, f'not logged ({", ".join(k for k, _ in keys)})', ha='center', va='center',
              transform=ax.transAxes, fontsize=8)
  for ax in axes[-1]:
    ax.set_xlabel('training step')
  fig.suptitle(f'{title}{_setting(common)}\nN:M {nm}: mask flips and kept (solid) vs pruned (dashed) gradients, '
               'mean over seeds', fontsize=10)
  if legend:
    fig.legend(list(legend.values()), list(legend), loc='center right', fontsize=8, frameon=False)
  return save(fig, path, dpi=110, rect=(0, 0, 0.8 if legend else 1, 1))


def make_figures(records: Sequence[tables.Record], out_dir: str, metric: Optional[str] = None) -> list[str]:
  """Every figure of every experiment in ``records``; returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for section, recs in tables.sections(records).items():
    task = next((r.config.get('task') for r in recs if r.config), None)
    m = tables.choose_metric(task, metric)
    title = tables.describe_runs(recs, section)
    base = os.path.join(out_dir, slug(section))
    paths.append(fig_metric_vs_sparsity(title, recs, m, f'{base}_metric_vs_sparsity.png'))
    for nm in sorted({r.nm for r in recs if r.nm}, key=tables.nm_sort_key):
      paths.append(fig_schedules(title, recs, nm, f'{base}_schedules_{nm_slug(nm)}.png'))
      paths.append(fig_dynamics(title, recs, nm, f'{base}_dynamics_{nm_slug(nm)}.png'))
  return [p for p in paths if p]


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m scripts.figures', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', action='append', default=[], help='Sweep root (repeatable).')
  p.add_argument('--workdirs', default='', help='Comma-separated run workdirs (without a sweep root).')
  p.add_argument('--metric', help='final_metrics.json key for the metric figure, e.g. hard_accuracy.')
  p.add_argument('--out', help='Output folder (default: FIRST_ROOT/figures).')
  p.add_argument('--setting', default=None,
                 help='Only runs of these settings (comma-separated, e.g. epochs5_diagnostics_points60).')
  args = p.parse_args(argv)
  workdirs = sweep.split_list(args.workdirs)
  if not args.root and not workdirs:
    p.error('give --root SWEEP_ROOT (repeatable) and/or --workdirs DIR1,DIR2.')
  out_dir = args.out or (os.path.join(args.root[0], 'figures') if args.root else None)
  if out_dir is None:
    p.error('--workdirs without --root needs --out DIR.')
  try:
    records = tables.collect(args.root, workdirs)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.setting:
    keep = set(sweep.split_list(args.setting))
    records = [r for r in records if r.setting in keep]
  paths = make_figures(records, out_dir, args.metric)
  if not paths:
    print('error: nothing to plot (no finished runs, no metrics.jsonl, no recipe configs).', file=sys.stderr)
    return 1
  print('\n'.join(paths))
  return 0


if __name__ == '__main__':
  sys.exit(main())
