"""Multi-device and multi-process training through the real entry point give the single-device result.

Each test runs ``python -m experiments.main`` on a tiny synthetic Fashion-MNIST
(written here as gzipped idx files) and compares, with a run on one CPU device:
the loss of every step (``metrics.jsonl``), the final evaluation, and the whole
train state of the last checkpoint (restored onto one device here).

* 8 fake CPU devices on a ``data=4, fsdp=2`` mesh, in one process.
* 2 processes on localhost (``jax.distributed`` with gloo CPU collectives), one
  CPU device each, on a ``data=1, fsdp=2`` mesh: parameters and optimizer state
  are sharded across the processes, which share one workdir as on a pod.

The single-device reference runs in the background while the distributed runs
go on: XLA compiles on one core, and the machine has two. Every run has a
deadline, so a collective that deadlocks fails the test instead of hanging it.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/vit_fashion_mnist.py:runlocal'
STEPS = 6
NUM_TRAIN, NUM_TEST = 256, 64
TIMEOUT = 300  # Seconds per run: ample on 2 busy cores; a deadlock fails instead of hanging.
IDX_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
             'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}


# ----------------------------------------------------------------------------- data

def _idx_bytes(array: np.ndarray) -> bytes:
  """The idx encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian uint32 sizes, data."""
  return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes()


def _write_source(folder) -> str:
  """Learnable 28x28 images: class k brightens rows 2k..2k+2 of uniform noise."""
  rng = np.random.default_rng(0)
  for split, n in (('train', NUM_TRAIN), ('test', NUM_TEST)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(labels):
      images[i, 2 * k:2 * k + 3, :] += 150
    for stem, array in zip(IDX_FILES[split], (images, labels)):
      with open(os.path.join(folder, stem + '.gz'), 'wb') as f:
        f.write(gzip.compress(_idx_bytes(array)))
  return str(folder)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> tuple[str, str]:
  """(source_dir, data_dir) with nm_fashion_mnist already built.

  Built once, before any run, as before a multi-host job: processes that find it
  missing would all build it into the one data_dir at once, and all but one fail.
  """
  from experiments.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  source = _write_source(tmp_path_factory.mktemp('fmnist_source'))
  data_dir = str(tmp_path_factory.mktemp('fmnist_tfds'))
  fashion_mnist.prepare(data_dir, source)
  return source, data_dir


# ----------------------------------------------------------------------------- runs

def _env(devices: int = 1, **extra: str) -> dict[str, str]:
  """The session's environment without its device settings; ``devices`` fake CPU devices. XLA_FLAGS
  keeps only the session's optimisation level (conftest: fast compiles), the same for every run."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES', 'JAX_PLATFORMS', 'NMSPARSE_DISTRIBUTED')}
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split() if f.startswith('--xla_backend_optimization_level')]
  if devices > 1:
    flags.append(f'--xla_force_host_platform_device_count={devices}')
  if flags:
    env['XLA_FLAGS'] = ' '.join(flags)
  return env | {'JAX_PLATFORMS': 'cpu', 'PYTHONUNBUFFERED': '1'} | extra


def _args(dataset, workdir, *extra: str) -> list[str]:
  source, data_dir = dataset
  return [f'--config={CONFIG}', f'--workdir={workdir}',
          f'--config.data.source_dir={source}', f'--config.data.data_dir={data_dir}',
          f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
          '--config.eval_every_steps=1000', '--config.diagnostics_every_steps=0',
          '--config.batch_size=32', '--config.eval_batch_size=32', *extra]


class Job:
  """``python -m experiments.main ARGS`` in its own session (so it can be killed whole), logs to files."""

  def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir):
    self.name = name
    self.stdout_path = os.path.join(log_dir, f'{name}.stdout')
    self.stderr_path = os.path.join(log_dir, f'{name}.stderr')
    self.deadline = time.monotonic() + TIMEOUT
    with open(self.stdout_path, 'w') as out, open(self.stderr_path, 'w') as err:
      self.proc = subprocess.Popen([sys.executable, '-m', 'experiments.main', *args], cwd=REPO, env=env,
                                   stdout=out, stderr=err, start_new_session=True)

  def kill(self) -> None:
    if self.proc.poll() is None:
      os.killpg(self.proc.pid, signal.SIGKILL)  # Its own process group: only what this job started.
    self.proc.wait()

  def stdout(self) -> str:
    with open(self.stdout_path) as f:
      return f.read()

  def stderr(self) -> str:
    with open(self.stderr_path, errors='replace') as f:
      return f.read()

  def report(self) -> str:
    return f'--- {self.name} (exit {self.proc.returncode}) stderr tail:\n{self.stderr()[-4000:]}'


def wait_all(*jobs: Job) -> None:
  """Waits for every job; the first failure or deadline kills the others and fails the test."""
  try:
    while True:
      codes = [job.proc.poll() for job in jobs]
      if any(code not in (None, 0) for code in codes):
        raise AssertionError('a run failed:\n' + '\n'.join(j.report() for j in jobs if j.proc.poll()))
      if all(code == 0 for code in codes):
        return
      late = [job for job, code in zip(jobs, codes) if code is None and time.monotonic() > job.deadline]
      if late:
        for job in jobs:
          job.kill()
        raise AssertionError(f'timed out after {TIMEOUT} s (a deadlocked collective?):\n'
                             + '\n'.join(job.report() for job in late))
      time.sleep(0.2)
  finally:
    for job in jobs:
      job.kill()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


# ----------------------------------------------------------------------------- results

def train_losses(workdir) -> dict[int, float]:
  """``train/loss`` by step; a step logged twice (a second writer) fails."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for record in map(json.loads, f):
      if 'train/loss' in record:
        assert record['step'] not in losses, f'step {record["step"]} was logged twice'
        losses[record['step']] = record['train/loss']
  return losses


def final_metrics(workdir) -> dict[str, float]:
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f)


def final_state(workdir) -> dict:
  """The last checkpoint's train state, restored onto this process's first device."""
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',),
                             item_handlers={'state': ocp.StandardCheckpointHandler()}) as mngr:
    assert mngr.all_steps() == [STEPS]
    metadata = mngr.item_metadata(STEPS)['state']
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), metadata)
    restored = mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  return jax.tree.map(np.asarray, restored['state'])


class Reference:
  """The single-device run, started at once; ``result()`` waits for it (once)."""

  def __init__(self, dataset, workdir: str, log_dir):
    self.workdir = workdir
    self.job = Job('one_device', _args(dataset, workdir), _env(), log_dir)
    self._result = None

  def result(self) -> tuple[dict, dict, dict]:
    if self._result is None:
      wait_all(self.job)
      self._result = (train_losses(self.workdir), final_metrics(self.workdir), final_state(self.workdir))
    return self._result


@pytest.fixture(scope='module')
def reference(dataset, tmp_path_factory):
  ref = Reference(dataset, str(tmp_path_factory.mktemp('one_device') / 'work'),
                  tmp_path_factory.mktemp('one_device_logs'))
  yield ref
  ref.job.kill()


def assert_same_run(workdir, reference: Reference) -> None:
  ref_losses, ref_final, ref_state = reference.result()
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(ref_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-4, err_msg='train/loss')
  final = final_metrics(workdir)
  assert final['step'] == ref_final['step'] == STEPS
  assert final['eval_examples'] == ref_final['eval_examples'] == NUM_TEST
  for key in ('eval_accuracy', 'hard_accuracy', 'sparsity', 'nm_valid'):
    assert final[key] == ref_final[key], key  # Counts over 64 examples / exact mask statistics.
  for key in ('eval_loss', 'hard_loss'):
    assert final[key] == pytest.approx(ref_final[key], rel=1e-4), key
  # Params, Adam moments and sparsity state: everything a resumed run would continue from.
  state = final_state(workdir)
  assert jax.tree.structure(state) == jax.tree.structure(ref_state)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(ref_state)):
    assert a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------- tests

def test_eight_devices_data_fsdp_mesh_matches_one_device(dataset, reference, tmp_path):
  work = str(tmp_path / 'work')
  job = Job('eight_devices', _args(dataset, work, '--config.mesh.data=4', '--config.mesh.fsdp=2'),
            _env(devices=8), tmp_path)
  wait_all(job)
  assert "{'data': 4, 'fsdp': 2}" in job.stderr()  # The mesh of the run's overview log.
  assert_same_run(work, reference)


def test_two_processes_match_one_device(dataset, reference, tmp_path):
  work = str(tmp_path / 'work')  # One workdir for both, as on a pod's shared filesystem.
  port = free_port()
  jobs = [Job(f'process_{i}', _args(dataset, work, '--config.mesh.data=1', '--config.mesh.fsdp=2',
                                    f'--coordinator_address=localhost:{port}', '--num_processes=2',
                                    f'--process_id={i}'),
              _env(JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo'), tmp_path)
          for i in range(2)]
  wait_all(*jobs)
  for job in jobs:
    assert "{'data': 1, 'fsdp': 2}" in job.stderr()
  # Only process 0 reports: the final line, metrics.jsonl (no step twice), final_metrics.json.
  assert 'eval_accuracy=' in jobs[0].stdout()
  assert 'eval_accuracy=' not in jobs[1].stdout()
  # The checkpoint holds FSDP shards written by both processes; it restores whole onto one device.
  assert_same_run(work, reference)
