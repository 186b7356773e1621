"""``config.init_from``: a run starts from another run's params (fine-tuning), with clear errors."""

import os

import jax
import numpy as np
import pytest

from conftest import run_main_in_process
from experiments import init_from
from experiments import train as train_lib
from test_train import base_args, final_state, leaves, make_config, trained  # pylint: disable=unused-import


def test_merge_loads_matched_leaves_and_keeps_the_rest():
  params = {'enc': {'kernel': np.zeros((2, 3), np.float32)}, 'head': {'bias': np.ones(4, np.float32)}}
  source = {'enc/kernel': np.arange(6.0).reshape(2, 3), 'other/w': np.ones(1)}
  merged, loaded = init_from.merge(params, source, include='enc/.*')
  assert loaded == ['enc/kernel']
  np.testing.assert_array_equal(merged['enc']['kernel'], [[0, 1, 2], [3, 4, 5]])
  assert merged['enc']['kernel'].dtype == np.float32
  np.testing.assert_array_equal(merged['head']['bias'], np.ones(4))


@pytest.mark.parametrize('source,include,message', [
    ({'enc/kernel': np.zeros((2, 3))}, '.*', "not in the checkpoint, e.g. ['head/bias']"),
    ({'enc/kernel': np.zeros((3, 2)), 'head/bias': np.zeros(4)}, '.*',
     'enc/kernel: checkpoint (3, 2) vs model (2, 3)'),
    ({'enc/kernel': np.zeros((2, 3))}, 'decoder/.*', 'matches none'),
])
def test_merge_errors_name_the_parameter(source, include, message):
  params = {'enc': {'kernel': np.zeros((2, 3))}, 'head': {'bias': np.zeros(4)}}
  with pytest.raises(ValueError) as e:
    init_from.merge(params, source, include)
  assert message in str(e.value)


def test_resolve_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    init_from.resolve(str(tmp_path / 'nope'))
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    init_from.resolve(str(tmp_path))
  for step in (2, 4):
    os.makedirs(tmp_path / 'checkpoints' / str(step) / 'state')
  assert init_from.resolve(str(tmp_path)) == (str(tmp_path / 'checkpoints'), 4)
  assert init_from.resolve(str(tmp_path / 'checkpoints' / '2')) == (str(tmp_path / 'checkpoints'), 2)
  with pytest.raises(ValueError, match=r'it has steps \[2, 4\]'):
    init_from.resolve(str(tmp_path), 3)


def _params(workdir, step):
  return dict(leaves(final_state(workdir, step)['params']))


def test_fine_tune_starts_from_the_source_params(trained, fmnist_source, tmp_path, monkeypatch):
  """A 1-step lr-0 SR-STE run through the entry point's flags, loading the encoder from another run
  (test_train's trained MDGF run, shared by the session: a checkpoint written by the train loop),
  holds the source's params for every ``Transformer/`` leaf and the fresh seed-0 initialisation
  (``create_state`` of the same config without ``init_from``, what a run from scratch starts
  from) for the rest. All in process; no diagnostics step (not under test).
  """
  src, tuned = trained[0], str(tmp_path / 'tuned')
  _, src_step = init_from.resolve(src)  # The newest checkpoint: what init_from loads by default.
  frozen = dict(total_steps=1, diagnostics_every_steps=0, eval_every_steps=1000,
                **{'optimizer.lr': 0.0, 'sparsity.recipe.name': 'srste'})
  final = run_main_in_process(
      base_args(fmnist_source, tuned, *(f'--config.{k}={v}' for k, v in frozen.items()),
                f'--config.init_from.path={src}', '--config.init_from.include=Transformer/.*'), monkeypatch)
  assert final['step'] == 1
  fresh_setup = train_lib.setup(make_config(fmnist_source, str(tmp_path / 'tfds'), **frozen), steps_per_epoch=8)
  fresh = dict(leaves(jax.device_get(train_lib.create_state(fresh_setup, jax.random.key(0)).params)))
  a, b, c = _params(src, src_step), _params(tuned, 1), fresh
  assert a.keys() == b.keys() == c.keys()
  encoder = [k for k in a if k.startswith('/Transformer/')]
  assert encoder and len(encoder) < len(a)
  for k in a:
    want = a[k] if k in encoder else c[k]  # loaded from the source, or the fresh seed-0 init
    np.testing.assert_array_equal(b[k], want, err_msg=k)
  assert not np.array_equal(a['/head/kernel'], c['/head/kernel'])  # the source did train
  assert not any(np.array_equal(a[k], c[k]) for k in encoder if k.endswith('kernel'))


def _no_compilation(*args, **kwargs):
  raise AssertionError('something was compiled: the bad init_from was not caught before compilation')


def test_bad_init_from_fails_before_compiling(fmnist_source, tmp_path, monkeypatch):
  """A missing ``init_from.path`` (given as a flag) is an error naming the field, raised before any
  state or step is compiled and before the workdir is created (in process: no subprocess needed)."""
  monkeypatch.setattr(train_lib, 'make_train_step', _no_compilation)
  monkeypatch.setattr(train_lib, 'create_state', _no_compilation)
  workdir = tmp_path / 'bad'
  with pytest.raises(FileNotFoundError) as e:
    run_main_in_process(base_args(fmnist_source, str(workdir), '--config.total_steps=2',
                                  f'--config.init_from.path={tmp_path / "missing_run"}'), monkeypatch)
  assert 'init_from.path' in str(e.value) and 'does not exist' in str(e.value)
  assert not workdir.exists()
