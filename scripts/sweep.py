r"""Launches a grid of runs (recipe variant x N:M x seed) of one config, each in its own workdir.

    python -m scripts.sweep --config configs/vit_fashion_mnist.py --recipes dense,srste,mdgf-linear \
        --nm 2:4,1:8 --seeds 0,1,2 --extra epochs=3 --root results/sweeps/vit_fmnist --mode run
    python -m scripts.sweep ... --mode print                # one shell command per pending run
    python -m scripts.sweep ... --mode write --out jobs.sh  # the same commands into a file
    python -m scripts.sweep ... --dry_run                   # the plan only: nothing written or run
    python -m scripts.sweep ... --recipes srste --match_flops mdgf-exp   # SR-STE at MDGF's training FLOPs
    python -m scripts.sweep --config configs/t5_bible.py ... --init_from results/sweeps/t5_text  # fine-tune each

Workdirs are ``ROOT/<variant>_nm<N>x<M>_s<seed>[_<setting>]``; dense runs have no N:M
(``dense_s<seed>``, one per seed whatever ``--nm``); ``<setting>`` names the ``--extra`` and
``--set`` values when given, so runs of another length can share a root. ``ROOT/manifest.json``
records every run's command, config file, argument string and overrides (merged with earlier
sweeps into the same root); ``--mode run`` appends one line per attempt (wall time, exit status)
to ``ROOT/runs.jsonl`` and the run's output to ``ROOT/logs/<name>.log``. Commands run from the
repository root.

A run is finished when its workdir holds ``final_metrics.json``: it is skipped. Any other run is
started with its one command, which resumes it from its newest checkpoint if it has one. A
failed run is reported and the sweep goes on; the exit status is 1 if any run did not finish.
Ctrl-C (or SIGTERM to the sweep) sends SIGTERM to the current run, which saves a checkpoint,
and stops the sweep.

Recipe variants (``--recipes``; ``paper`` is the paper's grid): every nmsparse recipe by its
name with the config's defaults, plus ``mdgf-linear``, ``mdgf-exp``, ``mdgf-cosine``,
``mdgf-stepwise`` (the MDGF decay) and ``sdgf-stepwise``, ``sdgf-geometric``, ``sdgf-densify``
(the SDGF structure schedule).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, TextIO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = 'manifest.json'
ATTEMPTS = 'runs.jsonl'
FINAL = 'final_metrics.json'
RUN_LOCK = '.sweep.lock'  # In each workdir, locked while a sweep runs it.
MANIFEST_LOCK = '.manifest.lock'  # In the root, locked while a sweep updates the manifest.

# Variant name -> config arguments it sets. Plain recipe names keep the config's defaults.
RECIPES = ('dense', 'oneshot', 'hard', 'ste', 'srste', 'mdgf', 'sdgf', 'mdgf_sdgf', 'step')
VARIANTS: dict[str, dict[str, str]] = {r: {'recipe': r} for r in RECIPES}
VARIANTS.update({
    'mdgf-linear': {'recipe': 'mdgf', 'decay': 'linear'},
    'mdgf-exp': {'recipe': 'mdgf', 'decay': 'exponential'},
    'mdgf-cosine': {'recipe': 'mdgf', 'decay': 'cosine'},
    'mdgf-stepwise': {'recipe': 'mdgf', 'decay': 'stepwise'},
    'sdgf-stepwise': {'recipe': 'sdgf', 'structure': 'stepwise'},
    'sdgf-geometric': {'recipe': 'sdgf', 'structure': 'geometric'},
    'sdgf-densify': {'recipe': 'sdgf', 'structure': 'densify'},
})
PAPER = ('dense', 'srste', 'ste', 'mdgf-linear', 'mdgf-exp', 'sdgf-stepwise', 'sdgf-geometric',
         'mdgf_sdgf', 'step')
LABELS = {'dense': 'Dense', 'oneshot': 'One-shot', 'hard': 'Hard mask', 'ste': 'STE', 'srste': 'SR-STE',
          'mdgf': 'MDGF', 'sdgf': 'SDGF', 'mdgf_sdgf': 'MDGF+SDGF', 'step': 'STEP',
          'mdgf-linear': 'MDGF-linear', 'mdgf-exp': 'MDGF-exponential', 'mdgf-cosine': 'MDGF-cosine',
          'mdgf-stepwise': 'MDGF-stepwise', 'sdgf-stepwise': 'SDGF-stepwise',
          'sdgf-geometric': 'SDGF-geometric', 'sdgf-densify': 'SDGF-densify'}
# Config arguments that the grid itself sets.
GRID_KEYS = ('recipe', 'nm', 'seed')

Runner = Callable[..., int]


def label(variant: str) -> str:
  """Display name of a recipe variant (``mdgf-exp`` -> ``MDGF-exponential``)."""
  return LABELS.get(variant, variant)


# ----------------------------------------------------------------------------- the grid

@dataclasses.dataclass(frozen=True)
class Run:
  """One run of the grid: where it lives and the command that (re)starts it."""

  name: str
  variant: str
  nm: Optional[str]  # None for dense.
  seed: int
  setting: str       # '' or the slug of --extra and --set.
  config_file: str   # Relative to the repository root when inside it.
  arg: str
  overrides: tuple[str, ...]  # 'key=value' without the 'config.' prefix.
  workdir: str       # As the command sees it (relative to the repository root when inside it).

  def argv(self, python: str = 'python') -> list[str]:
    return [python, '-m', 'experiments.main', f'--config={self.config_file}:{self.arg}',
            f'--workdir={self.workdir}'] + [f'--config.{o}' for o in self.overrides]

  def command(self, python: str = 'python') -> str:
    return shlex.join(self.argv(python))

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['overrides'] = list(self.overrides)
    d['command'] = self.command()
    return d


def split_list(text: str) -> list[str]:
  """``'a, b,,c'`` -> ``['a', 'b', 'c']``."""
  return [t.strip() for t in (text or '').split(',') if t.strip()]


def expand_variants(text: str) -> list[str]:
  """Comma-separated variant names (``paper`` expands to the paper's grid), in order, deduplicated."""
  out = []
  for name in split_list(text):
    names = PAPER if name == 'paper' else (name,)
    for n in names:
      if n not in VARIANTS:
        raise ValueError(f'Unknown recipe variant {n!r}; choose from {sorted(VARIANTS)} or "paper".')
      if n not in out:
        out.append(n)
  if not out:
    raise ValueError('--recipes is empty: give e.g. --recipes dense,srste,mdgf-linear or paper.')
  return out


def parse_nm(text: str) -> tuple[int, int]:
  """``'2:4'`` -> ``(2, 4)``; an error names the bad pattern."""
  m = re.fullmatch(r'\s*(\d+)\s*:\s*(\d+)\s*', text)
  if not m or not 0 < int(m.group(1)) <= int(m.group(2)):
    raise ValueError(f'N:M pattern {text!r} is not of the form N:M with 0 < N <= M (e.g. 2:4).')
  return int(m.group(1)), int(m.group(2))


def parse_pairs(items: Sequence[str], what: str) -> list[tuple[str, str]]:
  """``['epochs=3', 'config.x.y=1']`` -> ``[('epochs', '3'), ('x.y', '1')]``."""
  out = []
  for item in items:
    key, sep, value = item.partition('=')
    key = key.strip()
    if key.startswith('config.'):
      key = key[len('config.'):]
    if not key:
      raise ValueError(f'{what} item {item!r} has no key; write key=value.')
    if not sep and what == '--set':
      raise ValueError(f'--set {item!r} needs a value: write --set config.{key}=VALUE.')
    out.append((key, value.strip()) if sep else (key, None))
  return out


def _slug(key: str, value: Optional[str]) -> str:
  return re.sub(r'[^A-Za-z0-9._]+', '-', key.split('.')[-1] + ('' if value is None else value)).strip('-')


def setting_slug(extra: Sequence[tuple[str, Optional[str]]], overrides: Sequence[tuple[str, str]]) -> str:
  """Workdir-name suffix for the non-grid settings: ``epochs=3`` -> ``epochs3``; long ones hashed."""
  parts = [_slug(k, v) for k, v in list(extra) + list(overrides)]
  slug = '_'.join(p for p in parts if p)
  if len(slug) > 48:
    full = json.dumps([list(extra), list(overrides)])
    slug = 'set' + hashlib.sha1(full.encode()).hexdigest()[:10]
  return slug


def workdir_name(variant: str, nm: Optional[str], seed: int, setting: str = '') -> str:
  """``srste``, ``2:4``, 0 -> ``srste_nm2x4_s0``; dense (nm None) -> ``dense_s0``; ``_<setting>`` appended."""
  name = variant if nm is None else '{}_nm{}x{}'.format(variant, *parse_nm(nm))
  name += f'_s{seed}'
  return f'{name}_{setting}' if setting else name


def _repo_relative(path: str) -> str:
  """``path`` relative to the repository root if it lies inside it, else absolute."""
  full = os.path.abspath(path)
  rel = os.path.relpath(full, REPO)
  return full if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def make_runs(config_file: str, variants: Sequence[str], nms: Sequence[str], seeds: Sequence[int],
              root: str, extra: str = '', overrides: Sequence[str] = ()) -> list[Run]:
  """The grid's runs in launch order (seed, then N:M, then variant: early results cover every cell)."""
  extra_pairs = parse_pairs(split_list(extra), '--extra')
  set_pairs = parse_pairs(overrides, '--set')
  for key, _ in extra_pairs:
    if key in GRID_KEYS:
      raise ValueError(f'--extra sets {key!r}, which the grid sets: use --recipes / --nm / --seeds.')
  for nm in nms:
    parse_nm(nm)
  if not nms:
    raise ValueError('--nm is empty: give e.g. --nm 2:4,1:8.')
  if not seeds:
    raise ValueError('--seeds is empty: give e.g. --seeds 0,1,2.')
  setting = setting_slug(extra_pairs, set_pairs)
  cfg = _repo_relative(config_file)
  wd_root = _repo_relative(root)
  runs, seen = [], set()
  for seed in seeds:
    for nm in nms:
      for variant in variants:
        fixed = dict(VARIANTS[variant])
        for key, value in extra_pairs:
          if key in fixed and fixed[key] != value:
            raise ValueError(f'--extra {key}={value} contradicts recipe variant {variant!r} '
                             f'({key}={fixed[key]}); drop it or pick another variant.')
        run_nm = None if fixed['recipe'] == 'dense' else nm
        name = workdir_name(variant, run_nm, seed, setting)
        if name in seen:
          continue
        seen.add(name)
        items = [f'{k}={v}' for k, v in fixed.items()]
        items += ([f'nm={run_nm}'] if run_nm else []) + [f'seed={seed}']
        items += [k if v is None else f'{k}={v}' for k, v in extra_pairs if k not in fixed]
        runs.append(Run(name=name, variant=variant, nm=run_nm, seed=int(seed), setting=setting,
                        config_file=cfg, arg=','.join(items),
                        overrides=tuple(f'{k}={v}' for k, v in set_pairs),
                        workdir=os.path.join(wd_root, name)))
  return runs


def _load_config_module(config_file: str, cache: dict):
  path = config_file if os.path.isabs(config_file) else os.path.join(REPO, config_file)
  if path not in cache:
    if not os.path.isfile(path):
      raise ValueError(f'Config file {config_file!r} not found (looked at {path}).')
    spec = importlib.util.spec_from_file_location(f'_sweep_config_{len(cache)}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cache[path] = module
  return cache[path]


def validate(runs: Sequence[Run]) -> None:
  """Builds every run's config (config file + argument string + ``--set`` values) and checks that the
  overrides exist and that its sparsity recipe is valid, as ``experiments.main`` will: a bad value
  stops the sweep before its first run, not each run after its start."""
  import nmsparse  # pylint: disable=g-import-not-at-top
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  cache = {}
  for run in runs:
    try:
      config = _load_config_module(run.config_file, cache).get_config(run.arg)
    except (ValueError, TypeError, KeyError) as e:
      raise ValueError(f'{run.name}: {run.config_file}:{run.arg} is not a valid config: {e}') from None
    for item in run.overrides:
      node, keys = config, item.partition('=')[0].split('.')
      for k in keys:
        if not hasattr(node, 'keys') or k not in node:
          raise ValueError(f'{run.name}: --set config.{item}: {run.config_file} has no key '
                           f'{".".join(keys)!r}.')
        node = node[k]
    config = build_config(run, cache)
    if 'sparsity' in config:
      try:
        nmsparse.recipes.check_config(config.sparsity.recipe)
      except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f'{run.name}: config.sparsity.recipe: {e}') from None


def build_config(run: Run, cache: Optional[dict] = None):
  """The run's config as ``experiments.main`` builds it: config file, argument, ``--set`` values."""
  import ast  # pylint: disable=g-import-not-at-top
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  config = _load_config_module(run.config_file, {} if cache is None else cache).get_config(run.arg)
  for item in run.overrides:
    key, _, text = item.partition('=')
    *parents, leaf = key.split('.')
    node = config
    for k in parents:
      node = node[k]
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # A bare word: a string, as the flag parser reads it.
    node[leaf] = value
  return config


def match_flops(runs: Sequence[Run], reference: str, extra: str = '', overrides: Sequence[str] = ()
                ) -> list[Run]:
  """Each run lengthened (or shortened) to the training FLOPs of ``reference`` in the same cell.

  For a run of S steps, the reference variant's run of the same config, N:M and seed has S steps
  and F training FLOPs (``scripts.tables.run_flops``, the recipe's phases included); the run
  gets the step count whose own training FLOPs come closest to F, as ``--config.total_steps``,
  and the setting suffix ``flops_of_<reference>``. The count is derived here, where both runs'
  FLOPs are known, not written into a config by hand.
  """
  from experiments import compile_plan  # pylint: disable=g-import-not-at-top
  from experiments import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from scripts import tables  # pylint: disable=g-import-not-at-top
  if reference not in VARIANTS:
    raise ValueError(f'--match_flops {reference!r} is not a recipe variant; choose one of {sorted(VARIANTS)}.')
  if VARIANTS[reference]['recipe'] == 'step':
    raise ValueError('--match_flops step: STEP\'s FLOPs depend on where AutoSwitch fires; match another recipe.')
  cache, out = {}, []
  for run in runs:
    if run.nm is None:
      raise ValueError(f'--match_flops: {run.name} is dense, which has no N:M to match {reference}\'s run of; '
                       'leave dense out of --recipes (scripts.tables pairs dense runs by FLOPs).')
    ref = make_runs(run.config_file, [reference], [run.nm], [run.seed], os.path.dirname(run.workdir),
                    extra, overrides)[0]
    ref_config = build_config(ref, cache)
    spe = compile_plan.steps_per_epoch(ref_config)
    steps = optimizer_lib.duration_steps(ref_config, 'total', spe, ref_config.batch_size)
    target = tables.run_flops(ref_config.to_dict(), steps)['train_flops']
    config = build_config(run, cache)
    flops = lambda s: tables.run_flops(config.to_dict(), s)['train_flops']  # noqa: E731
    guess = max(1, round(steps * target / flops(steps)))
    best = min(range(max(1, guess - 2), guess + 3), key=lambda s: abs(flops(s) - target))
    out.append(derived_run(run, f'flops_of_{reference}', f'total_steps={best}'))
  return out


def derived_run(run: Run, suffix: str, override: str) -> Run:
  """``run`` with one more ``--config`` override, its setting (and so its name and workdir) suffixed."""
  setting = '_'.join(p for p in (run.setting, suffix) if p)
  name = workdir_name(run.variant, run.nm, run.seed, setting)
  return dataclasses.replace(run, name=name, setting=setting, overrides=run.overrides + (override,),
                             workdir=os.path.join(os.path.dirname(run.workdir), name))


def init_from_runs(runs: Sequence[Run], source_root: str, source_setting: Optional[str] = None) -> list[Run]:
  """Each run fine-tuned from its own pretrained run: the same variant, N:M and seed in ``source_root``.

  The run gets ``init_from.path`` = that run's workdir (its final checkpoint's params; see
  experiments/init_from.py) and the setting suffix ``from_<source root's folder name>``, so dense
  fine-tunes dense, SR-STE fine-tunes the SR-STE model with SR-STE, and runs stay paired by seed.
  The source run must be finished: a partly trained one would hand over weights of another length.
  ``source_setting`` picks among several settings of the source root (an error lists them).
  """
  manifest = load_manifest(source_root)['runs']
  if not manifest:
    raise ValueError(f'--init_from {source_root}: no sweep manifest there; give the root of the pretraining sweep.')
  tag = 'from_' + re.sub(r'[^A-Za-z0-9]+', '-', os.path.basename(os.path.normpath(source_root)))
  out = []
  for run in runs:
    cands = [r for r in manifest.values()
             if (r['variant'], r.get('nm'), r['seed']) == (run.variant, run.nm, run.seed)
             and (source_setting is None or r.get('setting', '') == source_setting)]
    if not cands:
      raise ValueError(f'--init_from: {source_root} has no run of {run.variant} {run.nm or ""} seed {run.seed}'
                       f'{f" with setting {source_setting!r}" if source_setting is not None else ""}; '
                       'pretrain it first (the same --recipes/--nm/--seeds there).')
    if len(cands) > 1:
      settings = sorted(repr(r.get('setting', '')) for r in cands)
      raise ValueError(f'--init_from: {source_root} has {len(cands)} runs of {run.variant} {run.nm or ""} seed '
                       f'{run.seed} (settings {", ".join(settings)}); pick one with --init_setting.')
    source = cands[0]['workdir']
    path = source if os.path.isabs(source) else os.path.join(REPO, source)
    state = workdir_state(path)
    if state != 'finished':
      raise ValueError(f'--init_from: pretraining run {cands[0]["name"]} is {state}, not finished '
                       f'({path}); wait for it or finish it first (rerun its sweep command).')
    out.append(derived_run(run, tag, f'init_from.path={source}'))
  return out


# ----------------------------------------------------------------------------- state on disk

def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints in ``workdir/checkpoints`` (folders named by their step)."""
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(d) for d in os.listdir(folder)
                if d.isdigit() and os.path.isdir(os.path.join(folder, d)))


def workdir_state(workdir: str) -> str:
  """``finished`` (final_metrics.json), ``interrupted`` (checkpoints), ``started`` or ``missing``."""
  if os.path.isfile(os.path.join(workdir, FINAL)):
    return 'finished'
  if checkpoint_steps(workdir):
    return 'interrupted'
  return 'started' if os.path.isdir(workdir) else 'missing'


def read_jsonl(path: str) -> list[dict]:
  """Rows of a JSON-lines file; a torn last line (a run still writing) is skipped."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          continue
  return rows


def last_attempts(root: str) -> dict[str, dict]:
  """``{run name: its latest attempt}`` from ``ROOT/runs.jsonl``."""
  return {row['name']: row for row in read_jsonl(os.path.join(root, ATTEMPTS)) if 'name' in row}


def load_manifest(root: str) -> dict[str, Any]:
  """``ROOT/manifest.json`` (``{'runs': {name: run}}``), or an empty manifest."""
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    return {'version': 1, 'runs': {}}
  with open(path) as f:
    manifest = json.load(f)
  if not isinstance(manifest.get('runs'), dict):
    raise ValueError(f'{path} has no "runs" mapping: it was not written by scripts/sweep.py.')
  return manifest


def merge_manifest(manifest: dict[str, Any], runs: Sequence[Run]) -> dict[str, Any]:
  """The manifest with ``runs`` added; a name already used by another command is an error."""
  out = {**manifest, 'runs': dict(manifest.get('runs', {}))}
  for run in runs:
    old = out['runs'].get(run.name)
    new = run.to_json()
    if old is not None:
      same = all(old.get(k) == new[k] for k in ('config_file', 'arg', 'overrides'))
      if not same:
        raise ValueError(
            f'Run {run.name!r} is already in the manifest with another command:\n  {old.get("command")}\n'
            f'now:\n  {new["command"]}\nUse another --root, or --extra/--set values that give other names.')
    out['runs'][run.name] = new
  return out


def update_manifest(root: str, runs: Sequence[Run]) -> dict[str, Any]:
  """Adds ``runs`` to ``ROOT/manifest.json`` under a file lock, re-reading it there, so that two sweeps
  started side by side into one root both keep their runs; returns the written manifest."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, MANIFEST_LOCK), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    manifest = merge_manifest(load_manifest(root), runs)
    write_json(os.path.join(root, MANIFEST), manifest)
  return manifest


def write_json(path: str, data: Any) -> None:
  """Writes JSON atomically (a temporary file renamed over ``path``)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def run_path(run: Run) -> str:
  """The run's workdir as seen from here (``run.workdir`` is relative to the repository root)."""
  return run.workdir if os.path.isabs(run.workdir) else os.path.join(REPO, run.workdir)


def pending(runs: Sequence[Run]) -> list[Run]:
  """Runs without final_metrics.json."""
  return [r for r in runs if workdir_state(run_path(r)) != 'finished']


# ----------------------------------------------------------------------------- running

def fmt_duration(seconds: float) -> str:
  """42 -> ``42s``, 182 -> ``3m02s``, 3840 -> ``1h04m``."""
  s = int(round(max(seconds, 0)))
  if s < 60:
    return f'{s}s'
  if s < 3600:
    return f'{s // 60}m{s % 60:02d}s'
  return f'{s // 3600}h{(s % 3600) // 60:02d}m'


def subprocess_runner(argv: Sequence[str], *, cwd: str, log_path: str) -> int:
  """Runs ``argv`` in ``cwd`` with its output appended to ``log_path``; returns the exit status.

  Ctrl-C sends SIGTERM to the child (the train loop saves a checkpoint), waits for it and re-raises.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  with open(log_path, 'a') as log:
    log.write(f'\n# {time.strftime("%Y-%m-%d %H:%M:%S")} $ {shlex.join(argv)}\n')
    log.flush()
    proc = subprocess.Popen(list(argv), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
      return proc.wait()
    except KeyboardInterrupt:
      proc.terminate()
      try:
        proc.wait(timeout=300)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      raise


def execute(runs: Sequence[Run], root: str, *, runner: Runner = subprocess_runner,
            python: str = sys.executable, clock: Callable[[], float] = time.time,
            out: TextIO = sys.stdout) -> list[dict]:
  """Runs the unfinished ``runs`` one after another; returns one record per attempt.

  Each attempt is appended to ``ROOT/runs.jsonl`` as it ends: name, command, start, wall time,
  exit status and ``status``: ``ok`` (final_metrics.json written), ``failed`` (non-zero exit),
  ``incomplete`` (exit 0 without final metrics, e.g. stopped by a signal) or ``stopped`` (Ctrl-C).
  A run whose workdir another sweep process holds locked is skipped (record ``busy``, not appended),
  and one finished meanwhile is skipped too: sweeps side by side on overlapping grids never run a
  run twice at once.
  """
  todo = pending(runs)
  finished = len(runs) - len(todo)
  resumable = sum(workdir_state(run_path(r)) == 'interrupted' for r in todo)
  print(f'sweep {root}: {len(runs)} runs, {finished} finished (skipped), {resumable} to resume, '
        f'{len(todo) - resumable} to start', file=out, flush=True)
  records: list[dict] = []
  for i, run in enumerate(todo):
    workdir = run_path(run)
    os.makedirs(workdir, exist_ok=True)
    lock = open(os.path.join(workdir, RUN_LOCK), 'w')  # Held while the run runs: one sweep per run.
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      lock.close()
      records.append(dict(name=run.name, status='busy', returncode=None, wall_time_s=0.0))
      print(f'[{i + 1}/{len(todo)}] {run.name}: skipped, another sweep process is running it', file=out, flush=True)
      continue
    with lock:
      if workdir_state(workdir) == 'finished':  # Finished by another sweep since this one started.
        print(f'[{i + 1}/{len(todo)}] {run.name}: finished meanwhile (skipped)', file=out, flush=True)
        continue
      record = _run_one(run, i, len(todo), root, records, runner=runner, python=python, clock=clock, out=out)
    records.append(record)
  bad = [r for r in records if r['status'] not in ('ok', 'busy')]
  busy = [r['name'] for r in records if r['status'] == 'busy']
  if bad:
    print(f'{len(bad)} run(s) did not finish: ' +
          ', '.join(f'{r["name"]} ({r["status"]}, exit {r["returncode"]})' for r in bad), file=out)
  if busy:
    print(f'{len(busy)} run(s) left to the other sweep process(es) that hold them: {", ".join(busy)}', file=out)
  if todo and not bad and not busy:
    print(f'all {len(todo)} run(s) finished.', file=out)
  return records


def _run_one(run: Run, i: int, n: int, root: str, records: list[dict], *, runner: Runner, python: str,
             clock: Callable[[], float], out: TextIO) -> dict:
  """Runs one pending run (its workdir locked by the caller) and returns its attempt's record, also
  appended to ``ROOT/runs.jsonl``; ``records`` are the sweep's earlier attempts (for the ETA)."""
  workdir = run_path(run)
  steps = checkpoint_steps(workdir)
  argv = run.argv(python)
  start_note = f'resume from step {steps[-1]}' if steps else 'start'
  print(f'[{i + 1}/{n}] {run.name}: {start_note} | ETA {_eta(records, n - i)}', file=out, flush=True)
  start = clock()
  record = dict(name=run.name, command=shlex.join(argv), start=start,
                resumed_from_step=steps[-1] if steps else None)
  try:
    code = runner(argv, cwd=REPO, log_path=os.path.join(root, 'logs', f'{run.name}.log'))
  except KeyboardInterrupt:
    record.update(end=clock(), returncode=None, status='stopped')
    record['wall_time_s'] = record['end'] - start
    _append(root, record)
    print(f'[{i + 1}/{n}] {run.name}: stopped by Ctrl-C after {fmt_duration(record["wall_time_s"])}; '
          'rerun the same sweep command to resume.', file=out, flush=True)
    raise
  end = clock()
  ok = os.path.isfile(os.path.join(workdir, FINAL))
  status = 'failed' if code != 0 else ('ok' if ok else 'incomplete')
  record.update(end=end, wall_time_s=end - start, returncode=code, status=status)
  _append(root, record)
  done = [r for r in records if r['status'] != 'busy'] + [record]  # A run another sweep holds is not ours.
  left = n - i - 1
  n_ok = sum(r['status'] == 'ok' for r in done)
  note = '' if status == 'ok' else f' (exit {code}; log {os.path.join(root, "logs", run.name + ".log")})'
  print(f'[{i + 1}/{n}] {run.name}: {status} in {fmt_duration(end - start)}{note} | '
        f'{n_ok} ok, {len(done) - n_ok} not, {left} left, ETA {_eta(done, left)}', file=out, flush=True)
  return record


def _eta(records: Sequence[dict], left: int) -> str:
  """Mean wall time of this session's finished runs (all attempts if none finished) x runs left.

  Runs skipped because another sweep holds them (``busy``) took no time here and do not count."""
  attempts = [r for r in records if r['status'] != 'busy']
  times = [r['wall_time_s'] for r in attempts if r['status'] == 'ok'] or [r['wall_time_s'] for r in attempts]
  return fmt_duration(sum(times) / len(times) * left) if times else 'unknown'


def _append(root: str, record: dict) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, ATTEMPTS), 'a') as f:
    f.write(json.dumps(record, sort_keys=True) + '\n')


# ----------------------------------------------------------------------------- CLI

def _stop(signum, frame) -> None:
  del frame
  raise KeyboardInterrupt(f'signal {signum}')


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m scripts.sweep', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='Config file, e.g. configs/vit_fashion_mnist.py.')
  p.add_argument('--recipes', required=True,
                 help=f'Comma-separated recipe variants or "paper" ({",".join(PAPER)}); known: '
                      f'{",".join(VARIANTS)}.')
  p.add_argument('--nm', required=True, help='Comma-separated N:M patterns, e.g. 2:4,1:8.')
  p.add_argument('--seeds', default='0', help='Comma-separated seeds (default 0).')
  p.add_argument('--extra', default='', help='More config arguments for every run, e.g. "epochs=3".')
  p.add_argument('--set', action='append', default=[], metavar='config.KEY=VALUE',
                 help='Config override for every run (repeatable), passed as --config.KEY=VALUE.')
  p.add_argument('--root', required=True, help='Sweep folder, e.g. results/sweeps/NAME.')
  p.add_argument('--mode', choices=('run', 'print', 'write'), default='print',
                 help='run: locally, one after another; print: one command per pending run; '
                      'write: the commands into --out.')
  p.add_argument('--out', help='File for --mode=write.')
  p.add_argument('--python', default=None,
                 help='Python for the commands (default: this interpreter for run, "python" otherwise).')
  p.add_argument('--match_flops', default=None, metavar='VARIANT',
                 help='Run each recipe for the steps at which its training FLOPs equal VARIANT\'s run of the '
                      'same cell (e.g. srste against mdgf-exp); the step count is derived, see match_flops().')
  p.add_argument('--init_from', default=None, metavar='ROOT',
                 help='Fine-tune: start each run from the finished run of the same recipe, N:M and seed in '
                      'the sweep ROOT (e.g. a pretraining sweep); see init_from_runs().')
  p.add_argument('--init_setting', default=None,
                 help='--init_from: the setting of the source runs when ROOT holds several.')
  p.add_argument('--dry_run', action='store_true', help='Show the plan; write and run nothing.')
  p.add_argument('--novalidate', action='store_true',
                 help='Skip building every config before starting (saves a few seconds).')
  return p


def main(argv: Optional[Sequence[str]] = None, *, runner: Runner = subprocess_runner,
         clock: Callable[[], float] = time.time, out: TextIO = sys.stdout) -> int:
  """The CLI; returns the exit status (``runner``/``clock`` are for tests)."""
  args = build_parser().parse_args(argv)
  try:
    seeds = [int(s) for s in split_list(args.seeds)]
  except ValueError:
    print(f'error: --seeds {args.seeds!r} must be comma-separated integers.', file=sys.stderr)
    return 2
  if args.mode == 'write' and not args.out:
    print('error: --mode=write needs --out FILE.', file=sys.stderr)
    return 2
  try:
    runs = make_runs(args.config, expand_variants(args.recipes), split_list(args.nm), seeds, args.root,
                     args.extra, args.set)
    if not args.novalidate:
      validate(runs)
    if args.match_flops:
      runs = match_flops(runs, args.match_flops, args.extra, args.set)
    if args.init_from:
      runs = init_from_runs(runs, args.init_from, args.init_setting)
    merge_manifest(load_manifest(args.root), runs)  # A name clash stops here, before anything is written.
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  python = args.python or (sys.executable if args.mode == 'run' else 'python')
  todo = pending(runs)
  if args.dry_run:
    for run in runs:
      state = workdir_state(run_path(run))
      print(f'{run.name:40s} {state:12s} {run.command(python)}', file=out)
    print(f'dry run: {len(todo)} of {len(runs)} runs pending; nothing written or run.', file=out)
    return 0
  try:
    update_manifest(args.root, runs)  # Re-read under a lock: another sweep may have written meanwhile.
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.mode == 'print':
    for run in todo:
      print(run.command(python), file=out)
    return 0
  if args.mode == 'write':
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(f'# {len(todo)} pending run(s) of {args.root}; run from {REPO}\n')
      f.writelines(run.command(python) + '\n' for run in todo)
    print(f'wrote {len(todo)} command(s) to {args.out}', file=out)
    return 0
  previous = signal.signal(signal.SIGTERM, _stop)  # A killed sweep stops its run cleanly too.
  try:
    records = execute(runs, args.root, runner=runner, python=python, clock=clock, out=out)
  except KeyboardInterrupt:
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  return 1 if any(r['status'] != 'ok' for r in records) else 0


if __name__ == '__main__':
  sys.exit(main())
