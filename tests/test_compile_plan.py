"""--mode=compile: XLA's TPU compiler through libtpu, no TPU. Figures against hand counts.

Needs libtpu, which ``bash scripts/setup.sh`` installs into ``.venv/libtpu`` (off the CPU
runs' import path; compile mode points JAX at it).
"""

import importlib.util
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compile_plan
from experiments import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = 'v5e:2x2'  # 4 chips of one TensorCore each.


def load_config(name, arg):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope='module')
def devices():
  # TPU executables compiled without a TPU cannot be read back from JAX's persistent cache
  # (which tests/conftest.py turns on): keep them out of it.
  jax.config.update('jax_enable_compilation_cache', False)
  yield compile_plan.topology_devices(TOPOLOGY)
  jax.config.update('jax_enable_compilation_cache', True)


def test_topology_devices_and_chip_table(devices):
  assert len(devices) == 4 and compile_plan.devices_per_chip(devices) == 1
  chip = compile_plan.CHIPS[devices[0].device_kind]
  assert (chip.name, chip.peak_flops, chip.hbm_bytes) == ('v5e', 197e12, 16e9)  # cloud.google.com/tpu/docs/v5e
  v4 = compile_plan.topology_devices('v4:2x2x1')  # 4 chips, 2 TensorCores each in this topology.
  assert len(v4) == 8 and compile_plan.devices_per_chip(v4) == 2


def test_matmul_figures_are_the_hand_count(devices):
  """x (1024 x 512) split by rows over 4 devices times a replicated w (512 x 256): per device
  2 * 256 * 512 * 256 FLOPs; arguments 256*512 + 512*256 floats, output 256*256 floats."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ('d',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d', None))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((1024, 512), jnp.float32, sharding=rows)
  w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=rep)
  compiled = jax.jit(lambda x, w: x @ w, out_shardings=rows).lower(x, w).compile()
  fig = compile_plan.compiled_figures(compiled)
  assert fig['flops'] == 2 * 256 * 512 * 256
  assert fig['argument_bytes'] == 4 * (256 * 512 + 512 * 256)
  assert fig['output_bytes'] == 4 * 256 * 256
  assert fig['total_bytes'] >= fig['argument_bytes'] + fig['output_bytes']


def test_roofline_by_hand():
  chip = compile_plan.Chip('x', peak_flops=100e12, hbm_bytes=16e9, hbm_bandwidth=1e12, source='')
  r = compile_plan.roofline({'flops': 50e12, 'bytes_accessed': 2e11}, chip, per_chip=2)
  # Per device: 50 TFLOP/s and 500 GB/s: 1 s of compute, 0.4 s of traffic.
  assert r == {'compute_s': 1.0, 'memory_s': 0.4, 'step_s': 1.0, 'bound': 'compute'}
  r = compile_plan.roofline({'flops': 1e12, 'bytes_accessed': 1e12}, chip, per_chip=1)
  assert r['bound'] == 'memory' and r['step_s'] == pytest.approx(1.0)


@pytest.fixture(scope='module')
def tiny_plan(devices, tmp_path_factory):
  del devices
  config = load_config('vit_fashion_mnist.py', 'runlocal')
  hlo_dir = str(tmp_path_factory.mktemp('hlo'))
  return config, compile_plan.plan(config, TOPOLOGY, programs=('train', 'eval'), hlo_dir=hlo_dir), hlo_dir


def test_tiny_config_plan_against_hand_counts(tiny_plan):
  config, out, _ = tiny_plan
  train = out['programs']['train']
  # Replicated (fsdp=1): every device holds the whole train state; the batch is split 4 ways.
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  s = train_lib.setup(config, steps_per_epoch=compile_plan.steps_per_epoch(config),
                      devices=jax.devices('cpu')[:1])
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params))
  state_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  assert state_bytes >= 3 * 4 * n_params  # params, Adam's mu and nu in float32 (and more).
  batch = [(8, 28, 28, 1), (8,)]  # 32 images (float32) and int32 labels over 4 devices
  exact = state_bytes + sum(4 * math.prod(shape) for shape in batch)
  # TPU layouts tile the last two axes by (8, 128) 32-bit words (rank < 2 as one row): the
  # arguments take at least the exact bytes and at most every leaf padded to whole tiles.
  shapes = [tuple(x.shape) for x in jax.tree.leaves(s.abstract_state)] + batch
  padded = sum(4 * math.prod(sh[:-2]) * -(-(sh[-2] if len(sh) > 1 else 1) // 8) * 8 *
               -(-(sh[-1] if sh else 1) // 128) * 128 for sh in shapes)
  assert exact <= train['argument_bytes'] <= padded, (exact, train['argument_bytes'], padded)
  assert out['devices'] == 4 and out['chips'] == 4 and out['per_device_batch'] == 8
  assert out['total_steps'] == 20 and out['hbm_per_device_bytes'] == 16e9
  assert train['flops'] >= out['model_flops_per_device']  # The recipe adds work, never removes it.
  assert out['mfu'] == pytest.approx(out['model_flops_per_device'] / (train['step_s'] * 197e12))
  assert out['examples_per_s'] == pytest.approx(32 / train['step_s'])
  assert out['run_wall_s'] >= 20 * train['step_s']
  assert out['run_chip_hours'] == pytest.approx(out['run_wall_s'] / 3600 * 4)


def test_model_flops_against_a_hand_count_of_the_matmuls(tiny_plan):
  """The dense model's FLOPs per device: at least the matmuls' 3 x 2 x MACs (forward, input and
  weight gradients) of ViT mu/14 at batch 8 per device, and not far above (elementwise work)."""
  _, out, _ = tiny_plan
  tokens = (28 // 14) ** 2  # 4 patches, GAP pooling (no class token)
  block = tokens * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256) + 2 * tokens * tokens * 64
  macs = tokens * 14 * 14 * 1 * 64 + 4 * block + 64 * 10  # patch embedding, 4 blocks, head
  matmuls = 3 * 2 * macs * 8
  assert matmuls <= out['model_flops_per_device'] <= 1.5 * matmuls, (out['model_flops_per_device'], matmuls)


def test_a_plan_that_does_not_fit_names_the_levers(devices):
  del devices
  config = load_config('vit_fashion_mnist.py', 'runlocal')
  config.batch_size = 2**24  # 4 M examples of 28 x 28 x 1 per device: 13 GB of images alone.
  config.eval_batch_size = 4
  with pytest.raises(compile_plan.DoesNotFit, match=r'fsdp.*remat.*per-device batch'):
    compile_plan.plan(config, TOPOLOGY, programs=('train',))


def test_compile_mode_without_topology_is_one_line():
  with pytest.raises(SystemExit) as e:
    main_lib.run('compile', load_config('vit_fashion_mnist.py', 'runlocal'), '/nonexistent', [])
  assert 'needs --topology' in str(e.value.code)


def test_unknown_topology_is_a_clear_error():
  with pytest.raises(ValueError, match='does not know this topology'):
    compile_plan.topology_devices('v9x:1x1')


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.sys.prefix, 'cuda', 'jax_plugins')),
                    reason='GPU plans need jax\'s CUDA plugin: bash scripts/setup.sh --gpu (5 GB).')
def test_gpu_node_matmul_figures_are_the_hand_count():
  """An 8-GPU H100 node without a GPU: x (8192 x 4096, bf16) split by rows over 8 devices times a
  replicated w (4096 x 4096): per device 2 * 1024 * 4096 * 4096 FLOPs, arguments by hand."""
  devices = compile_plan.topology_devices('h100:8')
  assert len(devices) == 8 and devices[0].device_kind == 'NVIDIA H100 80GB HBM3'
  mesh = jax.sharding.Mesh(np.asarray(devices), ('d',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d', None))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16, sharding=rows)
  w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=rep)
  compiled = jax.jit(lambda x, w: x @ w, out_shardings=rows).lower(x, w).compile()
  fig = compile_plan.compiled_figures(compiled)
  assert fig['flops'] == 2 * 1024 * 4096 * 4096
  assert fig['argument_bytes'] == 2 * (1024 * 4096 + 4096 * 4096)
  assert fig['output_bytes'] == 2 * 1024 * 4096


def test_the_optimised_hlo_is_written_and_attributed(tiny_plan):
  """Each compiled program's HLO lands in the workdir; scripts/hlo_bytes reads it and names
  the ViT's matmuls, and its count over every memory space is of the order of XLA's (which
  pads this tiny model's 64-wide arrays to 128-lane tiles)."""
  from experiments import hlo_bytes  # pylint: disable=g-import-not-at-top
  _, out, hlo_dir = tiny_plan
  for program in ('train', 'eval'):
    path = os.path.join(hlo_dir, f'{program}_{TOPOLOGY.replace(":", "_")}.hlo.txt.gz')
    t = hlo_bytes.traffic(hlo_bytes._read(path), spaces=None)  # pylint: disable=protected-access
    total = sum(t['op'].values())
    xla = out['programs'][program]['bytes_accessed']
    assert 0.2 * xla <= total <= xla, (program, total, xla)
    # The plan's HBM-only figure is the same count over HBM (no conditional in this step).
    hbm = hlo_bytes.traffic(hlo_bytes._read(path))['space']['HBM']  # pylint: disable=protected-access
    assert out['programs'][program]['hlo_hbm_bytes'] == hbm and 0 < hbm < total
    assert out['programs'][program]['hlo_hbm_bytes_by_branch'] == {'': hbm}
    by_kind = out['programs'][program]['hlo_hbm_bytes_by_kind']
    assert sum(by_kind.values()) == pytest.approx(hbm) and by_kind['collective'] > 0  # The batch is split 4 ways.
    assert any('encoderblock_*' in k and k.endswith('dot_general') for k in t['op']), list(t['op'])[:20]


def test_compile_mode_leaves_a_persistent_compilation_cache_alone(tmp_path, monkeypatch):
  """An AOT executable cannot be loaded back, so compile mode turns a user's JAX cache off before
  it compiles anything; the control, the same compile without that call, is cached."""
  code = '''
import os, sys, jax, jax.numpy as jnp
from experiments import compile_plan
if sys.argv[2] == 'off':
  compile_plan.no_persistent_cache()
jax.jit(lambda a: jnp.sin(a) @ a)(jnp.ones((64, 64))).block_until_ready()
print(len(os.listdir(sys.argv[1])))
'''
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  counts = {}
  for arm in ('off', 'on'):
    cache = tmp_path / arm
    cache.mkdir()
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PLATFORMS='cpu',
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    counts[arm] = int(subprocess.run([sys.executable, '-c', code, str(cache), arm], cwd=root, env=env,
                                     check=True, capture_output=True, text=True).stdout.split()[-1])
  assert counts['off'] == 0 and counts['on'] >= 1, counts
  # And run() calls it before the first plan.
  calls = []

  def first_plan(*args, **kwargs):
    calls.append('plan')
    raise KeyboardInterrupt  # Stops run() there.

  monkeypatch.setattr(compile_plan, 'no_persistent_cache', lambda: calls.append('off'))
  monkeypatch.setattr(compile_plan, 'plan', first_plan)
  with pytest.raises(KeyboardInterrupt):
    compile_plan.run(None, str(tmp_path), ['v5e:2x2'])
  assert calls == ['off', 'plan']
