r"""Plan a TPU run without a TPU: compile the real steps of a config for a Cloud TPU topology.

    python -m experiments.main --mode=compile --config=configs/vit_imagenet.py \
        --topology=v4:2x2x4 --workdir=workdirs/plan_vit

``libtpu`` (which ``scripts/setup.sh`` installs into ``.venv/libtpu``, outside the CPU
runs' import path) lets XLA's TPU compiler target a topology that is not attached:
``jax.experimental.topologies.get_topology_desc`` gives its devices, the train, eval and
(when the config logs them) diagnostics steps are built exactly as the train loop builds
them, at the config's global batch, on that topology's mesh, and compiled ahead of time.
Nothing reads data or a checkpoint. Per device, XLA reports the HBM the program needs
(``memory_analysis``) and the FLOPs and bytes it moves (``cost_analysis``); with the
chip's published peak bf16 FLOP/s and HBM bandwidth (:data:`CHIPS`) they give a roofline
step time ``max(FLOPs / peak, bytes / bandwidth)``, a lower bound that ignores the
collectives' time and imperfect overlap. From it: model FLOP utilisation (the dense
model's FLOPs, from the lowered dense step, over time x peak), examples (and tokens) per
second and the whole run in wall time and chip-hours.

A TPU device is a TensorCore as the compiler sees it: one per v5e and v6e chip, one per
v5p chip (its two cores run as one, "megacore"), two per v4 chip in these topologies.
A device's share of the chip's HBM, peak and bandwidth is the chip's over its devices.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import logging
import math
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from experiments import environment, hlo_bytes

PyTree = Any
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published figures of one TPU chip (all its TensorCores)."""

  name: str
  peak_flops: float  # bf16 FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  source: str


# By the device_kind that JAX reports. Google Cloud's TPU system architecture pages.
CHIPS = {
    'TPU v4': Chip('v4', 275e12, 32 * GiB, 1200e9, 'https://cloud.google.com/tpu/docs/v4'),
    'TPU v5 lite': Chip('v5e', 197e12, 16e9, 819e9, 'https://cloud.google.com/tpu/docs/v5e'),
    'TPU v5': Chip('v5p', 459e12, 95e9, 2765e9, 'https://cloud.google.com/tpu/docs/v5p'),
    'TPU v6 lite': Chip('v6e', 918e12, 32e9, 1638e9, 'https://cloud.google.com/tpu/docs/v6e'),
}
# Split sizes, so that epochs become steps without reading the data (TFDS catalog).
SPLIT_EXAMPLES = {
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
    'c4/en:3.1.0': {'train': 365_000_000, 'validation': 364_608},
    'nm_fashion_mnist': {'train': 60_000, 'test': 10_000},
    'cifar10': {'train': 50_000, 'test': 10_000},
}
HEADROOM = 0.10  # A plan that leaves less HBM free than this fraction does not pass.


@dataclasses.dataclass(frozen=True)
class Gpu:
  """Published figures of one NVIDIA GPU, and what XLA's GPU compiler needs to target it."""

  name: str
  peak_flops: float  # bf16 dense tensor FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float
  source: str
  sms: int
  compute_capability: tuple[int, int]
  clock_ghz: float
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  fpus_per_sm: int

  def target_config(self) -> str:
    """A ``stream_executor.GpuTargetConfigProto`` in text form, from the figures above."""
    major, minor = self.compute_capability
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
                shared_memory_per_core=self.shared_memory_per_sm, threads_per_core_limit=2048,
                core_count=self.sms, fpus_per_core=self.fpus_per_sm, block_dim_limit_x=2**31 - 1,
                block_dim_limit_y=65535, block_dim_limit_z=65535, memory_bandwidth=int(self.hbm_bandwidth),
                l2_cache_size=self.l2_bytes, clock_rate_ghz=self.clock_ghz,
                device_memory_size=int(self.hbm_bytes),
                shared_memory_per_block_optin=self.shared_memory_per_block_optin,
                registers_per_core_limit=65536, registers_per_block_limit=65536)
    fields = ' '.join(f'{k}: {v}' for k, v in info.items())
    return (f'gpu_device_info {{ {fields} cuda_compute_capability {{ major: {major} minor: {minor} }} }} '
            f'platform_name: "CUDA" device_description_str: "NVIDIA {self.name}"')


# By name in --topology=NAME:COUNT (one node). NVIDIA's H100 and A100 datasheets.
GPUS = {
    'h100': Gpu('H100 80GB HBM3', 989.4e12, 80e9, 3.35e12,
                'https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM)', sms=132,
                compute_capability=(9, 0), clock_ghz=1.98, l2_bytes=50 * 2**20,
                shared_memory_per_sm=228 * 1024, shared_memory_per_block_optin=227 * 1024, fpus_per_sm=128),
    'a100': Gpu('A100-SXM4-80GB', 312e12, 80e9, 2.039e12,
                'https://www.nvidia.com/en-us/data-center/a100/ (A100 80GB SXM)', sms=108,
                compute_capability=(8, 0), clock_ghz=1.41, l2_bytes=40 * 2**20,
                shared_memory_per_sm=164 * 1024, shared_memory_per_block_optin=163 * 1024, fpus_per_sm=64),
}


class DoesNotFit(RuntimeError):
  """The program needs more HBM per device than the chip has (or leaves too little headroom)."""


# ----------------------------------------------------------------------------- topology

def libtpu_path() -> str:
  """The libtpu shared library: ``TPU_LIBRARY_PATH``, ``.venv/libtpu`` or an installed ``libtpu``."""
  if os.environ.get('TPU_LIBRARY_PATH'):
    return os.environ['TPU_LIBRARY_PATH']
  local = os.path.join(sys.prefix, 'libtpu', 'libtpu', 'libtpu.so')
  if os.path.exists(local):
    return local
  try:
    import libtpu  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(
        'compile mode needs libtpu, the TPU compiler: bash scripts/setup.sh installs it into '
        f'{os.path.join(sys.prefix, "libtpu")} (or pip install the libtpu of your jax, e.g. '
        '"pip install jax[tpu]"), or set TPU_LIBRARY_PATH to a libtpu.so.') from None
  return os.path.join(os.path.dirname(libtpu.__file__), 'libtpu.so')


def topology_devices(name: str) -> list:
  """Compile-only devices: a Cloud TPU topology (``v4:2x2x4``, ``v5e:4x8``) or a GPU node (``h100:8``)."""
  if name.split(':')[0] in GPUS:
    return gpu_devices(name)
  os.environ['TPU_LIBRARY_PATH'] = libtpu_path()
  # No TPU here: skip the metadata server and name this host, or libtpu warns at length; and
  # let several processes load it at once (compiling only, they share no device).
  for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
                     ('TPU_WORKER_ID', '0'), ('TPU_ACCELERATOR_TYPE', 'v5litepod-4'),
                     ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name).devices)
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f'--topology={name}: libtpu does not know this topology ({e}). Write it as '
                     'GENERATION:SHAPE, e.g. v4:2x2x4 (a v4-32), v5e:4x8, v5p:2x2x2, v6e:4x4.') from None


def gpu_devices(name: str) -> list:
  """Compile-only devices of one node of ``COUNT`` GPUs (``h100:8``): XLA's GPU compiler targets
  the GPU described by :meth:`Gpu.target_config`, with no GPU and no CUDA driver here.

  Needs jax's CUDA plugin and NVIDIA's CUDA libraries (about 5 GB), which
  ``bash scripts/setup.sh --gpu`` installs into ``.venv/cuda``.
  """
  kind, _, count = name.partition(':')
  if not count.isdigit() or int(count) < 1:
    raise ValueError(f'--topology={name}: write a GPU node as NAME:COUNT, e.g. h100:8.')
  cuda_dir = os.path.join(sys.prefix, 'cuda')
  if not os.path.isdir(os.path.join(cuda_dir, 'jax_plugins')):
    raise FileNotFoundError(f'--topology={name} needs jax\'s CUDA plugin and the CUDA libraries in '
                            f'{cuda_dir}: bash scripts/setup.sh --gpu installs them (about 5 GB).')
  jax.devices('cpu')  # The CPU backend first, so that the plugin never becomes the default one.
  if cuda_dir not in sys.path:
    sys.path.append(cuda_dir)
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # Its version check needs a driver.
  import importlib  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if 'cuda' not in xla_bridge._topology_factories:  # pylint: disable=protected-access
    importlib.import_module('jax_plugins.xla_cuda12').initialize()
  topology = topologies.get_topology_desc(platform='cuda', topology=f'1x1x{count}',
                                          target_config=GPUS[kind].target_config())
  return list(topology.devices)


def devices_per_chip(devices: list) -> int:
  if devices[0].platform != 'tpu':
    return 1
  per_chip = collections.Counter(tuple(d.coords) for d in devices)
  counts = set(per_chip.values())
  if len(counts) != 1:
    raise ValueError(f'uneven devices per chip {sorted(counts)} in this topology.')
  return counts.pop()


# ----------------------------------------------------------------------------- compilation

def compiled_figures(compiled) -> dict[str, float]:
  """Per-device HBM (bytes) and cost of one compiled program."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if cost is None:  # A compile-only GPU executable: XLA's count on its optimised HLO module.
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(xla_bridge.get_backend('cpu'), module)
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
    cost = cost[0]
  out = dict(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
             temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
             code_bytes=mem.generated_code_size_in_bytes,
             flops=float(cost.get('flops', 0.0)), bytes_accessed=float(cost.get('bytes accessed', 0.0)))
  # Donated arguments alias outputs: their bytes are counted once.
  out['total_bytes'] = (out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] +
                        out['temp_bytes'] + out['code_bytes'])
  return out


def roofline(figures: dict[str, float], chip: Chip, per_chip: int) -> dict[str, float]:
  """Step time bounds of one device: compute, HBM traffic, and the larger of the two."""
  compute = figures['flops'] / (chip.peak_flops / per_chip)
  memory = figures['bytes_accessed'] / (chip.hbm_bandwidth / per_chip)
  return dict(compute_s=compute, memory_s=memory, step_s=max(compute, memory),
              bound='compute' if compute >= memory else 'memory')


def _abstract(tree: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def _batch(s, batch_size: int) -> dict:
  """Abstract batch of ``batch_size`` examples, split over every device as the loop's batches."""
  from experiments import state as state_lib  # pylint: disable=g-import-not-at-top
  sharding = state_lib.batch_sharding(s.mesh)
  small = jax.eval_shape(lambda: s.task.dummy_batch(s.config, 2))
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=sharding)
          for k, v in small.items()}


def _compile(fn, *args) -> tuple[Any, float]:
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' in str(e):  # The compiler's own HBM check; the caller names the levers.
      raise DoesNotFit(str(e).splitlines()[0]) from None
    raise
  return compiled, time.perf_counter() - t0


def no_persistent_cache() -> None:
  """Turns JAX's persistent compilation cache off for the rest of the process (JAX decides once
  per process whether to use it, at the first compile). An executable compiled for a topology
  with no devices attached cannot be loaded back: with a user's cache on, every later compile of
  the same step warned and compiled again, and the entries, tens of MB each, filled 2.2 GB."""
  jax.config.update('jax_enable_compilation_cache', False)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """Train steps per epoch from the published split size (epoch-based configs only)."""
  name = config.data.name
  sizes = SPLIT_EXAMPLES.get(name)
  needs = config.get('total_steps') is None
  if sizes is None or config.train_split not in sizes:
    if needs:
      raise ValueError(f'compile mode turns epochs into steps from the split size, which it knows '
                       f'for {sorted(SPLIT_EXAMPLES)}, not {name!r}/{config.train_split!r}: set '
                       '--config.total_steps.')
    return 1  # Unused: the run length is given in steps.
  return sizes[config.train_split] // config.batch_size


def _dense_model_flops(config: ml_collections.ConfigDict, spe: int) -> float:
  """Global FLOPs of one dense train step of the same model and batch: XLA's count on the
  unpartitioned HLO, lowered (not compiled) for one CPU device."""
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  dense = ml_collections.ConfigDict(config.to_dict())
  dense.sparsity.recipe.name = 'dense'
  dense.mesh.data, dense.mesh.fsdp = 1, 1
  s = train_lib.setup(dense, steps_per_epoch=spe, devices=jax.devices('cpu')[:1])
  lowered = train_lib.make_train_step(s).lower(_abstract(s.abstract_state, s.shardings),
                                               _batch(s, config.batch_size))
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


PROGRAMS = ('train', 'diagnostics', 'eval')


def _write_hlo(text: str, path: str) -> None:
  """The optimised HLO the compiler will run, for ``experiments/hlo_bytes.py`` to attribute bytes."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with gzip.open(path, 'wt') as f:
    f.write(text)


def plan(config: ml_collections.ConfigDict, topology: str, *,
         programs: tuple[str, ...] = PROGRAMS, hlo_dir: str | None = None) -> dict:
  """Compiles the config's steps for ``topology``; returns the figures (see the module docstring).

  ``programs``: which of the train step, the diagnostics step (compiled only if the
  config logs diagnostics) and the eval step to compile; the train step always is.
  ``hlo_dir``: where to write each program's optimised HLO (``<program>_<topology>.hlo.txt.gz``).
  Raises :class:`DoesNotFit` (naming the levers) when a program needs more HBM per
  device than the chip has, or leaves less than ``HEADROOM`` of it free.
  """
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f'unknown programs {sorted(unknown)}; choose from {PROGRAMS}.')
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  devices = topology_devices(topology)
  kind = devices[0].device_kind
  if topology.split(':')[0] in GPUS:
    chip = GPUS[topology.split(':')[0]]
  elif kind in CHIPS:
    chip = CHIPS[kind]
  else:
    raise ValueError(f'no published figures for {kind!r}; add it to CHIPS in {__file__}.')
  per_chip = devices_per_chip(devices)
  n = len(devices)
  spe = steps_per_epoch(config)
  s = train_lib.setup(config, steps_per_epoch=spe, devices=devices)
  state = _abstract(s.abstract_state, s.shardings)
  wanted = programs
  programs = {'train': (train_lib.make_train_step(s), config.batch_size)}
  if 'diagnostics' in wanted and s.diagnostics_every > 0:
    programs['diagnostics'] = (train_lib.make_train_step(s, diagnostics=True), config.batch_size)
  if 'eval' in wanted:
    programs['eval'] = (train_lib.make_eval_step(s), config.get('eval_batch_size') or config.batch_size)
  out: dict[str, Any] = dict(
      topology=topology, device_kind=kind, chip=dict(name=chip.name, peak_flops=chip.peak_flops,
      hbm_bytes=chip.hbm_bytes, hbm_bandwidth=chip.hbm_bandwidth, source=chip.source), devices=n,
      devices_per_chip=per_chip, chips=n // per_chip, mesh=dict(s.mesh.shape),
      global_batch=config.batch_size, per_device_batch=config.batch_size / n, total_steps=s.total_steps,
      recipe=s.sp.recipe.name, nm=config.sparsity.nm, layers=config.sparsity.layers,
      model=config.model.get('variant', config.model.name), programs={})
  for name, (fn, batch) in programs.items():
    try:
      compiled, seconds = _compile(fn, state, _batch(s, batch))
    except DoesNotFit as e:
      raise DoesNotFit(f'the {name} step does not compile for {topology}: {e} ' +
                       _levers(config, out)) from None
    fig = compiled_figures(compiled)
    fig.update(roofline(fig, chip, per_chip), compile_s=seconds, batch=batch)
    text = compiled.as_text()
    # XLA's `bytes accessed` also counts traffic to on-chip memories; this is HBM alone, from
    # the buffers' memory spaces in the optimised HLO (the costliest branch of a conditional).
    traffic = hlo_bytes.traffic(text)
    branches = hlo_bytes.step_bytes(traffic)
    fig['hlo_hbm_bytes'] = max(branches.values())
    fig['hlo_hbm_bytes_by_branch'] = branches  # {'': bytes}, or one per branch index of the conditionals.
    fig['hlo_hbm_bytes_by_kind'] = dict(traffic['kind'])  # compute, staging, collective (every branch).
    out['programs'][name] = fig
    if hlo_dir:
      _write_hlo(text, os.path.join(hlo_dir, f'{name}_{topology.replace(":", "_")}.hlo.txt.gz'))
    del text
    logging.info('compiled %s step for %s in %.1f s: %.2f GB per device, %.3g FLOPs', name, topology,
                 seconds, fig['total_bytes'] / 1e9, fig['flops'])
  hbm = chip.hbm_bytes / per_chip
  out['hbm_per_device_bytes'] = hbm
  need = max(p['total_bytes'] for p in out['programs'].values())
  out['headroom'] = 1.0 - need / hbm
  train = out['programs']['train']
  model_flops = _dense_model_flops(config, spe) / n
  out['model_flops_per_device'] = model_flops
  out['mfu'] = model_flops / (train['step_s'] * chip.peak_flops / per_chip)
  out['examples_per_s'] = config.batch_size / train['step_s']
  tokens = _tokens_per_example(config)
  if tokens:
    out['tokens_per_s'] = out['examples_per_s'] * tokens
  out |= _run_time(config, s.total_steps, s.diagnostics_every, out)
  if out['headroom'] < HEADROOM:
    raise DoesNotFit(_no_fit_message(config, out, need, hbm))
  return out


def _tokens_per_example(config) -> int | None:
  data = config.data
  if 'inputs_length' not in data:
    return None
  return int(data.inputs_length) + int(data.get('targets_length') or 0)


def _run_time(config, total_steps: int, diag_every: int, out: dict) -> dict[str, float]:
  """The whole run: train steps (diagnostics steps at their own time) and the evaluations."""
  progs = out['programs']
  n_diag = total_steps // diag_every if diag_every and 'diagnostics' in progs else 0
  train_s = (total_steps - n_diag) * progs['train']['step_s']
  if n_diag:  # Diagnostics steps at their own time; uncompiled, they count as ordinary steps.
    train_s += n_diag * progs['diagnostics']['step_s']
  eval_s = 0.0
  if 'eval' in progs:
    evals = total_steps // config.eval_every_steps + 1 if config.get('eval_every_steps') else 1
    eval_batches = config.get('eval_steps')
    if not eval_batches:
      size = SPLIT_EXAMPLES.get(config.data.name, {}).get(config.eval_split)
      eval_batches = math.ceil(size / progs['eval']['batch']) if size else 0
    eval_s = evals * eval_batches * progs['eval']['step_s']
  wall = train_s + eval_s
  return dict(run_train_s=train_s, run_eval_s=eval_s, run_wall_s=wall,
              run_chip_hours=wall / 3600 * out['chips'])


def _no_fit_message(config, out: dict, need: float, hbm: float) -> str:
  return (f'{out["model"]} with recipe {out["recipe"]} on {out["topology"]} needs {need / 1e9:.2f} GB '
          f'per device of {hbm / 1e9:.2f} GB ({out["device_kind"]}), leaving {out["headroom"]:.1%} '
          f'free (at least {HEADROOM:.0%} asked). ' + _levers(config, out))


def _levers(config, out: dict) -> str:
  """What reduces the HBM a device needs, for this config."""
  n, fsdp = out['devices'], config.mesh.fsdp
  levers = []
  if fsdp in (1, 0):
    levers.append(f'shard params and optimizer state over the mesh\'s fsdp axis (--config.mesh.fsdp=K '
                  f'--config.mesh.data=-1, K dividing {n})')
  if 'remat' in config.model.get('kwargs', {}) or config.model.name in ('vit', 'swinv2'):
    levers.append('rematerialise the blocks (--config.model.kwargs.remat=True)')
  levers.append(f'a smaller per-device batch ({out["global_batch"]} / {n} devices = '
                f'{out["per_device_batch"]:,.10g}: --config.batch_size, or a larger topology)')
  return 'Levers: ' + '; '.join(levers) + '.'



# ----------------------------------------------------------------------------- report

def describe(out: dict) -> str:
  """A few lines for the screen."""
  lines = [f'{out["model"]} {out["recipe"]} {out["nm"]}/{out["layers"]} on {out["topology"]} '
           f'({out["chips"]} x {out["chip"]["name"]} chips, {out["devices"]} devices, mesh {out["mesh"]}, '
           f'{out["per_device_batch"]:g} examples per device)']
  for name, p in out['programs'].items():
    lines.append(f'  {name:11s} compiled in {p["compile_s"]:6.1f} s; HBM per device {p["total_bytes"] / 1e9:6.2f} GB '
                 f'(args {p["argument_bytes"] / 1e9:.2f}, temps {p["temp_bytes"] / 1e9:.2f}, '
                 f'outputs {p["output_bytes"] / 1e9:.2f}); {p["flops"]:.3e} FLOPs, '
                 f'{p["bytes_accessed"] / 1e9:.2f} GB moved ({p["hlo_hbm_bytes"] / 1e9:.2f} GB of it in HBM by '
                 f'the HLO); roofline {p["step_s"] * 1e3:.1f} ms ({p["bound"]}-bound)')
  lines.append(f'  HBM {out["hbm_per_device_bytes"] / 1e9:.2f} GB per device, headroom {out["headroom"]:.1%}; '
               f'MFU at the roofline {out["mfu"]:.1%}; {out["examples_per_s"]:,.0f} examples/s'
               + (f', {out["tokens_per_s"]:,.0f} tokens/s' if 'tokens_per_s' in out else ''))
  lines.append(f'  whole run ({out["total_steps"]:,} steps): {out["run_wall_s"] / 3600:.1f} h wall, '
               f'{out["run_chip_hours"]:,.0f} chip-hours (roofline: a lower bound)')
  return '\n'.join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, topologies: list[str],
        programs: tuple[str, ...] = PROGRAMS) -> dict[str, float]:
  """Plans every topology; writes ``compile_<topology>.json`` and each program's optimised HLO
  (``<program>_<topology>.hlo.txt.gz``, for ``experiments/hlo_bytes.py``) into ``workdir``;
  returns a summary."""
  no_persistent_cache()
  summary = {}
  for topology in topologies:
    out = plan(config, topology, programs=tuple(programs), hlo_dir=workdir)
    out['code'] = environment.git_state()  # Which nmsparse commit compiled it (and whether dirty).
    print(describe(out), flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f'compile_{topology.replace(":", "_")}.json'), 'w') as f:
      json.dump(out, f, indent=2, sort_keys=True)
    key = topology.replace(':', '_')
    summary[f'{key}/hbm_gb'] = max(p['total_bytes'] for p in out['programs'].values()) / 1e9
    summary[f'{key}/step_ms'] = out['programs']['train']['step_s'] * 1e3
    summary[f'{key}/chip_hours'] = out['run_chip_hours']
  return summary
