"""``config.init_from``: a run starts from another run's params (fine-tuning), with clear errors."""

import os
import time

import numpy as np
import pytest

from conftest import run_main
from experiments import init_from
from test_train import base_args, final_state, leaves


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


def test_fine_tune_starts_from_the_source_params(fmnist_source, tmp_path):
  """A 6-step dense run, then lr-0 runs: one loading the encoder from it, one from scratch."""
  src, tuned, fresh = (str(tmp_path / n) for n in ('src', 'tuned', 'fresh'))
  run_main(base_args(fmnist_source, src, '--config.total_steps=6', '--config.sparsity.recipe.name=dense'))
  frozen = ('--config.total_steps=1', '--config.optimizer.lr=0.0', '--config.sparsity.recipe.name=srste')
  run_main(base_args(fmnist_source, tuned, *frozen, f'--config.init_from.path={src}',
                     '--config.init_from.include=Transformer/.*'))
  run_main(base_args(fmnist_source, fresh, *frozen))
  a, b, c = _params(src, 6), _params(tuned, 1), _params(fresh, 1)
  assert a.keys() == b.keys() == c.keys()
  encoder = [k for k in a if k.startswith('/Transformer/')]
  assert encoder and len(encoder) < len(a)
  for k in a:
    want = a[k] if k in encoder else c[k]  # loaded from the source, or the fresh seed-0 init
    np.testing.assert_array_equal(b[k], want, err_msg=k)
  assert not np.array_equal(a['/head/kernel'], c['/head/kernel'])  # the source did train


def test_bad_init_from_fails_before_compiling(fmnist_source, tmp_path):
  t0 = time.time()
  out = run_main(base_args(fmnist_source, str(tmp_path / 'bad'), '--config.total_steps=2',
                           f'--config.init_from.path={tmp_path / "missing_run"}'), check=False)
  assert out.returncode != 0
  assert 'init_from.path' in out.stderr and 'does not exist' in out.stderr, out.stderr[-2000:]
  assert 'Compiling' not in out.stderr
  assert time.time() - t0 < 120
