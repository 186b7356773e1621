"""Every config builds its model and lowers its train step on CPU with abstract shapes.

No data and no accelerator are needed, so a broken pod config fails here, not on the pod.
"""

import glob
import importlib.util
import json
import math
import os
import re

import jax
import numpy as np
import pytest

from conftest import ROOT
from experiments import train as train_lib
from nmsparse import rules as rules_lib

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


# Tokens that meet each kernel per example, by model family (the published architectures):
# a ViT block sees every patch (plus the class token with 'tok' pooling), its head one vector;
# a T5 encoder kernel (and the decoder's cross-attention keys and values) the input tokens,
# every other decoder kernel the target tokens; a SwinV2 stage s the (grid / 2^s)^2 tokens of its
# resolution, its head one vector; the continuous position-bias MLP runs on the relative-offset
# table, once per step whatever the batch, and is left out.
SWIN_PATCH = {'mu': 2, 'B-w16': 4}  # swinv2_base_window16_256: patch 4.


def tokens_per_kernel(config, batch, path: str) -> int:
  m = config.model
  if m.name == 'vit':
    if path.startswith(('head/', 'pre_logits/')):
      return 1
    patch = int(m.variant.split('/')[1])
    return (config.data.image_size // patch) ** 2 + (m.kwargs.get('pool_type') == 'tok')
  if m.name == 't5':
    if path.startswith('encoder/') or re.search(r'encoder_decoder_attention/[kv]/', path):
      return batch['inputs'].shape[1]
    return batch['targets'].shape[1]
  if m.name == 'swinv2':
    if path.startswith('head/'):
      return 1
    if '/cpb_mlp/' in path:
      return 0
    grid = config.data.image_size // SWIN_PATCH[m.variant]
    if path.startswith('patch_embed/'):
      return grid ** 2
    return (grid >> int(re.match(r'stage_(\d+)/', path).group(1))) ** 2
  raise AssertionError(f'no token count for model {m.name}')


def matmul_train_flops(config, batch, params) -> float:
  """A train step's matmul FLOPs by hand: forward, input gradient and weight gradient of every
  kernel, each 2 FLOPs per weight per token (``nmsparse/flops.py``'s convention, counted here)."""
  total = 0
  for path, leaf in rules_lib.named_leaves(params):
    if path.endswith('kernel') and len(leaf.shape) >= 2:
      total += 3 * 2 * math.prod(leaf.shape) * tokens_per_kernel(config, batch, path) * config.batch_size
  return total


@pytest.mark.parametrize('name,arg', CASES)
def test_config_lowers_with_abstract_shapes(name, arg):
  """The train step of every config lowers on one CPU device from shapes alone, and the lowering is
  the step the config describes:

  * set-up and lowering run on a locked config, as ``--config`` gives it (``lock_config=True``):
    nothing may add a field to it;
  * the step maps the train state to a train state of the same tree, shapes, dtypes and
    shardings (so the loop can feed it back, donate it and checkpoint it), donates its input
    state, takes the config's batch and returns scalar metrics with the loss among them;
  * for each config's default (the recipe variants change no matmul), XLA's FLOP count of the
    lowered step is that of a forward and backward pass over the config's batch: between 1 and 2
    times the matmul FLOPs counted by hand from the parameter shapes and token counts (attention
    scores, norms and the optimizer make up the rest; a step without its backward pass, with
    another batch or another model size falls outside).
  """
  config = load(name, arg)
  config.lock()
  s = train_lib.setup(config, steps_per_epoch=1000, devices=jax.devices()[:1])
  assert s.total_steps > 0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_state.params))
  assert n_params > 1e4
  # The batch's shapes from a 2-example dummy batch (a pod batch of images would take gigabytes).
  abstract_batch = {k: jax.ShapeDtypeStruct((config.batch_size, *v.shape[1:]), v.dtype)
                    for k, v in s.task.dummy_batch(config, 2).items()}
  lowered = train_lib.make_train_step(s).lower(s.abstract_state, abstract_batch)

  (state_in, batch_in), kwargs = lowered.args_info
  assert not kwargs
  assert all(a.donated for a in jax.tree.leaves(state_in))
  assert not any(a.donated for a in jax.tree.leaves(batch_in))
  assert {k: a.shape for k, a in batch_in.items()} == {k: v.shape for k, v in abstract_batch.items()}
  new_state, metrics = lowered.out_info
  assert jax.tree.structure(new_state) == jax.tree.structure(s.abstract_state)
  for got, want, sharding in zip(jax.tree.leaves(new_state), jax.tree.leaves(s.abstract_state),
                                 jax.tree.leaves(s.shardings)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert got.sharding == sharding
  assert 'train/loss' in metrics and all(m.shape == () for m in metrics.values())

  if not arg:
    flops = lowered.cost_analysis()['flops']
    by_hand = matmul_train_flops(config, abstract_batch, s.abstract_state.params)
    assert 1.0 <= flops / by_hand <= 2.0, (flops, by_hand)


def test_imagenet_config_mirrors_the_reference_recipe():
  c = load('vit_imagenet.py', '')
  assert (c.model.variant, c.total_epochs, c.batch_size) == ('B/16', 350, 4096)
  assert (c.optimizer.lr, c.optimizer.base_batch, c.optimizer.warmup_epochs, c.optimizer.clip) == (
      1e-3, 4096, 15, 1.0)
  assert (c.data.randaugment_layers, c.data.randaugment_magnitude, c.data.mixup_alpha) == (2, 15, 0.5)
  assert c.loss == 'sigmoid_xent' and c.model.kwargs.dtype == 'bfloat16'
  assert c.sparsity.layers == 'mlp' and c.sparsity.recipe.decay.rate == 1e-4


def sparsified_kernels(config) -> set[str]:
  """Paths of the kernels the config's rules sparsify (from the run's own set-up, shapes only)."""
  s = train_lib.setup(config, steps_per_epoch=8, devices=jax.devices()[:1])
  named = rules_lib.named_leaves(s.abstract_state.params)
  return {path for (path, _), spec in zip(named, rules_lib.spec_leaves(s.sp.specs)) if spec is not None}


def test_imagenet_runlocal_trains_end_to_end_on_mock_data(tmp_path):
  """The ImageNet path (inception crop, RandAugment, mixup, sigmoid loss, bf16 off) on tfds mock data:
  4 steps, an eval, the whole (16-example) eval split counted once, exact 1:16 groups (15/16 of the
  MLP kernels zero in the hard model), and at the end the model evaluated is that hard model.

  Every step is a diagnostics step, so the one compiled train step also splits the mixup batch
  (soft labels included) into the 4 microbatches of the gradient-noise diagnostics; the plain
  step differs from it only by those metrics and is run on Fashion-MNIST.
  """
  tfds = pytest.importorskip('tensorflow_datasets')
  config = load('vit_imagenet.py', 'runlocal')
  config.diagnostics_every_steps = 1
  with tfds.testing.mock_data(num_examples=16):
    final = train_lib.train_and_evaluate(config, str(tmp_path / 'imagenet'))
  assert final['step'] == config.total_steps == 4
  assert final['nm_valid'] == 1.0 and final['sparsity'] == pytest.approx(15 / 16)
  assert final['eval_examples'] == 16
  # The run is over: the model evaluated is the hard N:M model (docs/method.md §2).
  assert (final['eval_loss'], final['eval_accuracy']) == (final['hard_loss'], final['hard_accuracy'])
  with open(tmp_path / 'imagenet' / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  noise = {r['step']: (r['grad/kept_grad_signal'], r['grad/kept_grad_noise']) for r in rows
           if 'grad/kept_grad_noise' in r}
  # The head starts at zero (head_zeroinit) and the warm-up's lr is 0 at step 0, so no gradient
  # reaches the MLP kernels in the first two steps; it does once the head has moved.
  assert noise.keys() == {1, 2, 3, 4}
  assert noise[1] == noise[2] == (0.0, 0.0)
  assert all(v > 0 for step in (3, 4) for v in noise[step])
  assert any('eval/loss' in r for r in rows)


def test_swinv2_runlocal_trains_end_to_end(fmnist_source, tmp_path):
  """SwinV2 on the shared loop: the preset sparsifies exactly the two MLP kernels of each of the
  four blocks (never attention, patch embedding, merging, position-bias MLP or head), the final
  hard model has exact 1:8 groups (7/8 of those kernels zero) and is the model evaluated at the end,
  the whole 64-example eval split is counted once.

  No diagnostics step (``diagnostics_every_steps=0``): it reads only the parameter tree and masks,
  is run on ViT and T5, and would double the SwinV2 compile time.
  """
  config = load('swinv2_fashion_mnist.py', 'runlocal')
  config.data.source_dir = fmnist_source
  config.data.data_dir = str(tmp_path / 'tfds')
  config.total_steps = 6
  config.eval_batch_size = 64
  config.diagnostics_every_steps = 0
  mlp = {f'stage_{s}/block_{b}/MlpBlock_0/Dense_{i}/kernel' for s in (0, 1) for b in (0, 1) for i in (0, 1)}
  assert sparsified_kernels(config) == mlp
  final = train_lib.train_and_evaluate(config, str(tmp_path / 'swin'))
  assert final['step'] == 6 and final['nm_valid'] == 1.0
  assert final['sparsity'] == pytest.approx(0.875) and final['eval_examples'] == 64
  assert (final['eval_loss'], final['eval_accuracy']) == (final['hard_loss'], final['hard_accuracy'])


def test_t5_c4_config_mirrors_t5x_pretraining():
  c = load('t5_c4.py', '')
  assert (c.model.variant, c.model.vocab_size, c.model.dropout_rate, c.z_loss) == ('base', 32128, 0.0, 1e-4)
  assert (c.data.name, c.data.inputs_length, c.data.targets_length) == ('c4/en:3.1.0', 512, 114)
  assert (c.data.noise_density, c.data.mean_span_length, c.batch_size) == (0.15, 3.0, 256)
  assert (c.optimizer.name, c.optimizer.schedule, c.optimizer.lr, c.optimizer.warmup_steps) == (
      'adafactor', 'rsqrt', 1e-2, 10_000)
  assert c.sparsity.layers == 'all' and load('t5_c4.py', 'recipe=step').optimizer.name == 'adamw'


def test_t5_c4_depth_probe_keeps_the_widths():
  """``depth=2``: T5.1.1-Base's widths with 2 encoder and 2 decoder layers (a compile probe)."""
  from experiments.models import t5 as t5_lib  # pylint: disable=g-import-not-at-top
  c = load('t5_c4.py', 'depth=2')
  model = t5_lib.make_t5(c.model.variant, c.model.vocab_size, **c.model.kwargs)
  base = t5_lib.t5_config('base')
  assert (model.num_encoder_layers, model.num_decoder_layers) == (2, 2)
  assert (model.d_model, model.d_ff, model.num_heads) == (base['d_model'], base['d_ff'], base['num_heads'])
  assert 'num_encoder_layers' not in load('t5_c4.py', '').model.kwargs


@pytest.mark.parametrize('name', ['vit_fashion_mnist.py', 'swinv2_fashion_mnist.py'])
def test_val_holds_out_the_end_of_train_for_selection_and_reports_on_test(name):
  default = load(name, '')
  assert (default.train_split, default.eval_split, default.test_split) == ('train', 'test', None)
  held = load(name, 'val=10')
  assert (held.train_split, held.eval_split, held.test_split) == ('train[:90%]', 'train[90%:]', 'test')
  for bad in ('val=100', 'val=-5'):
    with pytest.raises(ValueError, match=r'val=.*percent of .train. held out for validation'):
      load(name, bad)
