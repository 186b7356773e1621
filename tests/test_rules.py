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
  assert specs['encoder/block_0/mlp/fc1/kernel'] == NMSpec(1, 8)
  assert specs['encoder/block_0/mlp/fc2/kernel'] is None
  assert specs['encoder/block_0/mlp/fc1/bias'] is None
  assert specs['head/kernel'] is None


def test_each_layer_keeps_its_own_nm():
  """Regression (reference bug 3): enabling Q/K/V sparsity must not overwrite the MLP's N:M."""
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
  """Regression (reference bug 10): divisibility is checked, errors name the parameter."""
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
