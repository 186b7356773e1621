"""Checkpointer: unreadable checkpoints fall back, checkpoints of another run are refused, reads write nothing."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints

META = {'sparsity': {'nm': '1:8'}, 'total_steps': 8, 'steps_per_epoch': 4}


def make_state(scale=1.0, kernel_shape=(64, 96)):
  return {'step': jnp.asarray(0, jnp.int32),
          'params': {'dense': {'kernel': jnp.full(kernel_shape, scale), 'bias': jnp.full((96,), scale)},
                     'norm': {'scale': jnp.ones((96,), jnp.bfloat16)}},
          'opt_state': ({'mu': jnp.zeros(kernel_shape)},)}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def write(directory, steps=(4, 8), meta=META):
  ckpt = checkpoints.Checkpointer(directory, every=4)
  for step in steps:
    assert ckpt.save(step, make_state(float(step)), {'position': step}, meta)
  ckpt.close()


def snapshot(root):
  """Every file and folder under ``root`` with its size, mtime and bytes."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.join(folder, d)] = 'dir'
    for f in files:
      path = os.path.join(folder, f)
      stat = os.stat(path)
      with open(path, 'rb') as fh:
        out[path] = (stat.st_size, stat.st_mtime_ns, fh.read())
  return out


def restore(directory, state=None, meta=META):
  ckpt = checkpoints.Checkpointer(directory, every=4)
  try:
    return ckpt.restore_latest(abstract(state or make_state()), meta)
  finally:
    ckpt.close()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('saved') / 'checkpoints')
  write(directory)
  return directory


@pytest.fixture
def copy(saved, tmp_path):
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved, directory)
  return directory


def _state_files(directory, step):
  root = os.path.join(directory, str(step), 'state')
  return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if not f.startswith('_')
          and f != 'commit_success.txt' and os.path.basename(r) == 'd']


def _garbage(directory, step):
  for path in _state_files(directory, step):
    with open(path, 'wb') as f:
      f.write(b'garbage')


def _truncate(directory, step):
  for path in _state_files(directory, step):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_data(directory, step):
  for path in _state_files(directory, step):
    os.remove(path)


def _delete_tree_metadata(directory, step):
  os.remove(os.path.join(directory, str(step), 'state', '_METADATA'))


def _corrupt_tree_metadata(directory, step):
  with open(os.path.join(directory, str(step), 'state', '_METADATA'), 'w') as f:
    f.write('{"tree')


def _delete_state(directory, step):
  shutil.rmtree(os.path.join(directory, str(step), 'state'))


def _corrupt_meta(directory, step):
  with open(os.path.join(directory, str(step), 'meta', 'metadata'), 'w') as f:
    f.write('{"spars')


def _delete_data_item(directory, step):
  shutil.rmtree(os.path.join(directory, str(step), 'data'))


CORRUPTIONS = [_garbage, _truncate, _delete_data, _delete_tree_metadata, _corrupt_tree_metadata,
               _delete_state, _corrupt_meta, _delete_data_item]


@pytest.mark.parametrize('corrupt', CORRUPTIONS, ids=lambda f: f.__name__.strip('_'))
def test_unreadable_latest_checkpoint_falls_back_to_previous(copy, corrupt, caplog):
  corrupt(copy, 8)
  with caplog.at_level(logging.ERROR):
    state, data, meta = restore(copy)
  assert data == {'position': 4} and meta == META
  np.testing.assert_array_equal(state['params']['dense']['kernel'], 4.0)
  assert any('checkpoint 8' in r.getMessage() and 'unreadable' in r.getMessage() for r in caplog.records)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(copy):
  _garbage(copy, 8)
  _delete_state(copy, 4)
  with pytest.raises(checkpoints.NoReadableCheckpoint, match=r'\[4, 8\]'):
    restore(copy)


def test_changed_model_is_refused_naming_every_difference(copy):
  before = snapshot(copy)
  model = make_state(kernel_shape=(64, 128))
  del model['params']['norm']
  model['params']['head'] = {'kernel': jnp.zeros((96, 10))}
  with pytest.raises(checkpoints.StructureMismatch) as e:
    restore(copy, model)
  message = str(e.value)
  assert 'step 8' in message
  assert 'params/dense/kernel: checkpoint float32[64, 96] vs model float32[64, 128]' in message
  assert 'opt_state/0/mu: checkpoint float32[64, 96] vs model float32[64, 128]' in message
  assert 'params/head/kernel: missing from the checkpoint' in message
  assert 'params/norm/scale: in the checkpoint (bfloat16[96]) but not in the model' in message
  assert 'params/dense/bias' not in message
  assert snapshot(copy) == before


def test_changed_dtype_is_refused(copy):
  model = make_state()
  model['params']['norm']['scale'] = jnp.ones((96,), jnp.float32)
  with pytest.raises(checkpoints.StructureMismatch, match=r'params/norm/scale: checkpoint bfloat16\[96\] vs model float32\[96\]'):
    restore(copy, model)


@pytest.mark.parametrize('change,message', [
    ({'sparsity': {'nm': '1:16'}}, 'nm: checkpoint "1:8" vs now "1:16"'),
    ({'total_steps': 12}, 'total_steps=8, this config gives total_steps=12'),
    ({'steps_per_epoch': 5}, 'steps_per_epoch=4, this config gives steps_per_epoch=5'),
])
def test_another_sparsity_setting_or_run_length_is_refused(copy, change, message):
  before = snapshot(copy)
  with pytest.raises(checkpoints.CannotResume) as e:
    restore(copy, meta=META | change)
  assert message in str(e.value)
  assert snapshot(copy) == before


def test_reading_creates_and_changes_nothing(tmp_path, saved):
  missing = str(tmp_path / 'work' / 'checkpoints')
  assert restore(missing) is None
  assert not os.path.exists(tmp_path / 'work')
  # A leftover of a killed save is cleaned by the first save, not by a read.
  directory = str(tmp_path / 'checkpoints')
  shutil.copytree(saved, directory)
  os.makedirs(os.path.join(directory, '12.orbax-checkpoint-tmp-1'))
  before = snapshot(directory)
  restore(directory)
  assert snapshot(directory) == before


def test_save_replaces_an_unreadable_step_and_refuses_to_overwrite_a_good_one(copy):
  _garbage(copy, 8)
  ckpt = checkpoints.Checkpointer(copy, every=4)
  try:
    state, _, _ = ckpt.restore_latest(abstract(make_state()), META)
    assert ckpt.save(8, make_state(80.0), {'position': 8}, META)
    with pytest.raises(FileExistsError, match='checkpoint 4 already exists'):
      ckpt.save(4, state, {'position': 4}, META)
  finally:
    ckpt.close()
  state, data, _ = restore(copy)
  assert data == {'position': 8}
  np.testing.assert_array_equal(state['params']['dense']['kernel'], 80.0)


def test_is_unreadable_accepts_only_read_failures():
  assert checkpoints.is_unreadable(ValueError('DATA_LOSS: Error reading "x" in OCDBT database'))
  assert checkpoints.is_unreadable(FileNotFoundError('_METADATA'))
  assert not checkpoints.is_unreadable(ValueError('Requested shape (3,) does not match (4,)'))
  assert not checkpoints.is_unreadable(PermissionError('denied'))
