"""The training system end to end through the real entry point, with tiny configs.

Checks resume bit for bit after SIGKILL, a clean stop on SIGTERM, and a clear
error for each kind of bad input, raised before anything is compiled.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, run_main

CONFIG = 'configs/vit_fashion_mnist.py:runlocal'


def base_args(source, workdir, *extra):
  return [f'--config={CONFIG}', f'--workdir={workdir}', f'--config.data.source_dir={source}',
          f'--config.data.data_dir={os.path.join(os.path.dirname(workdir), "tfds")}', *extra]


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def final_state(workdir, step):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',)) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def leaves(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in sorted(tree.items()):
      yield from leaves(v, f'{prefix}/{k}')
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from leaves(v, f'{prefix}/{i}')
  else:
    yield prefix, np.asarray(tree)


def test_train_then_evaluate_and_export(fmnist_source, tmp_path):
  work = str(tmp_path / 'run')
  out = run_main(base_args(fmnist_source, work, '--config.total_steps=12'))
  final = json.load(open(os.path.join(work, 'final_metrics.json')))
  assert final['step'] == 12 and final['nm_valid'] == 1.0
  # MLP kernels at 1:8 are 87.5 % of the sparsified entries.
  assert final['sparsity'] == pytest.approx(0.875)
  assert final['eval_examples'] == 64
  assert 'eval_accuracy=' in out.stdout
  metrics = read_metrics(work)
  keys = set().union(*metrics)
  for key in ('train/loss', 'sparsity/decay', 'sparsity/mask_flip_rate', 'grad/pruned_grad_norm',
              'grad/kept_grad_norm', 'sparsity/nm_valid', 'sparsity/achieved'):
    assert key in keys, key
  assert os.listdir(os.path.join(work, 'tb')), 'TensorBoard event files'
  assert json.load(open(os.path.join(work, 'config.json')))['sparsity']['nm'] == '1:8'
  assert 'ETA' in out.stderr and 'steps/s' in out.stderr
  # Evaluate the checkpoint with its own step's masks, and export the N:M model.
  ev = run_main(base_args(fmnist_source, work, '--config.total_steps=12', '--mode=evaluate'))
  assert 'hard_accuracy=' in ev.stdout
  report = json.load(open(os.path.join(work, 'export', 'size_report.json')))
  assert report['compressed_bytes'] < report['dense_bytes']
  ev_metrics = json.load(open(os.path.join(work, 'eval_metrics.json')))
  assert ev_metrics['hard_accuracy'] == pytest.approx(final['hard_accuracy'])
  assert os.path.exists(os.path.join(work, 'export', 'model_nm.npz'))


def _wait_for_checkpoint(ckpt_dir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.isdir(os.path.join(ckpt_dir, str(step))):
      return
    if proc.poll() is not None:
      raise AssertionError(f'run ended before checkpoint {step}: {proc.stderr.read()[-3000:]}')
    time.sleep(0.2)
  proc.kill()
  raise AssertionError(f'no checkpoint {step} within {timeout} s')


def test_sigkill_and_resume_gives_identical_params(fmnist_source, tmp_path):
  extra = ('--config.total_steps=16', '--config.checkpoint_every_steps=4',
           '--config.sparsity.recipe.name=srste')
  straight = str(tmp_path / 'straight')
  run_main(base_args(fmnist_source, straight, *extra))
  killed = str(tmp_path / 'killed')
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.main', *base_args(fmnist_source, killed, *extra)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_checkpoint(os.path.join(killed, 'checkpoints'), 8, proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(os.path.join(killed, 'final_metrics.json'))
  out = run_main(base_args(fmnist_source, killed, *extra))
  assert 'resumed from checkpoint' in out.stderr
  a, b = dict(leaves(final_state(straight, 16))), dict(leaves(final_state(killed, 16)))
  assert a.keys() == b.keys() and len(a) > 10
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_sigterm_saves_and_stops(fmnist_source, tmp_path):
  work = str(tmp_path / 'term')
  args = base_args(fmnist_source, work, '--config.total_steps=400', '--config.checkpoint_every_steps=1000')
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.main', *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not os.path.exists(os.path.join(work, 'metrics.jsonl')) and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'stopped at step' in err
  steps = [int(d) for d in os.listdir(os.path.join(work, 'checkpoints')) if d.isdigit()]
  assert steps and 0 < max(steps) < 400


def test_corrupt_latest_checkpoint_falls_back_to_previous(fmnist_source, tmp_path):
  work = str(tmp_path / 'corrupt')
  extra = ('--config.total_steps=8', '--config.checkpoint_every_steps=4')
  run_main(base_args(fmnist_source, work, *extra))
  state_dir = os.path.join(work, 'checkpoints', '8', 'state')
  for root, _, files in os.walk(state_dir):
    for name in files:
      if name != '_METADATA' and not name.startswith('_'):
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  out = run_main(base_args(fmnist_source, work, '--config.total_steps=12', '--config.checkpoint_every_steps=4'))
  assert 'checkpoint 8' in out.stderr and 'corrupt' in out.stderr
  assert 'resumed from checkpoint 4' in out.stderr


def test_resume_with_other_sparsity_is_refused(fmnist_source, tmp_path):
  work = str(tmp_path / 'mismatch')
  run_main(base_args(fmnist_source, work, '--config.total_steps=4', '--config.checkpoint_every_steps=2'))
  out = run_main(base_args(fmnist_source, work, '--config.total_steps=8', '--config.sparsity.nm=1:16'),
                 check=False)
  assert out.returncode != 0
  assert 'another sparsity setting' in out.stderr and "nm: checkpoint \"1:8\" vs now \"1:16\"" in out.stderr


@pytest.mark.parametrize('extra,message', [
    (('--config.sparsity.recipe.name=sr-ste',), "Unknown recipe 'sr-ste'"),
    (('--config=configs/vit_fashion_mnist.py:runlocal,nm=5:4',), 'Invalid N:M pattern 5:4'),
    (('--config.sparsity.recipe.srste_lamda=1e-3',), 'srste_lamda'),
    (('--config.sparsity.nm=1:128',), 'not divisible by M=128'),
    (('--config.data.name=cifar10',), 'cifar10'),
    (('--config.mesh.data=3',), 'mesh.data'),
])
def test_bad_inputs_fail_fast_with_clear_errors(fmnist_source, tmp_path, extra, message):
  t0 = time.time()
  out = run_main(base_args(fmnist_source, str(tmp_path / 'bad'), *extra), check=False, timeout=300)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-3000:]
  assert 'Compiling' not in out.stderr
  assert time.time() - t0 < 120


def test_nan_loss_aborts_with_the_step_range(fmnist_source, tmp_path):
  out = run_main(base_args(fmnist_source, str(tmp_path / 'nan'), '--config.total_steps=12',
                           '--config.optimizer.lr=1e30', '--config.optimizer.clip=0.0'),
                 check=False)
  assert out.returncode != 0
  assert 'diverged in steps (' in out.stderr, out.stderr[-3000:]
