r"""A fair comparison: each recipe's setting chosen on the validation split, reported on the test split.

Every recipe gets the same small tuning budget (its own settings, the same seeds); runs are trained
with a held-out validation split (``val=10``: ``train[:90%]`` / ``train[90%:]``) and evaluate their
final model once on the test split (``test_*`` in ``final_metrics.json``). For each recipe and N:M
the setting with the best mean validation metric is chosen, and only the chosen settings' test
metrics are compared, paired by seed, against the baseline recipe's chosen setting. The default
setting (the shortest setting name of the recipe, i.e. no extra override) is compared too, to show
whether tuning changes the ordering.

    python -m scripts.tune --root results/sweeps/vit_fmnist_tune --recipes srste,mdgf-exp,sdgf-stepwise \
        --baseline srste --markdown --figure results/sweeps/vit_fmnist_tune/figures/tuning.png
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from scripts import compare
from scripts import sweep
from scripts import tables

SELECT, REPORT = 'eval_accuracy', 'test_accuracy'


def grid(records: Sequence[tables.Record], recipes: Sequence[str], nms: Optional[Sequence[str]],
         select: str = SELECT, report: str = REPORT) -> dict[tuple[str, str], dict[str, dict[int, tuple]]]:
  """``{(recipe, nm): {setting: {seed: (validation, test)}}}`` of the finished runs, in percent.

  Raises ValueError when a finished run has no ``report`` metric: it was trained without a held-out
  test split, and its ``eval_*`` figures are test figures that must not be used for selection.
  """
  sel, rep = tables.choose_metric(None, select), tables.choose_metric(None, report)
  out: dict = {}
  for r in records:
    if r.state != 'finished' or r.variant not in recipes or (nms and r.nm not in nms) or r.seed is None:
      continue
    v, t = tables.metric_value(r, sel), tables.metric_value(r, rep)
    if t is None:
      raise ValueError(f'run {r.name} has no {report!r}: it was not trained with a held-out test split '
                       '(config argument val=10), so its eval figures are test figures; keep such runs '
                       'out of the tuning root.')
    if v is not None:
      out.setdefault((r.variant, r.nm), {}).setdefault(r.setting, {})[r.seed] = (v, t)
  return out


def unfinished(records: Sequence[tables.Record], recipes: Sequence[str],
               nms: Optional[Sequence[str]]) -> list[str]:
  """Names (and states) of the runs of ``recipes`` that have not finished: left out of every mean."""
  return [f'{r.name} ({r.state})' for r in records
          if r.state != 'finished' and r.variant in recipes and not (nms and r.nm not in nms)]


def choose(settings: dict[str, dict[int, tuple]]) -> dict:
  """The setting with the best mean validation metric over the seeds that every setting has.

  Returns ``dict(chosen=, default=, seeds=, rows=[(setting, n, val mean, val std, test mean, test std)])``;
  ``default`` is the shortest setting name (the one without a tuning override); ``unused``: the seeds
  that some setting lacks, left out of every mean (a finished grid has none).
  """
  seeds = sorted(set.intersection(*(set(s) for s in settings.values())))
  if not seeds:
    raise ValueError(f'settings {sorted(settings)} have no seed in common: run the same seeds for each.')
  every = sorted(set.union(*(set(s) for s in settings.values())))
  rows = []
  for name, by_seed in sorted(settings.items(), key=lambda kv: (len(kv[0]), kv[0])):
    vm, vs, n = tables.summarize([by_seed[k][0] for k in seeds])
    tm, ts, _ = tables.summarize([by_seed[k][1] for k in seeds])
    rows.append((name, n, vm, vs, tm, ts))
  best = max(rows, key=lambda row: row[2])
  return dict(chosen=best[0], default=rows[0][0], seeds=seeds, rows=rows,
              unused=sorted(set(every) - set(seeds)))  # Seeds some setting lacks: left out of the choice.


def label(setting: str, default: str) -> str:
  """The tuning override of ``setting`` (what it adds to the recipe's default setting)."""
  if setting == default:
    return 'default'
  return setting[len(default):].lstrip('_') if setting.startswith(default) else setting


def compare_chosen(g: dict, choices: dict, baseline: str, which: str) -> list[dict]:
  """Paired test differences of each recipe's ``which`` ('chosen' or 'default') setting against the
  baseline's, per N:M, over the seeds both have."""
  out = []
  for (recipe, nm), c in sorted(choices.items(), key=lambda kv: (tables.nm_sort_key(kv[0][1]), kv[0][0])):
    base = choices.get((baseline, nm))
    if recipe == baseline or base is None:
      continue
    a, b = g[(recipe, nm)][c[which]], g[(baseline, nm)][base[which]]
    seeds = sorted(set(a) & set(b))
    if seeds:
      out.append(dict(a=recipe, b=baseline, nm=nm, setting=f'{which}: {label(c[which], c["default"])} vs '
                      f'{label(base[which], base["default"])}', seeds=seeds,
                      **compare.paired([a[k][1] - b[k][1] for k in seeds])))
  return out


def sensitivity(g: dict, choices: dict) -> list[dict]:
  """Each setting against its recipe's default, paired by seed, on the validation metric: how much a
  recipe's own setting moves it, with the seed-to-seed spread that all settings share taken out."""
  out = []
  for (recipe, nm), c in sorted(choices.items(), key=lambda kv: (tables.nm_sort_key(kv[0][1]),
                                                                 tables.row_sort_key((kv[0][0], '')))):
    base = g[(recipe, nm)][c['default']]
    for name, *_ in c['rows']:
      if name != c['default']:
        runs = g[(recipe, nm)][name]
        out.append(dict(a=recipe, b=recipe, nm=nm, setting=f'{label(name, c["default"])} - default',
                        seeds=c['seeds'], **compare.paired([runs[k][0] - base[k][0] for k in c['seeds']])))
  return out


def sensitivity_markdown(found: Sequence[dict]) -> str:
  rows = [[sweep.label(c['a']), c['nm'], c['setting'], *compare.stat_cells(c)] for c in found]
  return tables.md_table(['recipe', 'N:M', 'setting', 'difference (points)', '95 % CI (paired t)',
                          'seeds positive', 'verdict'], rows)


def markdown(g: dict, choices: dict, baseline: str) -> str:
  lines = ['Each setting: validation and test top-1 (%), mean ± std over the seeds every setting of the '
           'recipe has; **chosen** = best mean validation.', '',
           '| recipe | N:M | setting | seeds | validation | test | |', '|---|---|---|---|---|---|---|']
  for (recipe, nm), c in sorted(choices.items(), key=lambda kv: (tables.nm_sort_key(kv[0][1]),
                                                                 tables.row_sort_key((kv[0][0], '')))):
    for name, n, vm, vs, tm, ts in c['rows']:
      mark = '**chosen**' if name == c['chosen'] else ''
      lines.append(f'| {sweep.label(recipe)} | {nm} | {label(name, c["default"])} | {n} | '
                   f'{_cell(vm, vs)} | {_cell(tm, ts)} | {mark} |')
  incomplete = [f'{sweep.label(r)} {nm} (seeds {c["unused"]})' for (r, nm), c in sorted(choices.items()) if c['unused']]
  if incomplete:
    lines += ['', 'Left out because not every setting has them yet: ' + '; '.join(incomplete) + '.']
  lines += ['', 'Sensitivity: validation top-1 of each setting minus its recipe\'s default, paired by seed '
            '(95 % CI, paired t).', '', sensitivity_markdown(sensitivity(g, choices))]
  for which in ('chosen', 'default'):
    found = compare_chosen(g, choices, baseline, which)
    if found:
      lines += ['', f'Test top-1, {which} settings: paired difference to {sweep.label(baseline)} '
                '(95 % CI, paired t over seeds).', '', compare.markdown(found)]
  return '\n'.join(lines)


def _cell(mean: float, std: Optional[float]) -> str:
  return f'{mean:.2f} ± {std:.2f}' if std is not None else f'{mean:.2f}'


def figure(choices: dict, path: str) -> str:
  """Per N:M, each recipe's settings: validation (filled) and test (open) mean ± std; the chosen one
  boxed."""
  from scripts import figures  # pylint: disable=g-import-not-at-top
  plt = figures._pyplot()  # pylint: disable=protected-access
  nms = sorted({nm for _, nm in choices}, key=tables.nm_sort_key)
  fig, axes = plt.subplots(1, len(nms), figsize=(5.5 * len(nms), 4.2), squeeze=False)
  for ax, nm in zip(axes[0], nms):
    x, ticks = 0, []
    for recipe in sorted({r for r, n in choices if n == nm}, key=lambda r: tables.row_sort_key((r, ''))):
      c = choices[(recipe, nm)]
      for name, _, vm, vs, tm, ts in c['rows']:
        col = figures.color(recipe)
        ax.errorbar(x - 0.12, vm, yerr=vs or 0, fmt='o', color=col, capsize=2)
        ax.errorbar(x + 0.12, tm, yerr=ts or 0, fmt='o', mfc='white', color=col, capsize=2)
        if name == c['chosen']:
          ax.axvspan(x - 0.4, x + 0.4, color=col, alpha=0.12, lw=0)
        ticks.append((x, f'{sweep.label(recipe)}\n{label(name, c["default"])}'))
        x += 1
      x += 0.5
    ax.set_xticks([t for t, _ in ticks], [s for _, s in ticks], rotation=60, ha='right', fontsize=7)
    ax.set_title(f'{nm}: mean ± std over seeds; validation (filled), test (open); shaded = chosen',
                 fontsize=9)
    ax.set_ylabel('top-1 accuracy (%)')
  return figures.save(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--root', action='append', required=True, help='Tuning sweep folder (repeatable).')
  ap.add_argument('--recipes', required=True, help='Comma-separated recipe variants, e.g. srste,mdgf-exp.')
  ap.add_argument('--baseline', required=True, help='The recipe the others are compared with, e.g. srste.')
  ap.add_argument('--nm', default=None, help='Comma-separated N:M patterns (default: all).')
  ap.add_argument('--select', default=SELECT, help='Validation metric that chooses (final_metrics.json key).')
  ap.add_argument('--report', default=REPORT, help='Test metric that is reported.')
  ap.add_argument('--figure', default=None, help='Also plot every setting, validation and test (PNG).')
  ap.add_argument('--markdown', action='store_true', help='Print Markdown tables.')
  args = ap.parse_args(argv)
  recipes = args.recipes.split(',')
  if args.baseline not in recipes:
    ap.error(f'--baseline {args.baseline} is not one of --recipes {args.recipes}.')
  nms = args.nm.split(',') if args.nm else None
  try:
    records = tables.collect(args.root)
    g = grid(records, recipes, nms, args.select, args.report)
    choices = {k: choose(v) for k, v in g.items()}
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not choices:
    print(f'no finished runs of {args.recipes} in {args.root}', file=sys.stderr)
    return 1
  if args.markdown:
    print(markdown(g, choices, args.baseline))
  else:
    for (recipe, nm), c in sorted(choices.items()):
      print(f'{recipe} {nm}: chosen {label(c["chosen"], c["default"])} over {len(c["rows"])} settings, '
            f'seeds {c["seeds"]}')
    for which in ('chosen', 'default'):
      for c in compare_chosen(g, choices, args.baseline, which):
        print(compare.describe(c))
  left = unfinished(records, recipes, nms)
  if left:
    print(f'\nNot finished, left out of every figure above ({len(left)}): ' + ', '.join(left) + '.')
  if args.figure:
    print('wrote', figure(choices, args.figure))
  return 0


if __name__ == '__main__':
  sys.exit(main())
