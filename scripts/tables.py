r"""Results tables of a sweep: final metric per recipe and N:M over seeds, compute, equal-FLOPs pairs.

    python -m scripts.tables --root results/sweeps/vit_fmnist                # -> ROOT/tables/
    python -m scripts.tables --root A --root B --metric hard_accuracy --out results/tables/ab
    python -m scripts.tables --workdirs workdirs/vit_fmnist,workdirs/vit_fmnist2 --out /tmp/t --noflops

Reads each root's ``manifest.json`` (written by ``scripts/sweep.py``; runs in it that have no
workdir are reported as missing) and every run folder under it, or the given workdirs. Writes
``results.md`` (also printed), ``results.csv`` (one row per recipe x N:M cell) and ``runs.csv``
(one row per run with its state). Rows are recipe variants, columns N:M patterns, cells
``mean ± std (n)`` of the final metric over seeds (sample std, ddof = 1). Runs that are not
finished (missing, started, interrupted, failed) are listed by name under the table.

The metric follows the task (classification: ``eval_accuracy`` x 100; seq2seq: ``eval_bleu``;
span corruption: ``eval_accuracy`` x 100, token accuracy); ``--metric`` takes any key of
``final_metrics.json``. Inference MACs and training FLOPs come from ``nmsparse.flops`` on the
run's ``config.json`` with abstract shapes only (no data, nothing compiled; ViT and T5).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Optional

if __package__ in (None, ''):  # `python scripts/tables.py`: make the repository importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts import sweep  # pylint: disable=g-import-not-at-top

STATES = ('finished', 'interrupted', 'started', 'failed', 'missing')
STATE_HELP = {
    'missing': 'in the manifest, no workdir yet',
    'started': 'workdir without checkpoint or final metrics (not started properly, or still running)',
    'interrupted': 'checkpoints but no final metrics: resumable with the same command (or still running)',
    'failed': 'the last attempt in runs.jsonl exited non-zero or without final metrics',
}


# ----------------------------------------------------------------------------- runs

@dataclasses.dataclass
class Record:
  """One run as found on disk."""

  name: str
  workdir: str
  variant: str
  nm: Optional[str]    # None for dense.
  seed: Optional[int]
  setting: str
  section: str         # The config file (manifest runs) or "model on data".
  state: str
  detail: str
  config: Optional[dict]
  final: Optional[dict]

  @property
  def row(self) -> tuple[str, str]:
    return self.variant, self.setting

  @property
  def column(self) -> str:
    return self.nm or 'dense'


def _load_json(path: str) -> Optional[dict]:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, OSError):
    return None


def variant_of(config: dict) -> str:
  """The recipe variant a config.json ran: ``mdgf`` + ``linear`` decay -> ``mdgf-linear``."""
  recipe = (config.get('sparsity') or {}).get('recipe') or {}
  name = recipe.get('name', 'unknown')
  if name == 'mdgf':
    kind = (recipe.get('decay') or {}).get('kind', '')
    return {'exponential': 'mdgf-exp'}.get(kind, f'mdgf-{kind}' if kind else 'mdgf')
  if name == 'sdgf' and recipe.get('sdgf_inner', 'ste') == 'ste':
    kind = (recipe.get('structure') or {}).get('kind', '')
    return f'sdgf-{kind}' if kind else 'sdgf'
  return name


def describe(config: Optional[dict]) -> str:
  """``vit mu/7 on nm_fashion_mnist (classification)`` from a config.json."""
  if not config:
    return 'unknown experiment'
  model = config.get('model') or {}
  data = config.get('data') or {}
  return (f'{model.get("name", "?")} {model.get("variant", "")} on {data.get("name", "?")} '
          f'({config.get("task", "?")})').replace('  ', ' ')


def describe_runs(records: Sequence['Record'], fallback: str) -> str:
  """``describe`` of a section's runs; several model variants are all named (``t5 mini, tiny on ...``)."""
  configs = [r.config for r in records if r.config]
  if not configs:
    return fallback
  variants = list(dict.fromkeys(str((c.get('model') or {}).get('variant', '')) for c in configs))
  first = dict(configs[0], model=dict(configs[0].get('model') or {}, variant=', '.join(variants)))
  return describe(first)


def run_state(workdir: str, attempt: Optional[dict]) -> tuple[str, str]:
  """``(state, detail)`` of a run from its workdir and its latest sweep attempt."""
  state = sweep.workdir_state(workdir)
  if state == 'finished':
    return state, ''
  steps = sweep.checkpoint_steps(workdir)
  ckpt = f'latest checkpoint at step {steps[-1]}' if steps else 'no checkpoint'
  if attempt and attempt.get('status') in ('failed', 'incomplete'):
    return 'failed', f'last attempt {attempt["status"]} (exit {attempt.get("returncode")}); {ckpt}'
  if state == 'interrupted':
    return state, f'{ckpt}; rerun its command to resume'
  if state == 'started':
    return state, 'workdir without checkpoint'
  return 'missing', 'no workdir'


def _record(name: str, workdir: str, entry: Optional[dict], attempt: Optional[dict]) -> Record:
  config = _load_json(os.path.join(workdir, 'config.json'))
  final = _load_json(os.path.join(workdir, sweep.FINAL))
  state, detail = run_state(workdir, attempt)
  if entry is not None:
    return Record(name, workdir, entry['variant'], entry.get('nm'), entry.get('seed'),
                  entry.get('setting', ''), entry['config_file'], state, detail, config, final)
  sp = (config or {}).get('sparsity') or {}
  variant = variant_of(config) if config else 'unknown'
  nm = None if variant == 'dense' or not config else sp.get('nm')
  seed = (config or {}).get('seed')
  return Record(name, workdir, variant, nm, seed, '', describe(config), state, detail, config, final)


def _is_run_dir(path: str) -> bool:
  return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                     for f in ('config.json', sweep.FINAL, 'checkpoints', 'metrics.jsonl'))


def collect(roots: Sequence[str] = (), workdirs: Sequence[str] = ()) -> list[Record]:
  """Every run of the roots (manifest entries, then other run folders) and the given workdirs."""
  out = []
  for root in roots:
    if not os.path.isdir(root):
      raise ValueError(f'Sweep root {root!r} does not exist.')
    runs = sweep.load_manifest(root)['runs']
    attempts = sweep.last_attempts(root)
    for name in sorted(runs):
      out.append(_record(name, os.path.join(root, name), runs[name], attempts.get(name)))
    for name in sorted(os.listdir(root)):
      path = os.path.join(root, name)
      if name not in runs and _is_run_dir(path):
        out.append(_record(name, path, None, attempts.get(name)))
  for path in workdirs:
    if not _is_run_dir(path):
      raise ValueError(f'{path!r} is not a run workdir (no config.json, final_metrics.json, '
                       'metrics.jsonl or checkpoints/).')
    out.append(_record(os.path.basename(os.path.normpath(path)), path, None, None))
  return out


# ----------------------------------------------------------------------------- metric

@dataclasses.dataclass(frozen=True)
class Metric:
  key: str      # A key of final_metrics.json.
  scale: float
  label: str
  higher_is_better: bool


TASK_METRICS = {'classification': ('eval_accuracy', 'top-1 accuracy (%)'),
                'seq2seq': ('eval_bleu', 'BLEU'),
                'span_corruption': ('eval_accuracy', 'token accuracy (%)')}


def choose_metric(task: Optional[str], override: Optional[str] = None) -> Metric:
  """The table's metric: the task's (``TASK_METRICS``) or ``override`` (``eval/bleu`` = ``eval_bleu``)."""
  if override:
    key = override.replace('final/', '').replace('/', '_')
    label = key
  else:
    key, label = TASK_METRICS.get(task or '', ('eval_accuracy', 'accuracy (%)'))
  scale = 100.0 if key.endswith('accuracy') else 1.0
  if override and scale != 1:
    label = f'{key} x 100'
  lower = any(w in key for w in ('loss', 'perplexity'))
  return Metric(key, scale, label, not lower)


def metric_value(record: Record, metric: Metric) -> Optional[float]:
  """The run's final metric (scaled), None if it has none or it is not finite."""
  if record.final is None or metric.key not in record.final:
    return None
  try:
    v = float(record.final[metric.key]) * metric.scale
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def summarize(values: Sequence[float]) -> tuple[float, Optional[float], int]:
  """``(mean, sample std with ddof = 1 (None when n < 2), n)``."""
  n = len(values)
  if n == 0:
    raise ValueError('summarize needs at least one value.')
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return mean, std, n


def format_cell(values: Sequence[float], digits: int = 2) -> str:
  """``[80, 82, 84]`` -> ``82.00 ± 2.00 (3)``; one value: ``80.00 (1)``; none: ``—``."""
  if not values:
    return '—'
  mean, std, n = summarize(values)
  return f'{mean:.{digits}f} ± {std:.{digits}f} ({n})' if std is not None else f'{mean:.{digits}f} ({n})'


def si(x: Optional[float], unit: str = '') -> str:
  """``386688`` -> ``386.7 K``; None -> ``n/a``."""
  if x is None:
    return 'n/a'
  for factor, prefix in ((1e18, 'E'), (1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
    if abs(x) >= factor:
      return f'{x / factor:.4g} {prefix}{unit}'
  return f'{x:.4g} {unit}'.rstrip()


def nm_sort_key(nm: str) -> tuple:
  """Columns from dense to sparse: 2:4, 1:4, 1:8, ..."""
  if nm == 'dense':
    return (0.0, 0)
  n, m = sweep.parse_nm(nm)
  return (-n / m + 2.0, m)


def row_sort_key(row: tuple[str, str]) -> tuple:
  """Recipes in the paper's order; a recipe's settings with their numbers compared as numbers
  (``epochs1`` < ``epochs5_...`` < ``epochs15_...``)."""
  order = list(sweep.PAPER) + [v for v in sweep.VARIANTS if v not in sweep.PAPER]
  variant, setting = row
  natural = tuple((0, int(p), '') if p.isdigit() else (1, 0, p) for p in re.split(r'(\d+)', setting) if p)
  return (order.index(variant) if variant in order else len(order), variant, setting != '', natural)


def row_label(row: tuple[str, str], common: Optional[str] = None) -> str:
  """``MDGF-exponential [epochs5]``; the setting is left out when it is ``common`` to every row."""
  variant, setting = row
  return sweep.label(variant) + (f' [{setting}]' if setting and setting != common else '')


def common_setting(rows) -> Optional[str]:
  """The setting every row shares (figures put it in the title, once), else None."""
  settings = {row[1] for row in rows}
  return settings.pop() if len(settings) == 1 else None


# ----------------------------------------------------------------------------- FLOPs

def token_accounting(config: Any, model: Any, batch: dict) -> tuple[Any, float]:
  """``(tokens per kernel path, parameter-free MACs per example)`` for ViT and T5.

  ViT: patch tokens (+1 class token if ``pool_type='tok'``) in every block, patches for the
  patch embedding, 1 for ``pre_logits``/``head``; attention ``2 T^2 width`` per block. T5:
  input length in the encoder and the cross-attention k/v, target length elsewhere in the
  decoder; attention ``2 L^2 h d_kv`` per self-attention, ``2 L_t L_i h d_kv`` per cross-attention.
  """
  name = config.model.name
  if name == 'vit':
    h, w = batch['image'].shape[1:3]
    patches = (h // model.patch_size) * (w // model.patch_size)
    seq = patches + (model.pool_type == 'tok')

    def vit_tokens(path: str) -> int:
      if path.startswith('embedding/'):
        return patches
      if path.startswith(('head/', 'pre_logits/')):
        return 1
      return seq
    return vit_tokens, float(model.depth * 2 * seq * seq * model.width)
  if name == 't5':
    li, lt = batch['inputs'].shape[1], batch['targets'].shape[1]
    inner = model.num_heads * model.d_kv

    def t5_tokens(path: str) -> int:
      if path.startswith('encoder/'):
        return li
      if '/encoder_decoder_attention/k/' in path or '/encoder_decoder_attention/v/' in path:
        return li
      return lt
    extra = (model.num_encoder_layers * 2 * li * li * inner +
             model.num_decoder_layers * (2 * lt * lt * inner + 2 * lt * li * inner))
    return t5_tokens, float(extra)
  raise NotImplementedError(f'no per-kernel token count for model {name!r}: FLOPs are '
                            'accounted for vit and t5 only.')


def step_switch(workdir: str) -> Optional[int]:
  """STEP's first sparse step from metrics.jsonl (a row at step s logs the phase of step s - 1)."""
  for row in sweep.read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
    if row.get('sparsity/phase', 0) >= 1:
      return max(int(row['step']) - 1, 0)
  return None


def run_flops(config: dict, total_steps: int, switch_step: Optional[int] = None) -> dict[str, float]:
  """Inference MACs per example and training FLOPs of a run, from its config.json (abstract shapes).

  Returns ``inference_macs`` (final model), ``dense_inference_macs``, ``train_flops``,
  ``dense_train_flops`` (the same run fully dense) and ``ratio``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import nmsparse  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.tasks import get_task  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict(config)
  task = get_task(c.task)
  model = task.build_model(c)
  batch = task.dummy_batch(c, 1)
  params = jax.eval_shape(lambda: task.init(model, jax.random.key(0), batch))
  sp = nmsparse.make_sparsifier(c.sparsity.recipe, train_lib.sparsity_rules(c, task), params,
                                total_steps, log=False)
  tokens, extra = token_accounting(c, model, batch)
  dense = sp.recipe.name == 'dense'
  inf = nmsparse.inference_macs(params, None if dense else sp.specs, tokens_per_kernel=tokens,
                                extra_macs=extra)
  tr = nmsparse.training_flops(params, None, sp, tokens, batch_size=int(c.batch_size), extra_macs=extra,
                               switch_step=switch_step)
  return dict(inference_macs=inf['macs'], dense_inference_macs=inf['dense_macs'],
              train_flops=tr['flops'], dense_train_flops=tr['dense_flops'], ratio=tr['ratio'])


def total_steps_of(record: Record) -> Optional[int]:
  """Steps the run trained: final_metrics' step, else config total_steps."""
  if record.final and record.final.get('step') is not None:
    return int(record.final['step'])
  steps = (record.config or {}).get('total_steps')
  return int(steps) if steps else None


def flops_for(records: Iterable[Record], cache: Optional[dict] = None) -> dict[str, dict]:
  """``{run name: run_flops(...) or {'error': reason}}`` for finished runs; seeds share one computation."""
  cache = {} if cache is None else cache
  out = {}
  for r in records:
    if r.state != 'finished' or r.config is None:
      continue
    total = total_steps_of(r)
    switch = step_switch(r.workdir) if variant_of(r.config) == 'step' else None
    if total is None:
      out[r.name] = {'error': 'run length unknown (no step in final_metrics.json)'}
      continue
    if variant_of(r.config) == 'step' and switch is None:
      out[r.name] = {'error': 'STEP switch step not found in metrics.jsonl (sparsity/phase)'}
      continue
    key = json.dumps([{k: v for k, v in r.config.items() if k != 'seed'}, total, switch], sort_keys=True)
    if key not in cache:
      try:
        cache[key] = run_flops(r.config, total, switch)
      except (KeyError, AttributeError, ValueError) as e:  # A config.json this code cannot rebuild
        cache[key] = {'error': f'{type(e).__name__}: {e}'}  # (older schema): named under the table.
    out[r.name] = cache[key]
  return out


# ----------------------------------------------------------------------------- tables

@dataclasses.dataclass
class Cell:
  runs: list[Record]
  values: list[float]

  def mean(self, key: str, flops: dict[str, dict]) -> Optional[float]:
    xs = [flops[r.name][key] for r in self.runs if key in flops.get(r.name, {})]
    return sum(xs) / len(xs) if xs else None


def sections(records: Sequence[Record]) -> dict[str, list[Record]]:
  out: dict[str, list[Record]] = {}
  for r in records:
    out.setdefault(r.section, []).append(r)
  return out


def grid(records: Sequence[Record], metric: Metric) -> tuple[list, list, dict]:
  """``(rows, columns, {(row, column): Cell})``; dense cells fill every N:M column."""
  columns = sorted({r.column for r in records if r.nm}, key=nm_sort_key) or ['dense']
  rows = sorted({r.row for r in records}, key=row_sort_key)
  cells = {}
  for r in records:
    cols = columns if r.nm is None else [r.column]
    for col in cols:
      cell = cells.setdefault((r.row, col), Cell([], []))
      v = metric_value(r, metric) if r.state == 'finished' else None
      if v is not None:
        cell.runs.append(r)
        cell.values.append(v)
  return rows, columns, cells


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


FLOPS_NOTE = (
    'Inference: multiply-accumulates (MACs) of one forward pass per example (per sequence for '
    'T5, at the full input and target lengths), `nmsparse.flops.inference_macs`: every kernel at '
    'its final density N/M (dense kernels, the patch embedding and the head at 1) plus the '
    'parameter-free attention matmuls (dense); embeddings, biases and norms not counted. '
    'Training: `nmsparse.flops.training_flops` over the whole run (1 MAC = 2 FLOPs; forward, '
    'input-gradient and weight-gradient matmuls at the densities of each phase and recipe, '
    'convention in nmsparse/flops.py), as the ratio x to the same run fully dense (same steps '
    'and batch). STEP: switch step read from metrics.jsonl (first logged sparse step), accurate '
    'to the logging interval.')


def render_section(title: str, records: Sequence[Record], metric: Metric, flops: Optional[dict],
                   tolerance: float, digits: int) -> tuple[str, list[dict]]:
  """Markdown of one experiment and its CSV rows."""
  rows, columns, cells = grid(records, metric)
  out = [f'## {title}', '', f'Final {metric.label} (`{metric.key}`'
         + (f' x {metric.scale:g}' if metric.scale != 1 else '') + ' in final_metrics.json, '
         + ('higher' if metric.higher_is_better else 'lower') + ' is better).', '']
  body = [[row_label(row)] + [format_cell(cells.get((row, c), Cell([], [])).values, digits) for c in columns]
          for row in rows]
  out.append(md_table(['recipe'] + columns, body))
  out += ['', 'Cells: mean ± sample standard deviation over seeds (ddof = 1: divided by n - 1), '
          '(n) = finished runs with the metric; no ± when n = 1; — = no finished run.']
  if any(r.nm is None for r in records):
    out.append('Dense runs have no N:M: the same runs fill every column.')
  for (row, col), cell in sorted(cells.items(), key=str):
    if row[0] == 'dense' and col != columns[0]:
      continue  # The same runs as the first column.
    steps = sorted({total_steps_of(r) for r in cell.runs} - {None})
    if len(steps) > 1:
      out.append(f'Warning: {row_label(row)} at {col} mixes runs of different lengths ({steps} steps).')
    seeds = [r.seed for r in cell.runs]
    if len(set(seeds)) < len(seeds):
      out.append(f'Warning: {row_label(row)} at {col} counts runs with the same seed as separate '
                 f'samples ({", ".join(r.name for r in cell.runs)}).')
  not_done = [r for r in records if r.state != 'finished' or metric_value(r, metric) is None]
  if not_done:
    out += ['', f'Not in the table ({len(not_done)} run(s)):', '']
    for r in sorted(not_done, key=lambda r: r.name):
      why = (f'{r.state}: {r.detail}' if r.state != 'finished'
             else f'finished, but final_metrics.json has no finite {metric.key!r}')
      out.append(f'- `{r.name}` ({row_label(r.row)}, {r.nm or "no N:M"}, seed {r.seed}): {why}')
    states = sorted({r.state for r in not_done if r.state in STATE_HELP})
    out += [''] + [f'{s}: {STATE_HELP[s]}.' for s in states]
  csv_rows = []
  for row in rows:
    for col in columns:
      cell = cells.get((row, col), Cell([], []))
      mean, std, n = summarize(cell.values) if cell.values else (None, None, 0)
      f = flops or {}
      csv_rows.append(dict(
          section=title, recipe=row[0], label=sweep.label(row[0]), setting=row[1], nm=col,
          metric=metric.key, scale=metric.scale, n=n, mean=mean, std=std,
          values=';'.join(f'{v:.6g}' for v in cell.values), runs=';'.join(r.name for r in cell.runs),
          total_steps=_mean_steps(cell),
          inference_macs=cell.mean('inference_macs', f),
          dense_inference_macs=cell.mean('dense_inference_macs', f),
          train_flops=cell.mean('train_flops', f), train_flops_ratio=cell.mean('ratio', f)))
  if flops is not None:
    out += ['', '### Compute', '']
    body = []
    for row in rows:
      line = [row_label(row)]
      for col in columns:
        cell = cells.get((row, col), Cell([], []))
        macs, ratio = cell.mean('inference_macs', flops), cell.mean('ratio', flops)
        line.append('—' if macs is None else f'{si(macs)} MACs · x{ratio:.3f}')
      body.append(line)
    out.append(md_table(['recipe'] + columns, body))
    out += ['', 'Cells: inference MACs per example of the final model · training FLOPs as a ratio '
            'x to the same run fully dense. ' + FLOPS_NOTE]
    errors = sorted({(r.name, flops[r.name]['error']) for r in records
                     if 'error' in flops.get(r.name, {})})
    for name, err in errors:
      out.append(f'- no FLOPs for `{name}`: {err}')
    out += ['', '### Equal training FLOPs', '']
    out += render_iso(rows, columns, cells, flops, metric, tolerance, digits)
  return '\n'.join(out), csv_rows


def _mean_steps(cell: Cell) -> Optional[float]:
  steps = [total_steps_of(r) for r in cell.runs if total_steps_of(r) is not None]
  return sum(steps) / len(steps) if steps else None


def render_iso(rows, columns, cells, flops, metric: Metric, tolerance: float, digits: int) -> list[str]:
  """Each sparse recipe next to the dense run (any length in the sweep) with equal training FLOPs."""
  dense = []  # (row, mean metric, mean train FLOPs, steps)
  for row in rows:
    if row[0] == 'dense':
      cell = cells.get((row, columns[0]), Cell([], []))
      f = cell.mean('train_flops', flops)
      if cell.values and f:
        dense.append((row, summarize(cell.values)[0], f, _mean_steps(cell)))
  body, pairs = [], 0
  for col in columns:
    for row in rows:
      cell = cells.get((row, col), Cell([], []))
      f, ratio = cell.mean('train_flops', flops), cell.mean('ratio', flops)
      if row[0] == 'dense' or not cell.values or f is None:
        continue
      steps = _mean_steps(cell)
      match = min(dense, key=lambda d: abs(d[2] / f - 1)) if dense else None
      line = [col, row_label(row), format_cell(cell.values, digits), si(f, 'FLOP'), f'x{ratio:.3f}',
              str(round(steps * ratio)) if steps else 'n/a']
      if match and abs(match[2] / f - 1) <= tolerance:
        pairs += 1
        delta = summarize(cell.values)[0] - match[1]
        line += [f'{row_label(match[0])} ({si(match[2], "FLOP")})', f'{match[1]:.{digits}f}',
                 f'{delta:+.{digits}f}']
      else:
        closest = (f'none (closest {row_label(match[0])}: x{match[2] / f:.2f} the FLOPs)' if match
                   else 'none (no finished dense run with FLOPs)')
        line += [closest, '—', '—']
      body.append(line)
  if not body:
    return ['No finished sparse run with training FLOPs: nothing to compare.']
  out = [md_table(['N:M', 'recipe', metric.label, 'train FLOPs', 'x dense, same length',
                   'dense steps at equal FLOPs', f'dense run at equal FLOPs (±{tolerance:.0%})',
                   'dense metric', 'recipe - dense'], body), '']
  out.append('Training FLOPs are absolute (whole run, mean over seeds). A dense run pairs with a '
             f'sparse recipe when their training FLOPs differ by at most {tolerance:.0%}; '
             '"dense steps at equal FLOPs" = steps x ratio, the length of the dense run (same '
             'batch) that would match (e.g. `--set config.total_steps=S` in scripts/sweep.py).')
  if not pairs:
    out.append('**No equal-training-FLOPs pairs exist in this sweep**: every sparse recipe is '
               'compared above only with dense runs of other training FLOPs.')
  return out


def render(records: Sequence[Record], *, metric: Optional[str] = None, with_flops: bool = True,
           tolerance: float = 0.05, digits: int = 2) -> tuple[str, list[dict], list[dict]]:
  """``(markdown, results CSV rows, runs CSV rows)`` of all runs, one section per experiment."""
  parts, results, runs = ['# Results', ''], [], []
  cache: dict = {}
  for section, recs in sections(records).items():
    task = next((r.config.get('task') for r in recs if r.config), None)
    m = choose_metric(task, metric)
    desc = describe_runs(recs, section)
    title = desc if desc == section else f'{desc} — {section}'
    flops = flops_for(recs, cache) if with_flops else None
    text, rows = render_section(title, recs, m, flops, tolerance, digits)
    parts += [text, '']
    results += rows
    for r in sorted(recs, key=lambda r: r.name):
      runs.append(dict(section=title, name=r.name, recipe=r.variant, setting=r.setting, nm=r.column,
                       seed=r.seed, state=r.state, detail=r.detail, metric=m.key,
                       value=metric_value(r, m), workdir=r.workdir))
  return '\n'.join(parts), results, runs


def to_csv(rows: Sequence[dict]) -> str:
  """CSV text with a header; None as an empty field."""
  if not rows:
    return ''
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator='\n')
  writer.writeheader()
  writer.writerows({k: '' if v is None else v for k, v in row.items()} for row in rows)
  return buf.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog='python -m scripts.tables', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', action='append', default=[], help='Sweep root (repeatable).')
  p.add_argument('--workdirs', default='', help='Comma-separated run workdirs (without a sweep root).')
  p.add_argument('--metric', help='final_metrics.json key, e.g. hard_accuracy, eval_perplexity.')
  p.add_argument('--out', help='Output folder (default: FIRST_ROOT/tables).')
  p.add_argument('--noflops', action='store_true', help='Skip the inference/training FLOPs tables.')
  p.add_argument('--tolerance', type=float, default=0.05,
                 help='Relative training-FLOPs difference for an equal-FLOPs pair (default 0.05).')
  p.add_argument('--digits', type=int, default=2, help='Decimals in the cells (default 2).')
  args = p.parse_args(argv)
  workdirs = sweep.split_list(args.workdirs)
  if not args.root and not workdirs:
    p.error('give --root SWEEP_ROOT (repeatable) and/or --workdirs DIR1,DIR2.')
  out_dir = args.out or (os.path.join(args.root[0], 'tables') if args.root else None)
  if out_dir is None:
    p.error('--workdirs without --root needs --out DIR.')
  try:
    records = collect(args.root, workdirs)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not records:
    print('error: no runs found (no manifest.json entries and no run folders).', file=sys.stderr)
    return 2
  text, results, runs = render(records, metric=args.metric, with_flops=not args.noflops,
                               tolerance=args.tolerance, digits=args.digits)
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in ('results.md', 'results.csv', 'runs.csv')}
  for name, content in (('results.md', text + '\n'), ('results.csv', to_csv(results)),
                        ('runs.csv', to_csv(runs))):
    with open(paths[name], 'w') as f:
      f.write(content)
  print(text)
  print('\n'.join(f'wrote {p}' for p in paths.values()))
  return 0


if __name__ == '__main__':
  sys.exit(main())
