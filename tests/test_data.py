"""Tests of experiments.data: idx reader, project builder, grain pipeline, preprocessing, mixup."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments.data import fashion_mnist
from experiments.data import idx
from experiments.data import mixup
from experiments.data import pipeline
from experiments.data import preprocess
from experiments.data import randaugment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 50, 20


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
  """The idx encoding of ``array``, written here independently of the reader."""
  big_endian = {0x08: '>u1', 0x0C: '>i4'}[code]
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(big_endian).tobytes()


def write_source(folder, num_train: int = NUM_TRAIN,
                 num_test: int = NUM_TEST) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Gzipped idx files like the Debian package's; pixel (0, 0) of example ``i`` is ``i``."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (('train', num_train), ('test', num_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for stem, array in zip(fashion_mnist.FILES[split], (images, labels)):
      with open(os.path.join(folder, stem + '.gz'), 'wb') as f:
        f.write(gzip.compress(idx_bytes(array)))
    arrays[split] = (images, labels)
  return arrays


def ids(batch) -> list[int]:
  """Example ids of a batch: pixel (0, 0) mapped back from [-1, 1] to 0..255."""
  return [int(round((x + 1) * 127.5)) for x in batch['image'][:, 0, 0, 0]]


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
  """A built nm_fashion_mnist of 50 train / 20 test examples: (config, source arrays)."""
  source_dir = tmp_path_factory.mktemp('fm_source')
  arrays = write_source(source_dir)
  data_dir = tmp_path_factory.mktemp('fm_data')
  config = pipeline.default_config(data_dir=str(data_dir), source_dir=str(source_dir))
  return config, arrays


def updated(config, **fields):
  return pipeline.default_config(**{**config.to_dict(), **fields})


def make(config, split='train', *, batch=10, train=True, seed=0, **kwargs):
  return pipeline.make_input(config, split=split, global_batch_size=batch, train=train, seed=seed, **kwargs)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# idx reader.


def test_read_idx_gzipped_and_plain(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  (tmp_path / 'a.gz').write_bytes(gzip.compress(idx_bytes(images)))
  ints = np.array([[1, -2, 300], [70000, 0, -1]], np.int32)
  (tmp_path / 'b').write_bytes(idx_bytes(ints, code=0x0C))
  np.testing.assert_array_equal(idx.read_idx(tmp_path / 'a.gz'), images)
  got = idx.read_idx(tmp_path / 'b')
  np.testing.assert_array_equal(got, ints)
  assert got.dtype.isnative


@pytest.mark.parametrize('data, message', [
    (b'\x01\x00\x08\x01' + struct.pack('>I', 2) + b'\x00\x01', 'bad idx magic'),
    (b'\x00\x00\x07\x01' + struct.pack('>I', 2) + b'\x00\x01', 'bad idx magic'),
    (b'\x00\x00\x08\x00', 'bad idx magic'),
    (b'\x00\x00', 'too short'),
    (b'\x00\x00\x08\x02' + struct.pack('>I', 2), 'truncated header'),
    (b'\x00\x00\x08\x01' + struct.pack('>I', 3) + b'\x00\x01', 'bytes after the header'),
    (b'\x00\x00\x08\x01' + struct.pack('>I', 1) + b'\x00\x01', 'bytes after the header'),
])
def test_read_idx_rejects_bad_files(tmp_path, data, message):
  path = tmp_path / 'bad.gz'
  path.write_bytes(gzip.compress(data))
  with pytest.raises(idx.IdxFormatError, match=message) as e:
    idx.read_idx(path)
  assert str(path) in str(e.value)


def test_load_split_checks_labels_match_images(tmp_path):
  write_source(tmp_path)
  (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
  with pytest.raises(idx.IdxFormatError, match='labels of shape'):
    fashion_mnist.load_split(tmp_path, 'test')


# Project builder.


def test_builder_stores_the_idx_data(synthetic):
  config, arrays = synthetic
  fashion_mnist.prepare(config.data_dir, config.source_dir)
  start = time.perf_counter()
  builder = fashion_mnist.prepare(config.data_dir, config.source_dir)  # Already built: a no-op.
  assert time.perf_counter() - start < 2
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': NUM_TRAIN, 'test': NUM_TEST}
  assert builder.info.features['label'].names == list(fashion_mnist.CLASS_NAMES)
  for split, (images, labels) in arrays.items():
    source = tfds.data_source(fashion_mnist.NAME, split=split, data_dir=config.data_dir, download=False)
    assert len(source) == len(images)
    for i in (0, 7, len(images) - 1):  # disable_shuffling keeps the idx order.
      assert source[i]['image'].dtype == np.uint8
      np.testing.assert_array_equal(source[i]['image'], images[i][..., None])
      assert source[i]['label'] == labels[i]


def test_prepare_cli(synthetic, tmp_path):
  config, _ = synthetic
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.data.prepare', '--dataset=fashion_mnist',
       f'--data_dir={tmp_path}', f'--source_dir={config.source_dir}'],
      cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': REPO})
  assert result.returncode == 0, result.stderr
  assert f'train {NUM_TRAIN}, test {NUM_TEST}' in result.stdout
  assert (tmp_path / fashion_mnist.NAME / '1.0.0' / 'dataset_info.json').exists()


# Pipeline.


def test_train_batches(synthetic):
  config, arrays = synthetic
  inp = make(config)
  assert (inp.num_examples, inp.steps_per_epoch, inp.per_host_batch_size) == (NUM_TRAIN, 5, 10)
  assert (inp.num_classes, inp.image_shape) == (10, (28, 28, 1))
  batches = take(inp.iterator(), 5)
  for b in batches:
    assert b.keys() == {'image', 'label'}
    assert b['image'].shape == (10, 28, 28, 1) and b['image'].dtype == np.float32
    assert b['label'].shape == (10,) and b['label'].dtype == np.int32
    assert -1 <= b['image'].min() and b['image'].max() <= 1
    np.testing.assert_array_equal(b['label'], arrays['train'][1][ids(b)])
  epoch = [i for b in batches for i in ids(b)]
  assert sorted(epoch) == list(range(NUM_TRAIN))  # One epoch: each example once.
  assert epoch != sorted(epoch)  # Shuffled.


def test_same_seed_same_batches_new_order_each_epoch(synthetic):
  config, _ = synthetic
  a = take(make(config, seed=3).iterator(), 10)
  assert_batches_equal(a, take(make(config, seed=3).iterator(), 10))
  assert [ids(b) for b in a] != [ids(b) for b in take(make(config, seed=4).iterator(), 10)]
  first, second = ([i for b in a[k:k + 5] for i in ids(b)] for k in (0, 5))
  assert sorted(second) == list(range(NUM_TRAIN)) and first != second


def test_hosts_split_each_global_batch(synthetic):
  config, _ = synthetic
  hosts = [take(make(config, process_index=i, process_count=2).iterator(), 5) for i in range(2)]
  assert all(b['image'].shape[0] == 5 for host in hosts for b in host)
  seen = [[i for b in host for i in ids(b)] for host in hosts]
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(NUM_TRAIN))
  # The global batch does not depend on the number of hosts.
  single = take(make(config).iterator(), 5)
  for s in range(5):
    for k in single[s]:
      np.testing.assert_array_equal(np.concatenate([hosts[0][s][k], hosts[1][s][k]]), single[s][k])


def test_resume_from_state_equals_uninterrupted(synthetic):
  config = updated(synthetic[0], crop='pad', flip=True, randaugment_layers=2, randaugment_magnitude=9,
                   mixup_alpha=0.4)
  inp = make(config, seed=7)
  straight = take(inp.iterator(), 8)  # Crosses the epoch boundary at step 5.
  interrupted = inp.iterator()
  take(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))
  assert state['step'] == 3
  resumed = make(config, seed=7).iterator()
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), straight[3:])
  assert_batches_equal(take(inp.iterator(start_step=3), 5), straight[3:])
  other = make(config, seed=8).iterator()
  with pytest.raises(ValueError, match='another input stream'):
    other.set_state(state)


def test_augmentation_is_deterministic_and_changes_images(synthetic):
  config = updated(synthetic[0], crop='pad', flip=True, randaugment_layers=2)
  plain = take(make(synthetic[0]).iterator(), 2)
  augmented = take(make(config).iterator(), 2)
  assert_batches_equal(augmented, take(make(config).iterator(), 2))
  assert not np.array_equal(plain[0]['image'], augmented[0]['image'])
  np.testing.assert_array_equal(plain[0]['label'], augmented[0]['label'])  # Same order.


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_example_once(synthetic, process_count):
  config, arrays = synthetic
  hosts = [make(config, 'test', batch=8, train=False, process_index=i, process_count=process_count)
           for i in range(process_count)]
  assert hosts[0].steps_per_epoch == 3  # ceil(20 / 8).
  counted = []
  for inp in hosts:
    batches = list(inp.iterator())
    assert len(batches) == inp.steps_per_epoch
    for b in batches:
      assert b['mask'].dtype == np.bool_ and b['image'].shape[0] == 8 // process_count
      counted += [i for i, m in zip(ids(b), b['mask']) if m]
      np.testing.assert_array_equal(b['label'], arrays['test'][1][ids(b)])
  assert sorted(counted) == list(range(NUM_TEST))


def test_eval_is_not_shuffled_or_augmented(synthetic):
  config = updated(synthetic[0], flip=True, randaugment_layers=3)
  batches = list(make(config, 'test', batch=8, train=False).iterator())
  assert [i for b in batches for i in ids(b)][:NUM_TEST] == list(range(NUM_TEST))


def test_bad_arguments_raise(synthetic):
  config, _ = synthetic
  with pytest.raises(ValueError, match='Unknown data config fields'):
    make({**config.to_dict(), 'fliip': True})
  with pytest.raises(ValueError, match='divisible'):
    make(config, batch=10, process_count=3)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    make(config, batch=64)
  with pytest.raises(ValueError, match='Unknown dataset'):
    make({'name': 'cifar11'})


@pytest.mark.parametrize('name, image_size, crop, shape', [
    ('cifar10', None, 'pad', (32, 32, 3)),
    ('mnist', None, 'resize', (28, 28, 1)),
    ('imagenet2012', 40, 'inception', (40, 40, 3)),
])
def test_mock_datasets(name, image_size, crop, shape):
  config = pipeline.default_config(name=name, data_dir='/nonexistent', image_size=image_size, crop=crop,
                                   flip=True, randaugment_layers=1, mixup_alpha=0.2)
  eval_split = 'validation' if name == 'imagenet2012' else 'test'
  with tfds.testing.mock_data(num_examples=12):
    train = make(config, batch=4, seed=1)
    evaluation = make(config, eval_split, batch=8, train=False)
    batch = next(train.iterator())
    eval_batches = list(evaluation.iterator())
  assert train.image_shape == shape
  assert batch['image'].shape == (4, *shape) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  assert batch['soft_label'].shape == (4, train.num_classes)
  np.testing.assert_allclose(batch['soft_label'].sum(-1), 1, rtol=1e-6)
  assert len(eval_batches) == 2 and sum(b['mask'].sum() for b in eval_batches) == 12
  assert all(b['image'].shape == (8, *shape) for b in eval_batches)


def test_variable_size_dataset_needs_image_size():
  with pytest.raises(ValueError, match='image_size'):
    make(pipeline.default_config(name='imagenet2012'))


def test_missing_dataset_fails_fast_with_how_to(tmp_path):
  start = time.perf_counter()
  with pytest.raises(FileNotFoundError, match='experiments.data.prepare --dataset=cifar10'):
    make(pipeline.default_config(name='cifar10', data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    make(pipeline.default_config(data_dir=str(tmp_path), source_dir=str(tmp_path)))
  assert time.perf_counter() - start < 5


# Preprocessing, RandAugment, mixup.


def test_decode_accepts_arrays_and_encoded_bytes():
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  png = io.BytesIO()
  Image.fromarray(image).save(png, format='PNG')
  np.testing.assert_array_equal(preprocess.decode(png.getvalue(), 3), image)
  np.testing.assert_array_equal(preprocess.decode(image[..., 0], 1), image[..., :1])
  with pytest.raises(ValueError, match='3 channels'):
    preprocess.decode(image[..., :1], 3)


def test_crops_give_the_requested_size():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  assert preprocess.center_crop(image, 16).shape == (16, 16, 3)
  assert preprocess.inception_crop(image, 16, rng).shape == (16, 16, 3)
  assert preprocess.pad_crop(image, rng).shape == image.shape
  assert preprocess.resize(image[..., :1], 8, 9).shape == (8, 9, 1)
  extremes = np.array([[[0, 255]]], np.uint8)
  np.testing.assert_allclose(preprocess.normalize(extremes, 'minus_one_one'), [[[-1, 1]]])


@pytest.mark.parametrize('shape', [(28, 28, 1), (32, 32, 3)])
def test_randaugment_keeps_shape_dtype_and_is_deterministic(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  outs = [randaugment.randaugment(image, np.random.default_rng(s), num_layers=3, magnitude=9)
          for s in (5, 5, 6)]
  assert all(o.shape == shape and o.dtype == np.uint8 for o in outs)
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize('op', sorted(randaugment.OPS))
def test_each_op(op):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
  out = randaugment.OPS[op](image, 1.0, rng)
  assert out.shape == image.shape and out.dtype == np.uint8
  if op not in ('autocontrast', 'equalize'):  # Level 0 leaves an image as it is for the others.
    np.testing.assert_array_equal(randaugment.OPS[op](image, 0.0, rng), image)


def test_ops_on_known_images():
  ramp = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10  # 0..150.
  assert randaugment.autocontrast(ramp, 0, None).max() == 255
  solarized = np.where(ramp >= 128, 255 - ramp, ramp)
  np.testing.assert_array_equal(randaugment.solarize(ramp, 0.5, None), solarized)
  np.testing.assert_array_equal(randaugment.posterize(ramp, 1.0, None), ramp & 0xF0)
  rotated = randaugment._affine(ramp, np.array([[0, -1, 0], [1, 0, 0]], np.float32))  # 90 degrees.
  np.testing.assert_array_equal(rotated, np.rot90(ramp))


def test_mixup_soft_labels_sum_to_one():
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(6, 4, 4, 1)).astype(np.float32), 'label': np.arange(6, dtype=np.int32)}
  mixed = mixup.mixup(batch, rng, alpha=0.5, num_classes=10)
  mixed_jax = mixup.mixup_jax(jax.random.key(0), batch, alpha=0.5, num_classes=10)
  for out in (mixed, jax.tree.map(np.asarray, mixed_jax)):
    assert out['soft_label'].shape == (6, 10)
    np.testing.assert_allclose(out['soft_label'].sum(-1), 1, rtol=1e-6)
    lam = out['soft_label'][0, 0]  # Example 0 is mixed with example 5.
    expected = lam * batch['image'][0] + (1 - lam) * batch['image'][5]
    np.testing.assert_allclose(out['image'][0], expected, atol=1e-5)
    np.testing.assert_array_equal(out['label'], batch['label'])


# Real Fashion-MNIST from the Debian package.


@pytest.fixture(scope='module')
def real_fashion_mnist(tmp_path_factory):
  if fashion_mnist.missing_files(fashion_mnist.DEFAULT_SOURCE_DIR):
    pytest.skip('Debian dataset-fashion-mnist is not installed.')
  data_dir = str(tmp_path_factory.mktemp('fashion_mnist'))
  return fashion_mnist.prepare(data_dir), data_dir


def test_real_fashion_mnist(real_fashion_mnist):
  builder, data_dir = real_fashion_mnist
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {'train': 60000, 'test': 10000}
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    images, labels = fashion_mnist.load_split(fashion_mnist.DEFAULT_SOURCE_DIR, split)
    assert np.array_equal(np.unique(labels), np.arange(10))
    source = tfds.data_source(fashion_mnist.NAME, split=split, data_dir=data_dir, download=False)
    assert len(source) == len(labels)
    for i in rng.choice(len(labels), 64, replace=False):
      np.testing.assert_array_equal(source[int(i)]['image'], images[i])
      assert source[int(i)]['label'] == labels[i]
  batch = next(make(pipeline.default_config(data_dir=data_dir), 'test', batch=256, train=False).iterator())
  assert batch['image'].shape == (256, 28, 28, 1) and set(batch['label']) <= set(range(10))
