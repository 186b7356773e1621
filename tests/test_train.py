"""The training system end to end with tiny configs, in process where no signal or kill is involved.

Checks resume bit for bit after SIGKILL, a clean stop on SIGTERM, a resume refused (with the
workdir untouched) for another model, sparsity setting or run length, an evaluation that reads
the run length from the checkpoint, and a clear error for each kind of bad input, raised before
anything is compiled or written.
"""

import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from configs import vit_fashion_mnist
from conftest import ROOT
from experiments import checkpoints
from experiments import evaluate as evaluate_lib
from experiments import main as main_lib
from experiments import train as train_lib

CONFIG = 'configs/vit_fashion_mnist.py:runlocal'
# The trained run every resume/evaluate test copies: 1 epoch of the 256 fake images at batch 32.
# diagnostics_points=3 over 8 steps: a diagnostics step every 8 // 3 = 2 steps and the last.
TRAINED = {'total_steps': None, 'total_epochs': 1.0, 'checkpoint_every_steps': 4, 'diagnostics_points': 3}
STEPS = 8


def base_args(source, workdir, *extra):
  return [f'--config={CONFIG}', f'--workdir={workdir}', f'--config.data.source_dir={source}',
          f'--config.data.data_dir={os.path.join(os.path.dirname(workdir), "tfds")}', *extra]


def make_config(source, data_dir, **overrides) -> ml_collections.ConfigDict:
  """``configs/vit_fashion_mnist.py:runlocal`` on the fake data, with ``{'a.b': value}`` overrides, locked."""
  config = vit_fashion_mnist.get_config('runlocal')
  config.data.source_dir, config.data.data_dir = source, data_dir
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


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


def snapshot(root):
  """Every file and folder under ``root`` with its size, mtime and bytes."""
  out = {}
  for folder, dirs, files in os.walk(root):
    out.update({os.path.join(folder, d): 'dir' for d in dirs})
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[path] = (os.stat(path).st_size, os.stat(path).st_mtime_ns, f.read())
  return out


class Messages(logging.Handler):
  def __init__(self):
    super().__init__(logging.INFO)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _shared_dir(tmp_path_factory):
  """A folder that every pytest-xdist worker of this session shares (the session's own without xdist)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@pytest.fixture(scope='module')
def trained(fmnist_source, tmp_path_factory):
  """One in-process run of STEPS steps (checkpoints 4 and 8): ``(workdir, final metrics, log lines)``.

  Trained once per session: under xdist, the first worker trains and the others wait for it.
  """
  shared = _shared_dir(tmp_path_factory) / 'test_train_trained'
  shared.mkdir(exist_ok=True)
  workdir, result = str(shared / 'run'), shared / 'result.json'
  with open(shared / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not result.exists():
      messages = Messages()
      root = logging.getLogger()
      level = root.level
      root.addHandler(messages)
      root.setLevel(logging.INFO)
      try:
        final = train_lib.train_and_evaluate(make_config(fmnist_source, str(shared / 'tfds'), **TRAINED), workdir)
      finally:
        root.removeHandler(messages)
        root.setLevel(level)
      result.write_text(json.dumps({'final': final, 'lines': messages.lines}))
  out = json.loads(result.read_text())
  return workdir, out['final'], out['lines']


@pytest.fixture
def copy_of_trained(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  return workdir


def test_train_writes_metrics_config_and_environment(trained):
  work, returned, lines = trained
  final = json.load(open(os.path.join(work, 'final_metrics.json')))
  assert final['step'] == STEPS and final['nm_valid'] == 1.0
  # MLP kernels at 1:8 are 87.5 % of the sparsified entries.
  assert final['sparsity'] == pytest.approx(0.875)
  assert final['eval_examples'] == 64
  assert {k: v for k, v in final.items() if k != 'environment'} == returned
  keys = set().union(*read_metrics(work))
  for key in ('train/loss', 'sparsity/decay', 'sparsity/mask_flip_rate', 'grad/pruned_grad_norm',
              'grad/kept_grad_norm', 'sparsity/nm_valid', 'sparsity/achieved'):
    assert key in keys, key
  # Diagnostics steps start at steps 0, 2, 4, 6 and the last (7); metrics are logged after them.
  assert [r['step'] for r in read_metrics(work) if 'sparsity/mask_flip_rate' in r] == [1, 3, 5, 7, 8]
  assert os.listdir(os.path.join(work, 'tb')), 'TensorBoard event files'
  assert json.load(open(os.path.join(work, 'config.json')))['sparsity']['nm'] == '1:8'
  assert any('ETA' in line and 'steps/s' in line for line in lines)
  assert sorted(int(d) for d in os.listdir(os.path.join(work, 'checkpoints')) if d.isdigit()) == [4, 8]
  # The environment is recorded beside the run and inside its final metrics.
  env = json.load(open(os.path.join(work, 'environment.json')))
  assert final['environment'] == env
  assert set(env['packages']) >= {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
                                  'tensorflow-datasets', 'numpy', 'ml_collections'}
  assert env['packages']['jax'] and env['packages']['orbax-checkpoint']
  assert len(env['nmsparse']['commit']) == 40 and isinstance(env['nmsparse']['dirty'], bool)
  assert env['jax']['device_kind'] and 'XLA_FLAGS' in env and env['cpu']['model']


def test_evaluate_reads_the_run_length_from_the_checkpoint(trained, copy_of_trained, fmnist_source, data_dir,
                                                           monkeypatch):
  # The train split is not read (a broken one does not matter): steps_per_epoch comes from the
  # checkpoint, so schedules are those of the trained run, and the metrics are the run's own.
  built = []
  real_setup = train_lib.setup
  monkeypatch.setattr(train_lib, 'setup', lambda c, **kw: built.append(kw) or real_setup(c, **kw))
  config = make_config(fmnist_source, data_dir, train_split='no_such_split', **TRAINED)
  metrics = evaluate_lib.evaluate_and_export(config, copy_of_trained)
  assert built == [{'steps_per_epoch': STEPS}]
  final = trained[1]
  assert metrics['step'] == STEPS
  assert metrics['hard_accuracy'] == pytest.approx(final['hard_accuracy'])
  assert metrics['eval_accuracy'] == pytest.approx(final['eval_accuracy'])
  report = json.load(open(os.path.join(copy_of_trained, 'export', 'size_report.json')))
  assert report['compressed_bytes'] < report['dense_bytes']
  assert os.path.exists(os.path.join(copy_of_trained, 'export', 'model_nm.npz'))
  assert 'environment' in json.load(open(os.path.join(copy_of_trained, 'eval_metrics.json')))


def test_a_held_out_test_split_is_evaluated_once_at_the_end(fmnist_source, data_dir, tmp_path):
  # Model selection: train on half the (256-image) train split, evaluate on the other half during
  # the run, and the final model once on the test split (64 images). The test figures must be those
  # that --mode=evaluate computes from the saved checkpoint with eval_split='test'.
  workdir = str(tmp_path / 'run')
  splits = {'train_split': 'train[:50%]', 'eval_split': 'train[50%:]', 'test_split': 'test'}
  final = train_lib.train_and_evaluate(
      make_config(fmnist_source, data_dir, total_steps=None, total_epochs=1.0, **splits), workdir)
  assert final['step'] == 4  # 128 train images at batch 32.
  assert final['eval_examples'] == 128 and final['test_examples'] == 64
  on_disk = json.load(open(os.path.join(workdir, 'final_metrics.json')))
  assert on_disk['test_accuracy'] == final['test_accuracy']
  again = evaluate_lib.evaluate_and_export(
      make_config(fmnist_source, data_dir, total_steps=None, total_epochs=1.0,
                  **(splits | {'eval_split': 'test', 'test_split': None})), workdir)
  assert again['eval_examples'] == 64
  assert final['test_accuracy'] == pytest.approx(again['eval_accuracy'])
  assert final['test_loss'] == pytest.approx(again['eval_loss'], rel=1e-5)
  assert final['test_hard_accuracy'] == pytest.approx(again['hard_accuracy'])
  assert not any(k.startswith('eval/') and 'test' in k for row in read_metrics(workdir) for k in row)


@pytest.mark.parametrize('splits,which', [
    ({'eval_split': 'train[50%:]', 'test_split': 'train[50%:]'}, 'eval_split'),
    ({'test_split': 'train'}, 'train_split'),
])
def test_a_test_split_that_is_trained_or_selected_on_is_refused(fmnist_source, data_dir, tmp_path, monkeypatch,
                                                                splits, which):
  monkeypatch.setattr(train_lib, 'make_train_step', _no_compilation)
  workdir = tmp_path / 'bad'
  with pytest.raises(ValueError, match=f'config.test_split .* is also config.{which}'):
    train_lib.train_and_evaluate(make_config(fmnist_source, data_dir, **splits), str(workdir))
  assert not workdir.exists()


def test_evaluate_refuses_a_config_of_another_run_length(copy_of_trained, fmnist_source, data_dir):
  before = snapshot(copy_of_trained)
  config = make_config(fmnist_source, data_dir, **(TRAINED | {'total_epochs': 2.0}))
  with pytest.raises(checkpoints.RunLengthMismatch, match=f'total_steps={STEPS}, this config gives total_steps=16'):
    evaluate_lib.evaluate_and_export(config, copy_of_trained)
  assert snapshot(copy_of_trained) == before


@pytest.mark.parametrize('overrides,error,message', [
    # Another model in the same workdir: named parameter shapes, not a silent restart from step 0.
    ({'model.variant': 'mu/7'}, checkpoints.StructureMismatch,
     '(6 differences: params/embedding/kernel: checkpoint float32[14, 14, 1, 64] vs model float32[7, 7, 1, 64]; '
     'params/pos_embedding: checkpoint float32[1, 4, 64] vs model float32[1, 16, 64]; opt_state/'),
    ({'sparsity.nm': '1:16'}, checkpoints.SparsityMismatch, 'nm: checkpoint "1:8" vs now "1:16"'),
    ({'total_epochs': 2.0}, checkpoints.RunLengthMismatch,
     f'total_steps={STEPS}, this config gives total_steps=16'),
])
def test_resume_of_another_run_is_refused_and_the_workdir_untouched(copy_of_trained, fmnist_source, data_dir,
                                                                     monkeypatch, overrides, error, message):
  monkeypatch.setattr(train_lib, 'make_train_step', _no_compilation)
  before = snapshot(copy_of_trained)
  with pytest.raises(error) as e:
    train_lib.train_and_evaluate(make_config(fmnist_source, data_dir, **(TRAINED | overrides)), copy_of_trained)
  assert message in str(e.value)
  assert snapshot(copy_of_trained) == before  # Not even config.json is rewritten.


def test_unreadable_latest_checkpoint_falls_back_and_is_replaced(copy_of_trained, fmnist_source, data_dir, caplog):
  for root, _, files in os.walk(os.path.join(copy_of_trained, 'checkpoints', str(STEPS), 'state')):
    for name in files:
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  config = make_config(fmnist_source, data_dir, **TRAINED, diagnostics_every_steps=0)  # 0: one step to compile.
  with caplog.at_level(logging.INFO):
    final = train_lib.train_and_evaluate(config, copy_of_trained)
  assert any(f'checkpoint {STEPS}' in r.getMessage() and 'unreadable' in r.getMessage() for r in caplog.records)
  assert any('resumed from checkpoint 4' in r.getMessage() for r in caplog.records)
  assert final['step'] == STEPS
  assert len(dict(leaves(final_state(copy_of_trained, STEPS)))) > 10  # The replaced checkpoint reads.


def _no_compilation(*args, **kwargs):
  raise AssertionError('a train step was built: the bad input was not caught before compilation')


def parse(argv, monkeypatch, capsys):
  """``main.parse_flags`` on fresh flags; returns (exit code, stderr)."""
  monkeypatch.setattr(sys, 'argv', argv)  # ml_collections reads --config.* overrides from sys.argv.
  monkeypatch.chdir(ROOT)
  flag_values = flags.FlagValues()
  main_lib.define_flags(flag_values)
  with pytest.raises(SystemExit) as e:
    main_lib.parse_flags(argv, flag_values)
  return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize('args,message', [
    ((f'--config={CONFIG},nm=5:4',), 'Invalid N:M pattern 5:4'),
    ((f'--config={CONFIG},recipee=srste',), "Unknown config argument 'recipee'"),
    ((f'--config={CONFIG}', '--config.totl_steps=5'), 'no field \'totl_steps\'. Did you mean "total_steps"'),
    ((f'--config={CONFIG}', '--config.sparsity.recipe.srste_lamda=1e-3'), 'srste_lamda'),
    ((f'--config={CONFIG}', '--config.modl.name=x'), 'no field \'modl\''),
    (('--config=configs/nope.py',), "--config=configs/nope.py: cannot load the config file ([Errno 2] No such file"),
    (('--config=configs/nope.py', '--config.total_steps=5'), 'cannot load the config file'),
    ((f'--config={CONFIG}', '--config.total_steps=abc'), 'total_steps=abc'),
    ((f'--config={CONFIG},recipe=mdgff',), "Unknown recipe 'mdgff'"),
    ((f'--config={CONFIG}', '--config.sparsity.recipe.name=mdgff'), "Unknown recipe 'mdgff'"),
    ((f'--config={CONFIG}', '--config.sparsity.recipe.decay.final=2.0'), 'decay needs final'),
    ((f'--config={CONFIG}', '--config.sparsity.recipe.finetune_mask=freeze'), "finetune_mask='freeze'"),
])
def test_flag_errors_print_one_line_and_create_nothing(tmp_path, monkeypatch, capsys, args, message):
  workdir = tmp_path / 'work'
  code, err = parse(['main', *args, f'--workdir={workdir}'], monkeypatch, capsys)
  assert code == 1
  assert err.startswith('FATAL Flags parsing error: ') and err.count('\n') == 1, err
  assert message in err, err
  assert not workdir.exists()


def test_good_flags_parse(tmp_path, monkeypatch):
  argv = ['main', f'--config={CONFIG}', '--config.total_steps=5', f'--workdir={tmp_path}']
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(sys, 'argv', argv)
  flag_values = flags.FlagValues()
  holders = main_lib.define_flags(flag_values)
  assert main_lib.parse_flags(argv, flag_values) == ['main']
  assert holders['config'].value.total_steps == 5


@pytest.mark.parametrize('overrides,message', [
    ({'sparsity.recipe.name': 'sr-ste'}, "Unknown recipe 'sr-ste'"),
    ({'sparsity.nm': '1:128'}, 'not divisible by M=128'),
    ({'data.name': 'cifar10'}, 'cifar10'),
    ({'mesh.data': 3}, 'mesh.data'),
])
def test_bad_inputs_fail_before_compiling_or_writing(fmnist_source, data_dir, tmp_path, monkeypatch, overrides,
                                                     message):
  monkeypatch.setattr(train_lib, 'make_train_step', _no_compilation)
  monkeypatch.setattr(train_lib, 'create_state', _no_compilation)
  workdir = tmp_path / 'bad'
  with pytest.raises((ValueError, FileNotFoundError)) as e:
    train_lib.train_and_evaluate(make_config(fmnist_source, data_dir, **overrides), str(workdir))
  assert message in str(e.value)
  assert not workdir.exists()


def test_nan_loss_aborts_with_the_step_range(fmnist_source, data_dir, tmp_path):
  config = make_config(fmnist_source, data_dir, total_steps=12, diagnostics_every_steps=0,
                       **{'optimizer.lr': 1e30, 'optimizer.clip': 0.0})
  with pytest.raises(FloatingPointError, match=r'diverged in steps \('):
    train_lib.train_and_evaluate(config, str(tmp_path / 'nan'))


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


def test_sigkill_and_resume_gives_identical_params(fmnist_source, data_dir, tmp_path, caplog):
  extra = ('--config.total_steps=16', '--config.checkpoint_every_steps=4',
           '--config.sparsity.recipe.name=srste')
  straight = str(tmp_path / 'straight')  # In process: the same program as the command line's.
  config = make_config(fmnist_source, data_dir, total_steps=16, checkpoint_every_steps=4,
                       **{'sparsity.recipe.name': 'srste'})
  train_lib.train_and_evaluate(config, straight)
  killed = str(tmp_path / 'killed')
  args = base_args(fmnist_source, killed, *extra, f'--config.data.data_dir={data_dir}')  # Prepared above.
  proc = subprocess.Popen([sys.executable, '-m', 'experiments.main', *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_checkpoint(os.path.join(killed, 'checkpoints'), 8, proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not os.path.exists(os.path.join(killed, 'final_metrics.json'))
  with caplog.at_level(logging.INFO):  # The resume in process: the same program as the command line's.
    train_lib.train_and_evaluate(config, killed)
  assert any(r.getMessage().startswith('resumed from checkpoint') for r in caplog.records)
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
  # The CPU run's log names no TPU: JAX's probe of the backends it cannot start is dropped.
  assert 'JAX_PLATFORMS' not in os.environ, 'the probe is only made with JAX_PLATFORMS unset'
  assert not re.search(r'\b(lib)?tpu\b|Unable to initialize backend', err, re.IGNORECASE), err[:3000]
  steps = [int(d) for d in os.listdir(os.path.join(work, 'checkpoints')) if d.isdigit()]
  assert steps and 0 < max(steps) < 400


def test_refused_resume_exits_with_one_line(copy_of_trained, fmnist_source, data_dir):
  config = make_config(fmnist_source, data_dir, **(TRAINED | {'sparsity.nm': '1:16'}))
  with pytest.raises(SystemExit) as e:
    main_lib.run('train', config, copy_of_trained)
  assert e.value.code.startswith(f'FATAL SparsityMismatch: The checkpoint at step {STEPS}')
  assert '\n' not in e.value.code


def test_a_resume_under_another_environment_is_logged(tmp_path, caplog):
  config = ml_collections.ConfigDict({'x': 1})
  before = {'python': '3.12.1', 'packages': {'jax': '0.1'}}
  train_lib.write_run_files(str(tmp_path), config, before)
  with caplog.at_level(logging.WARNING):
    train_lib.write_run_files(str(tmp_path), config, before | {'packages': {'jax': '0.2'}})
  [record] = [r for r in caplog.records if 'another environment' in r.getMessage()]
  assert "'packages': {'before': {'jax': '0.1'}, 'now': {'jax': '0.2'}}" in record.getMessage()
  assert 'python' not in record.getMessage()
  assert json.load(open(tmp_path / 'environment.json'))['packages'] == {'jax': '0.2'}
  assert json.load(open(tmp_path / 'config.json')) == {'x': 1}


@pytest.mark.parametrize('every,points,total,want', [
    (50, None, 1000, 50), (0, None, 1000, 0), (None, None, 1000, 0),
    (50, 60, 2340, 39), (None, 60, 468, 7), (None, 60, 40, 1), (5, 8, 8, 1)])
def test_diagnostics_every_from_points_by_hand(every, points, total, want):
  config = ml_collections.ConfigDict(dict(diagnostics_every_steps=every, diagnostics_points=points))
  assert train_lib.diagnostics_every(config, total) == want


def test_negative_diagnostics_points_is_an_error():
  config = ml_collections.ConfigDict(dict(diagnostics_every_steps=50, diagnostics_points=-3))
  with pytest.raises(ValueError, match='diagnostics_points=-3'):
    train_lib.diagnostics_every(config, 100)
