"""Ordered regex rules: first match wins, per-layer N:M, clear errors."""

import logging

import jax
import jax.numpy as jnp
import pytest

import nmsparse
from nmsparse import rules as rules_lib
from nmsparse.rules import NMSpec

PARAMS = {
    'encoder': {
        'block_0': {
            'attn': {'query': {'kernel': jax.ShapeDtypeStruct((64, 4, 16), jnp.float32)},
                     'out': {'kernel': jax.ShapeDtypeStruct((4, 16, 64), jnp.float32)}},
            'mlp': {'fc1': {'kernel': jax.ShapeDtypeStruct((64, 256), jnp.float32),
                            'bias': jax.ShapeDtypeStruct((256,), jnp.float32)},
                    'fc2': {'kernel': jax.ShapeDtypeStruct((256, 64), jnp.float32)}},
        },
    },
    'head': {'kernel': jax.ShapeDtypeStruct((64, 10), jnp.float32)},
}


def _by_path(specs):
  flat, _ = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: x is None or isinstance(x, NMSpec))
  return {rules_lib.path_str(p): s for p, s in flat}


def test_first_match_wins_and_unmatched_are_dense():
  specs = _by_path(rules_lib.resolve([
      (r'.*/fc2/kernel', None),                 # Keep fc2 dense: listed first, so it wins.
      (r'.*/mlp/.*kernel', NMSpec(1, 8)),
  ], PARAMS, log=False))
  assert specs['encoder/block_0/mlp/fc1/kernel'] == NMSpec(1, 8, (-2,))  # The default axis of (in, out).
  assert specs['encoder/block_0/mlp/fc2/kernel'] is None
  assert specs['encoder/block_0/mlp/fc1/bias'] is None
  assert specs['head/kernel'] is None


def test_each_layer_keeps_its_own_nm():
  """Regression (reference bug 3, docs/method.md §5): enabling Q/K/V sparsity must not overwrite the MLP's N:M."""
  rules = [(r'.*/mlp/.*kernel', NMSpec(1, 16)), (r'.*/query/kernel', NMSpec(2, 4, (-3,)))]
  specs = _by_path(rules_lib.resolve(rules, PARAMS, log=False))
  assert (specs['encoder/block_0/mlp/fc1/kernel'].n, specs['encoder/block_0/mlp/fc1/kernel'].m) == (1, 16)
  assert (specs['encoder/block_0/attn/query/kernel'].n,
          specs['encoder/block_0/attn/query/kernel'].m) == (2, 4)
  # The spec objects are frozen: nobody can mutate one layer's setting through another.
  with pytest.raises(Exception):
    specs['encoder/block_0/mlp/fc1/kernel'].n = 2


def test_rule_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match=r"matched no parameter.*encoder/block_0"):
    rules_lib.resolve([(r'.*/mpl/.*kernel', NMSpec(1, 8))], PARAMS, log=False)


def test_rule_shadowed_entirely_is_an_error():
  with pytest.raises(ValueError, match='matched no parameter'):
    rules_lib.resolve([(r'.*/mlp/.*kernel', NMSpec(2, 4)), (r'.*/fc1/kernel', NMSpec(1, 8))],
                      PARAMS, log=False)


def test_not_divisible_names_parameter_and_shape():
  """Regression (reference bug 10, docs/method.md §5): divisibility is checked, errors name the parameter."""
  with pytest.raises(ValueError, match=r"head/kernel.*\(64, 10\).*not divisible by M=128"):
    rules_lib.resolve([(r'head/kernel', NMSpec(1, 128, (-1,)))], PARAMS, log=False)


def test_spec_on_a_bias_is_an_error():
  with pytest.raises(ValueError, match=r"fc1/bias.*not a kernel"):
    rules_lib.resolve([(r'.*/fc1/.*', NMSpec(2, 4))], PARAMS, log=False)


@pytest.mark.parametrize('n,m', [(0, 4), (5, 4), (-1, 8)])
def test_invalid_nm(n, m):
  with pytest.raises(ValueError, match='0 < N <= M'):
    NMSpec(n, m)


def test_parse_nm():
  assert rules_lib.parse_nm('1:16') == (1, 16)
  with pytest.raises(ValueError, match='N:M'):
    rules_lib.parse_nm('1/16')
  with pytest.raises(ValueError, match='0 < N <= M'):
    rules_lib.parse_nm('5:4')


def test_presets_pick_the_paper_layer_sets():
  mlp = _by_path(rules_lib.resolve(nmsparse.preset('mlp', 1, 8), PARAMS, log=False))
  assert [k for k, v in mlp.items() if v is not None] == [
      'encoder/block_0/mlp/fc1/kernel', 'encoder/block_0/mlp/fc2/kernel']
  allp = _by_path(rules_lib.resolve(nmsparse.preset('all', 1, 8), PARAMS, log=False))
  assert allp['encoder/block_0/attn/query/kernel'].axes == (-3,)
  assert allp['encoder/block_0/attn/out/kernel'].axes == (-3, -2)
  assert allp['head/kernel'] is None
  with pytest.raises(ValueError, match='Unknown sparsity preset'):
    nmsparse.preset('attention', 1, 8)


def test_every_match_is_logged(caplog):
  with caplog.at_level(logging.INFO):
    rules_lib.resolve(nmsparse.preset('mlp', 2, 4), PARAMS)
  assert 'encoder/block_0/mlp/fc1/kernel' in caplog.text and '2:4' in caplog.text


def test_nnx_value_attribute_is_dropped_but_a_param_named_value_is_kept():
  K, A = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
  assert rules_lib.path_str((K('layer'), K('kernel'), A('value'))) == 'layer/kernel'
  assert rules_lib.path_str((K('attn'), K('value'))) == 'attn/value'


def test_a_kernel_of_rank_above_two_needs_explicit_axes():
  """Regression (issue 11, item 9): NMSpec(1, 8) on a q/k/v DenseGeneral kernel (embed, heads,
  head_dim) would group along the heads axis; with no axes given it is an error naming them."""
  with pytest.raises(ValueError, match=r"attn/query/kernel.*\(64, 4, 16\).*axes=\(-3,\)"):
    rules_lib.resolve([(r'.*/query/kernel', NMSpec(1, 8))], PARAMS, log=False)
  with pytest.raises(ValueError, match=r"attn/out/kernel.*axes=\(-3, -2\)"):
    rules_lib.resolve([(r'.*/out/kernel', NMSpec(1, 8))], PARAMS, log=False)
  specs = _by_path(rules_lib.resolve([(r'.*/query/kernel', NMSpec(1, 8, (-3,)))], PARAMS, log=False))
  assert specs['encoder/block_0/attn/query/kernel'].axes == (-3,)
  stacked = {'scan': {'kernel': jax.ShapeDtypeStruct((3, 64, 32), jnp.float32)}}
  with pytest.raises(ValueError, match='nn.scan'):
    rules_lib.resolve([(r'scan/kernel', NMSpec(1, 8))], stacked, log=False)


def _s(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


# Parameter names of common Flax models (as their code names them), with their classifier or
# LM heads: each must stay dense under every preset (docs/method.md §3: never the head).
COMMON_MODELS = {
    'big_vision ViT': {'Transformer': {'encoderblock_0': {'MlpBlock_0': {
        'Dense_0': {'kernel': _s(64, 256)}, 'Dense_1': {'kernel': _s(256, 64)}}}},
        'pre_logits': {'kernel': _s(64, 64)}, 'head': {'kernel': _s(64, 16)}},
    'ViT with mlp_head': {'transformer': {'layers_0': {'mlp': {
        'fc1': {'kernel': _s(64, 256)}, 'fc2': {'kernel': _s(256, 64)}}}},
        'mlp_head': {'Dense_0': {'kernel': _s(64, 64)}, 'kernel': _s(64, 16)}},
    'classifier': {'encoder': {'layer_0': {'ffn': {'wi': {'kernel': _s(64, 256)},
                                                   'wo': {'kernel': _s(256, 64)}}}},
                   'classifier': {'kernel': _s(64, 16)}},
    'GPT with lm_head': {'h_0': {'mlp': {'c_fc': {'kernel': _s(64, 256)},
                                         'c_proj': {'kernel': _s(256, 64)}}},
                         'lm_head': {'kernel': _s(64, 512)}},
    'T5X': {'decoder': {'layers_0': {'mlp': {'wi_0': {'kernel': _s(64, 256)},
                                             'wo': {'kernel': _s(256, 64)}}},
                        'logits_dense': {'kernel': _s(64, 512)}},
            'logits': {'kernel': _s(64, 512)}},
}
HEADS = ('head', 'pre_logits', 'mlp_head', 'classifier', 'lm_head', 'logits_dense', 'logits')


@pytest.mark.parametrize('model', sorted(COMMON_MODELS))
@pytest.mark.parametrize('preset', ['mlp', 'mlp_qkv', 'all'])
def test_presets_never_sparsify_a_head(model, preset):
  """Regression (issue 11, item 10): ``mlp`` matched ``mlp_head/kernel``."""
  params = COMMON_MODELS[model]
  specs = _by_path(rules_lib.resolve(nmsparse.preset(preset, 1, 8), params, log=False,
                                     allow_unused=True))
  sparse = {k for k, v in specs.items() if v is not None}
  assert not any(k.split('/')[0] in HEADS or f'/{h}/' in f'/{k}' for k in sparse for h in HEADS), sparse
  mlp = {k for k in specs if any(f'/{b}/' in f'/{k}' for b in ('MlpBlock_0', 'mlp', 'ffn'))
         and not k.startswith('mlp_head')}
  assert sparse == mlp, (sparse, mlp)  # Every MLP kernel, nothing else (no attention here).


def _project_model_names(config_file):
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from experiments.tasks import get_task  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), '..', 'configs', config_file)
  spec = importlib.util.spec_from_file_location(config_file[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(None)
  task = get_task(config.task)
  model = task.build_model(config)
  params = jax.eval_shape(lambda: task.init(model, jax.random.key(0), task.dummy_batch(config, 2)))
  return params, task.preset_kwargs


# What each preset must pick in the project's own models (by hand from docs/method.md §3).
PROJECT_MODELS = {
    'vit_fashion_mnist.py': {
        'mlp': r'Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]/kernel',
        'mlp_qkv': r'Transformer/encoderblock_\d+/(MlpBlock_0/Dense_[01]|MultiHeadDotProductAttention_0/(query|key|value))/kernel',
        'all': r'Transformer/encoderblock_\d+/(MlpBlock_0/Dense_[01]|MultiHeadDotProductAttention_0/(query|key|value|out))/kernel'},
    'swinv2_fashion_mnist.py': {
        'mlp': r'stage_\d+/block_\d+/MlpBlock_0/Dense_[01]/kernel',
        'mlp_qkv': r'stage_\d+/block_\d+/(MlpBlock_0/Dense_[01]|attn/(query|key|value))/kernel'},
    't5_english_text.py': {
        'mlp': r'(en|de)coder/layers_\d+/mlp/(wi_[01]|wo)/kernel',
        'all': r'(en|de)coder/layers_\d+/(mlp/(wi_[01]|wo)|(self_attention|encoder_decoder_attention)/[qkvo])/kernel'},
}


@pytest.mark.parametrize('config_file', sorted(PROJECT_MODELS))
def test_presets_on_the_project_models(config_file):
  import re  # pylint: disable=g-import-not-at-top
  params, kwargs = _project_model_names(config_file)
  names = [k for k, _ in rules_lib.named_leaves(params)]
  for preset, want in PROJECT_MODELS[config_file].items():
    specs = _by_path(rules_lib.resolve(nmsparse.preset(preset, 1, 4, **kwargs), params, log=False,
                                       allow_unused=True))
    sparse = sorted(k for k, v in specs.items() if v is not None)
    assert sparse == sorted(k for k in names if re.fullmatch(want, k)), (config_file, preset)
    assert not any(k.split('/')[0] in HEADS or 'logits' in k or 'cpb_mlp' in k for k in sparse)
