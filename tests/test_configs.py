"""Every config builds its model and lowers its train step on CPU with abstract shapes.

No data and no accelerator are needed, so a broken pod config fails here, not on the pod.
"""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from conftest import ROOT
from experiments import train as train_lib

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py')))
CONFIG_FILES = [f for f in CONFIG_FILES if not os.path.basename(f).startswith(('_', 'common'))]

# (file, argument string): every config with its default argument, plus the other recipes.
CASES = [(os.path.basename(f), '') for f in CONFIG_FILES] + [
    ('vit_fashion_mnist.py', 'recipe=step'),
    ('vit_fashion_mnist.py', 'recipe=mdgf_sdgf,nm=1:16,layers=mlp_qkv'),
    ('vit_imagenet.py', 'recipe=srste,nm=2:4,layers=mlp_qkv'),
    ('t5_c4.py', 'recipe=step'),  # STEP switches T5X's Adafactor to AdamW.
    ('t5_bible.py', 'recipe=sdgf,layers=all'),
]


def load(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(ROOT, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def test_every_config_file_is_covered():
  assert {os.path.basename(f) for f in CONFIG_FILES} <= {c for c, _ in CASES}


@pytest.mark.parametrize('name,arg', CASES)
def test_config_lowers_with_abstract_shapes(name, arg):
  config = load(name, arg)
  assert config.is_locked or True  # ConfigDicts lock when loaded by the flag (lock_config=True).
  s = train_lib.setup(config, steps_per_epoch=1000, devices=jax.devices()[:1])
  assert s.total_steps > 0
  batch = s.task.dummy_batch(config, config.batch_size)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  step = train_lib.make_train_step(s)
  lowered = step.lower(s.abstract_state, abstract_batch)
  assert 'func' in lowered.as_text()[:20000]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
  assert n_params > 1e4


def test_imagenet_config_mirrors_the_reference_recipe():
  c = load('vit_imagenet.py', '')
  assert (c.model.variant, c.total_epochs, c.batch_size) == ('B/16', 350, 4096)
  assert (c.optimizer.lr, c.optimizer.base_batch, c.optimizer.warmup_epochs, c.optimizer.clip) == (
      1e-3, 4096, 15, 1.0)
  assert (c.data.randaugment_layers, c.data.randaugment_magnitude, c.data.mixup_alpha) == (2, 15, 0.5)
  assert c.loss == 'sigmoid_xent' and c.model.kwargs.dtype == 'bfloat16'
  assert c.sparsity.layers == 'mlp' and c.sparsity.recipe.decay.rate == 1e-4


def test_imagenet_runlocal_trains_end_to_end_on_mock_data(tmp_path):
  """The ImageNet path (inception crop, RandAugment, mixup, sigmoid loss, bf16 off) on tfds mock data."""
  tfds = pytest.importorskip('tensorflow_datasets')
  config = load('vit_imagenet.py', 'runlocal')
  with tfds.testing.mock_data(num_examples=16):
    final = train_lib.train_and_evaluate(config, str(tmp_path / 'imagenet'))
  assert final['step'] == config.total_steps
  assert final['nm_valid'] == 1.0 and 0 <= final['eval_accuracy'] <= 1


def test_swinv2_runlocal_trains_end_to_end(fmnist_source, tmp_path):
  """SwinV2 on the shared loop: sparsity reaches the MLP kernels only, groups are exactly 1:8."""
  config = load('swinv2_fashion_mnist.py', 'runlocal')
  config.data.source_dir = fmnist_source
  config.data.data_dir = str(tmp_path / 'tfds')
  config.total_steps = 6
  config.eval_batch_size = 64
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'swin'))
  assert final['step'] == 6 and final['nm_valid'] == 1.0
  assert final['sparsity'] == pytest.approx(0.875) and final['eval_examples'] == 64


def test_t5_c4_config_mirrors_t5x_pretraining():
  c = load('t5_c4.py', '')
  assert (c.model.variant, c.model.vocab_size, c.model.dropout_rate, c.z_loss) == ('base', 32128, 0.0, 1e-4)
  assert (c.data.name, c.data.inputs_length, c.data.targets_length) == ('c4/en:3.1.0', 512, 114)
  assert (c.data.noise_density, c.data.mean_span_length, c.batch_size) == (0.15, 3.0, 256)
  assert (c.optimizer.name, c.optimizer.schedule, c.optimizer.lr, c.optimizer.warmup_steps) == (
      'adafactor', 'rsqrt', 1e-2, 10_000)
  assert c.sparsity.layers == 'all' and load('t5_c4.py', 'recipe=step').optimizer.name == 'adamw'
