r"""The paper's three settings compiled for Cloud TPU slices, every recipe: results/tpu_plan.md.

    python -m scripts.tpu_plan --mode run [--jobs 2]   # compile every cell (resumable)
    python -m scripts.tpu_plan --mode table [--write]  # the tables from the JSON files (into results/tpu_plan.md)
    python -m scripts.tpu_plan --mode print            # the commands, one per pending cell

Cells: ViT-B/16 on ImageNet (``configs/vit_imagenet.py``, batch 4096), SwinV2-B on ImageNet
(``configs/swinv2_imagenet.py``, batch 1024) and T5.1.1-Base on C4 (``configs/t5_c4.py``,
batch 256, 512/114 tokens), each dense and under STE, SR-STE, MDGF, SDGF, MDGF+SDGF and
STEP at 1:16 (ViT and SwinV2 on the MLPs and on MLP + Q, K, V; T5 on every kernel), plus
MDGF at 2:4, on a v4-32 slice; dense and MDGF 1:16 also on a v5e-32; the v4-32 grid again on
one node of 8 H100 GPUs (compiled by XLA's GPU compiler without a GPU: ``bash scripts/setup.sh
--gpu`` installs jax's CUDA plugin, 5 GB; ``--no_gpu`` leaves those cells out). Each cell is one
``python -m experiments.main --mode=compile`` (one JSON per cell under
``results/tpu_plan/``, skipped when present, so a stopped grid resumes). The train step is
compiled for every cell; the diagnostics and eval steps too for dense and MDGF 1:16, whose
memory the plan's headroom check covers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join('results', 'tpu_plan')
PRIMARY, SECONDARY, GPU = 'v4:2x2x4', 'v5e:4x8', 'h100:8'
PROGRAMS = ('train', 'diagnostics', 'eval')  # Column "programs": their initials, t+d+e.
# Peak host memory of one compile (GiB), from this grid's cells on a 24 GB machine, where the
# kernel's OOM killer stopped a T5-Base compile at 12.3 GB beside a ViT-B/16 diagnostics compile
# (6.3 GB), and ViT-B/16 SDGF on MLP + Q, K, V at 13.5 GB beside MDGF+SDGF on the same: SwinV2-B
# and T5-Base steps need up to 18, a ViT-B/16 step with SDGF's stage switch up to 14, with its
# diagnostics step 7, a ViT-B/16 train step 4. The runner starts a compile only while the running
# ones' sum stays within the machine's memory less 3 GiB; a cell above that runs alone.
BIG = ('swinv2', 't5')
BIG_RECIPES = ('sdgf', 'mdgf_sdgf')  # Their stage switch: a ViT-B/16 compile needs up to 14 GiB.


def host_gib(cell: 'Cell') -> float:
  """The peak host memory (GiB) a cell's compile is planned with."""
  if cell.model in BIG:
    return 18.0
  if cell.recipe in BIG_RECIPES:
    return 14.0
  return 7.0 if len(cell.programs) > 1 else 4.0


def host_budget_gib() -> float:
  """This machine's physical memory (GiB) less 3 GiB for everything else."""
  return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30 - 3.0


# The levers a cell needs to fit with 10 % headroom. SwinV2-B on a v5e-32 (16 GB per device)
# needs 14.60 GB data parallel, 8.8 % free: sharding its params and AdamW moments 8 ways (4 x 8
# mesh) frees most of the 1.4 GB of replicated state, at the cost of all-gathering each
# kernel in every step (a v5e-32's ICI carries that; the roofline here does not count it).
FSDP = {('swinv2', SECONDARY): 8}


DOC = os.path.join('results', 'tpu_plan.md')
BEGIN, END = '<!-- tables: python -m scripts.tpu_plan --mode table -->', '<!-- end of tables -->'
RECIPES = ('ste', 'srste', 'mdgf', 'sdgf', 'mdgf_sdgf', 'step')
MODELS = {  # name: (config file, layer presets, title)
    'vit': ('configs/vit_imagenet.py', ('mlp', 'mlp_qkv'), 'ViT-B/16, ImageNet, batch 4096'),
    'swinv2': ('configs/swinv2_imagenet.py', ('mlp', 'mlp_qkv'), 'SwinV2-B, ImageNet, batch 1024'),
    't5': ('configs/t5_c4.py', ('all',), 'T5.1.1-Base, C4 span corruption, batch 256, 512/114 tokens'),
}


@dataclasses.dataclass(frozen=True)
class Cell:
  model: str
  recipe: str
  nm: str
  layers: str
  topology: str
  programs: tuple[str, ...]
  fsdp: int = 1  # > 1: params and optimizer state sharded over this many devices (the rest data parallel).

  @property
  def name(self) -> str:
    return (f'{self.recipe}_{self.nm.replace(":", "x")}_{self.layers}_{self.topology.replace(":", "_")}' +
            (f'_fsdp{self.fsdp}' if self.fsdp > 1 else ''))

  @property
  def json_path(self) -> str:
    return os.path.join(OUT, self.model, f'{self.name}.json')

  def command(self, python: str = 'python') -> list[str]:
    config, _, _ = MODELS[self.model]
    return [python, '-m', 'experiments.main', '--mode=compile',
            f'--config={config}:recipe={self.recipe},nm={self.nm},layers={self.layers}',
            f'--topology={self.topology}', f'--compile_programs={",".join(self.programs)}',
            *([f'--config.mesh.fsdp={self.fsdp}', '--config.mesh.data=-1'] if self.fsdp > 1 else []),
            f'--workdir={os.path.join(OUT, self.model, self.name)}']


def cells(gpu: bool = True) -> list[Cell]:
  out = []
  for model, (_, presets, _) in MODELS.items():
    first = presets[0]
    # The diagnostics step's compile is the longest (12 min for ViT-B, beside another compile):
    # compiled for ViT only; the swinv2 and t5 cells compile the train and eval steps.
    full = ('train', 'eval') if model in BIG else PROGRAMS
    out.append(Cell(model, 'dense', '1:16', first, PRIMARY, full))
    for recipe in RECIPES:
      for layers in presets:
        programs = full if (recipe, layers) == ('mdgf', first) else ('train',)
        out.append(Cell(model, recipe, '1:16', layers, PRIMARY, programs))
    out.append(Cell(model, 'mdgf', '2:4', first, PRIMARY, ('train',)))
    fsdp = FSDP.get((model, SECONDARY), 1)
    out.append(Cell(model, 'dense', '1:16', first, SECONDARY, full, fsdp))
    out.append(Cell(model, 'mdgf', '1:16', first, SECONDARY, full, fsdp))
  if gpu:  # The same grid on one node of 8 H100s (needs bash scripts/setup.sh --gpu).
    out += [dataclasses.replace(c, topology=GPU) for c in out if c.topology == PRIMARY]
  return out


def run_cell(cell: Cell, python: str) -> tuple[Cell, int, float]:
  """Compiles one cell; its JSON moves to ``cell.json_path`` (a failed cell leaves a .log)."""
  workdir = cell.command()[-1].split('=', 1)[1]
  log = cell.json_path[:-5] + '.log'
  t0 = time.time()
  produced = os.path.join(workdir, f'compile_{cell.topology.replace(":", "_")}.json')
  if os.path.exists(produced):  # A compile that finished after its grid process was stopped.
    code = 0
  else:
    with open(log, 'w') as f:
      code = subprocess.run(cell.command(python), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
  if code == 0 and os.path.exists(produced):
    with open(produced) as f:
      out = json.load(f)
    out['command'] = ' '.join(cell.command())
    with open(cell.json_path, 'w') as f:
      json.dump(out, f, indent=2, sort_keys=True)
    if os.path.exists(log):
      os.remove(log)
    shutil.rmtree(workdir)  # It held that JSON and the programs' HLO (hlo.txt.gz).
  return cell, code, time.time() - t0


def priority(cell: Cell) -> tuple:
  """Run order, so that a grid stopped early holds the most: on v4, dense and MDGF 1:16, then
  the other recipes on the first preset, then MDGF 2:4; the second TPU generation; the second
  preset on v4; then GPU (dense and MDGF 1:16 first). In each stage, recipe by recipe with every
  model in turn."""
  first = MODELS[cell.model][1][0]
  main_pair = cell.recipe in ('dense', 'mdgf') and cell.nm == '1:16' and cell.layers == first
  if cell.topology == PRIMARY:
    stage = 0 if main_pair else 4 if cell.layers != first else 2 if cell.nm != '1:16' else 1
  elif cell.topology == SECONDARY:
    stage = 3
  else:
    stage = 5 if main_pair else 6
  recipe = RECIPES.index(cell.recipe) if cell.recipe in RECIPES else -1
  return stage, recipe, list(MODELS).index(cell.model)


def run(jobs: int, python: str, gpu: bool = True) -> int:
  pending = sorted((c for c in cells(gpu) if not os.path.exists(c.json_path)), key=priority)
  for c in pending:
    os.makedirs(os.path.dirname(c.json_path), exist_ok=True)
  budget = host_budget_gib()
  print(f'{len(pending)} of {len(cells(gpu))} cells to compile, up to {jobs} at a time within '
        f'{budget:.1f} GiB of host memory', flush=True)
  failed, t0, done = 0, time.time(), 0
  lock, running = threading.Lock(), []  # The host memory (GiB) of each compile running now.

  def take():  # The first pending cell that fits in host memory beside the running ones.
    with lock:
      for i, c in enumerate(pending):
        if not running or sum(running) + host_gib(c) <= budget:
          running.append(host_gib(c))
          return pending.pop(i)
      return None

  def worker(results):
    while True:
      cell = take()
      if cell is None:
        with lock:
          if not pending:
            return
        time.sleep(5)  # What is left waits for host memory.
        continue
      try:
        results.put(run_cell(cell, python))
      except BaseException:
        results.put((cell, -1, 0.0))  # Counted as failed; the error itself is raised below.
        raise
      finally:
        with lock:
          running.remove(host_gib(cell))

  results = queue.Queue()
  total = len(pending)
  with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    workers = [pool.submit(worker, results) for _ in range(jobs)]
    while done < total:
      cell, code, seconds = results.get()
      done += 1
      failed += code != 0
      left = (time.time() - t0) / done * (total - done)
      print(f'[{done}/{total}] {cell.model}/{cell.name}: '
            f'{"ok" if code == 0 else f"FAILED ({code}), see {cell.json_path[:-5]}.log"} in {seconds / 60:.1f} min; '
            f'about {left / 60:.0f} min left', flush=True)
  for w in workers:
    w.result()  # Raises a worker's unexpected error, if any.
  return 1 if failed else 0


# ----------------------------------------------------------------------------- table

def load() -> dict[Cell, dict]:
  out = {}
  for c in cells():
    if os.path.exists(c.json_path):
      with open(c.json_path) as f:
        out[c] = json.load(f)
  return out


def _gb(x: float) -> str:
  return f'{x / 1e9:.2f}'


def _hbm_ratio(train: dict, dense_train: dict) -> str:
  """HBM bytes over dense's; ``lo-hi`` over the branches of the step's conditionals where they
  differ (STEP before and after AutoSwitch, SDGF's stages), else the one figure."""
  if 'hlo_hbm_bytes' not in train or 'hlo_hbm_bytes' not in dense_train:
    return '-'
  ratios = [b / dense_train['hlo_hbm_bytes'] for b in
            train.get('hlo_hbm_bytes_by_branch', {'': train['hlo_hbm_bytes']}).values()]
  lo, hi = f'{min(ratios):.4f}', f'{max(ratios):.4f}'
  return hi if lo == hi else f'{lo}-{hi}'


def table(results: dict[Cell, dict]) -> str:
  lines = []
  for model, (config, presets, title) in MODELS.items():
    for topology in (PRIMARY, SECONDARY, GPU):
      rows = [(c, r) for c, r in results.items() if c.model == model and c.topology == topology]
      if not rows:
        continue
      dense = next((r for c, r in rows if c.recipe == 'dense'), None)
      r0 = rows[0][1]
      lines += [f'### {title} on {topology} ({r0["chips"]} {r0["chip"]["name"]} chips, {r0["devices"]} devices, '
                f'{r0["per_device_batch"]:g} examples per device)', '',
                f'`{config}`, {r0["total_steps"]:,} steps. HBM per device: the largest compiled program '
                f'(of {_gb(r0["hbm_per_device_bytes"])} GB); step time: roofline of the train step; ratios to dense '
                'of the train step\'s FLOPs, bytes accessed and roofline time.', '',
                '| recipe | N:M | layers | mesh | HBM / device (GB) | headroom | programs | step (ms) | bound | MFU | '
                'examples/s | run (h) | chip-hours | FLOPs x | bytes x | time x | HBM bytes x |',
                '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
      order = {'dense': 0, **{r: i + 1 for i, r in enumerate(RECIPES)}}
      for c, r in sorted(rows, key=lambda cr: (order[cr[0].recipe], cr[0].nm != '1:16', cr[0].layers)):
        train = r['programs']['train']
        need = max(p['total_bytes'] for p in r['programs'].values())
        ratio = lambda key: (train[key] / dense['programs']['train'][key]) if dense else float('nan')
        d_train = dense['programs']['train'] if dense else {}
        lines.append(
            f'| {c.recipe} | {c.nm if c.recipe != "dense" else "-"} | {c.layers if c.recipe != "dense" else "-"} | '
            f'{r["mesh"]["data"]} x {r["mesh"]["fsdp"]} | {_gb(need)} | {r["headroom"]:.0%} | {"+".join(p[0] for p in PROGRAMS if p in r["programs"])} | '
            f'{train["step_s"] * 1e3:.1f} | {train["bound"]} | {r["mfu"]:.1%} | {r["examples_per_s"]:,.0f} | '
            f'{r["run_wall_s"] / 3600:.1f} | {r["run_chip_hours"]:,.0f} | {ratio("flops"):.4f} | '
            f'{ratio("bytes_accessed"):.4f} | {ratio("step_s"):.4f} | {_hbm_ratio(train, d_train)} |')
      lines.append('')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--mode', choices=('run', 'table', 'print'), default='table')
  ap.add_argument('--jobs', type=int, default=1, help='compiles at a time (each uses about one core)')
  ap.add_argument('--python', default=sys.executable)
  ap.add_argument('--no_gpu', action='store_true', help='leave out the 8 x H100 cells')
  ap.add_argument('--write', action='store_true', help=f'--mode table: put the tables into {DOC}')
  args = ap.parse_args(argv)
  os.chdir(ROOT)
  if args.mode == 'print':
    for c in cells(not args.no_gpu):
      if not os.path.exists(c.json_path):
        print(' '.join(c.command()))
    return 0
  if args.mode == 'run':
    return run(args.jobs, args.python, not args.no_gpu)
  text = table(load())
  if not args.write:
    print(text)
    return 0
  with open(DOC) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    raise SystemExit(f'{DOC} has no {BEGIN!r} ... {END!r} markers to put the tables between.')
  head, rest = doc.split(BEGIN, 1)
  with open(DOC, 'w') as f:
    f.write(head + BEGIN + '\n\n' + text + '\n' + END + rest.split(END, 1)[1])
  print(f'tables written to {DOC}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
