"""FLOPs accounting: ViT-B/16 inference against docs/method.md §6, training FLOPs by hand."""

import jax
import jax.numpy as jnp
import pytest

from nmsparse import flops, rules
from nmsparse.recipes import Recipe, Sparsifier, recipe_config
from nmsparse.rules import NMSpec


def _s(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def vit_b16():
  """ViT-B/16 parameter shapes at 224 px (Flax naming as in big_vision / the reference ViT)."""
  p = {'embedding': {'kernel': _s(16, 16, 3, 768), 'bias': _s(768)},
       'cls': _s(1, 1, 768),
       'head': {'kernel': _s(768, 1000), 'bias': _s(1000)},
       'Transformer': {'posembed_input': {'pos_embedding': _s(1, 197, 768)},
                       'encoder_norm': {'scale': _s(768), 'bias': _s(768)}}}
  for i in range(12):
    attn = {k: {'kernel': _s(768, 12, 64), 'bias': _s(12, 64)} for k in ('query', 'key', 'value')}
    attn['out'] = {'kernel': _s(12, 64, 768), 'bias': _s(768)}
    p['Transformer'][f'encoderblock_{i}'] = {
        'LayerNorm_0': {'scale': _s(768), 'bias': _s(768)},
        'MultiHeadDotProductAttention_0': attn,
        'MlpBlock_0': {'Dense_0': {'kernel': _s(768, 3072), 'bias': _s(3072)},
                       'Dense_1': {'kernel': _s(3072, 768), 'bias': _s(768)}}}
  return p


def vit_tokens(path):
  if path.startswith('embedding/'):
    return 196  # 14 x 14 patches
  if path.startswith('head/'):
    return 1  # class token only
  return 197


VIT_EXTRA = 12 * 2 * 197 * 197 * 768  # q k^T and attn @ v per block

# docs/method.md §6 (G MACs).
TABLE = {
    'mlp': {(2, 4): 11.99, (1, 4): 9.20, (1, 8): 7.80, (1, 16): 7.11, (1, 32): 6.76, (1, 128): 6.50},
    'mlp_qkv': {(2, 4): 9.90, (1, 4): 6.06, (1, 8): 4.14, (1, 16): 3.19, (1, 32): 2.71,
                (1, 128): 2.35},
}
def _vit_macs(preset=None, n=1, m=1):
  p = vit_b16()
  specs = None if preset is None else rules.resolve(rules.preset(preset, n, m), p, log=False)
  return flops.inference_macs(p, specs, tokens_per_kernel=vit_tokens, extra_macs=VIT_EXTRA)


def test_vit_dense_total():
  r = _vit_macs()
  assert round(r['macs'] / 1e9, 2) == 17.56
  # Hand count: per block 197 * (3*768*768 + 768*768 + 2*768*3072) + attention; patch embed; head.
  block = 197 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 197 * 197 * 768
  assert r['macs'] == 12 * block + 196 * 16 * 16 * 3 * 768 + 768 * 1000
  assert r['dense_macs'] == r['macs'] and r['sparsified_dense_macs'] == 0
  # Embeddings, biases and norms are not kernels.
  assert not any('pos_embedding' in k or 'bias' in k or k == 'cls' for k in r['per_param'])
  assert len(r['per_param']) == 12 * 6 + 2


@pytest.mark.parametrize('preset', ['mlp', 'mlp_qkv'])
def test_vit_table(preset):
  """Exact MACs from a hand count; the docs/method.md §6 table (2 decimals, rounded via 3) within 0.0055 G."""
  dense = 12 * (197 * (4 * 768 * 768 + 2 * 768 * 3072) + 2 * 197 * 197 * 768) + 196 * 16 * 16 * 3 * 768 + 768 * 1000
  sparsified = 12 * 197 * (2 * 768 * 3072 + (3 * 768 * 768 if preset == 'mlp_qkv' else 0))
  got = {}
  for (n, m), want in TABLE[preset].items():
    r = _vit_macs(preset, n, m)
    hand = dense - sparsified * (1 - n / m)
    assert r['macs'] == pytest.approx(hand, rel=1e-12), (preset, n, m)
    assert abs(r['macs'] / 1e9 - want) <= 0.0055, (preset, n, m, r['macs'] / 1e9, want)
    assert r['dense_macs'] == dense
    got[n, m] = r['macs']
  saving = {'mlp': -40.7, 'mlp_qkv': -67.8}[preset]
  assert round(100 * (got[1, 16] / got[2, 4] - 1), 1) == saving


def test_inference_macs_int_tokens_and_stacked_kernels():
  p = {'scan': {'kernel': _s(3, 8, 4)}, 'emb': {'embedding': _s(10, 4)}, 'b': {'kernel': _s(4)}}
  specs = rules.resolve([('scan/kernel', NMSpec(1, 4, (-2,)))], p, log=False)
  r = flops.inference_macs(p, specs, tokens_per_kernel=5, extra_macs=7)
  assert r['per_param'] == {'scan/kernel': 5 * 3 * 8 * 4 / 4}
  assert r['macs'] == 5 * 3 * 8 * 4 / 4 + 7
  assert r['dense_macs'] == 5 * 3 * 8 * 4 + 7
  # include=None counts every rank >= 2 leaf (here the embedding table too).
  r = flops.inference_macs(p, specs, tokens_per_kernel=5, include=None)
  assert set(r['per_param']) == {'scan/kernel', 'emb/embedding'}
  with pytest.raises(ValueError, match='tokens'):
    flops.inference_macs(p, specs, tokens_per_kernel=lambda path: -1)


# ----------------------------------------------------------------------------- training

TINY = {'layer': {'kernel': _s(8, 4), 'bias': _s(4)}}
F = 10 * 8 * 4  # tokens * size: dense forward MACs of the tiny kernel per step


def _tiny(name, total=10, nm=(2, 4), **overrides):
  specs = rules.resolve([('layer/kernel', NMSpec(*nm, (0,)))], TINY, log=False)
  return Sparsifier(Recipe.from_config(recipe_config(name, **overrides), total), specs)


def test_training_ste_three_phases_by_hand():
  sp = _tiny('ste', dense_steps=2, finetune_steps=3)
  r = flops.training_flops(TINY, None, sp, tokens=10)
  dense = 2 * 3 * F  # 1920 FLOPs per step
  sparse = 2 * (F / 2 + F / 2 + F)  # forward + input grad at 2:4, weight grad dense: 1280
  assert r['per_phase'] == {'dense': 2 * dense, 'sparse': 5 * sparse, 'finetune': 3 * sparse}
  assert r['flops'] == 2 * 1920 + 5 * 1280 + 3 * 1280 == 14080
  assert r['dense_flops'] == 10 * 1920
  assert [(s['phase'], s['start'], s['end']) for s in r['segments']] == [
      ('dense', 0, 2), ('sparse', 2, 7), ('finetune', 7, 10)]
  # Frozen fine-tune: a hard mask, the weight gradient sparse too.
  r = flops.training_flops(TINY, None, _tiny('ste', dense_steps=2, finetune_steps=3,
                                               finetune_mask='frozen'), tokens=10)
  assert r['per_phase']['finetune'] == 3 * 2 * (3 * F / 2) == 2880
  # batch_size and extra MACs scale per step.
  r = flops.training_flops(TINY, None, sp, tokens=10, batch_size=4, extra_macs=100)
  assert r['flops'] == 4 * 14080 + 10 * 2 * 3 * 100 * 4


@pytest.mark.parametrize('name,finetune_mask', [('oneshot', 'per_step'), ('hard', 'frozen'),
                                                 ('hard', 'per_step')])
def test_training_hard_mask_recipes_are_sparse_everywhere(name, finetune_mask):
  """Hard masks make all three matmuls 1:2 sparse; a per-step (STE) fine-tune needs the dense
  weight gradient (oneshot keeps its frozen mask in the fine-tune whatever finetune_mask says)."""
  sp = _tiny(name, dense_steps=2, finetune_steps=3, finetune_mask=finetune_mask)
  r = flops.training_flops(TINY, None, sp, tokens=10)
  assert r['per_phase']['sparse'] == 5 * 2 * 3 * F / 2
  ste = name == 'hard' and finetune_mask == 'per_step'
  assert r['per_phase']['finetune'] == 3 * 2 * ((2 * F / 2 + F) if ste else 3 * F / 2)


def test_training_mdgf_dense_forward_while_decay_large():
  # a(t) = 1 - 0.25 t: 1, .75, .5, .25, then 0 from t = 4: 4 dense-forward steps, then 2 sparse.
  sp = _tiny('mdgf', dense_steps=2, finetune_steps=2, **{'decay.kind': 'linear', 'decay.rate': 0.25})
  r = flops.training_flops(TINY, None, sp, tokens=10)
  assert r['per_phase']['sparse'] == 4 * 2 * 3 * F + 2 * 2 * (F / 2 + F / 2 + F)
  assert [(s['forward'], s['start'], s['end']) for s in r['segments'] if s['phase'] == 'sparse'] == [
      ('dense', 2, 6), ('sparse', 6, 8)]
  # With threshold 0.6 only a = 1 and .75 count as dense: 2 dense-forward steps.
  r = flops.training_flops(TINY, None, sp, tokens=10, mdgf_threshold=0.6)
  assert [s['end'] for s in r['segments'] if s['phase'] == 'sparse'] == [4, 8]


def test_training_sdgf_stage_densities():
  # 1:8 stepwise: 7:8, 4:8, 2:8, 1:8 over 8 sparse steps, 2 steps each.
  sp = _tiny('sdgf', total=12, nm=(1, 8), dense_steps=2, finetune_steps=2)
  r = flops.training_flops(TINY, None, sp, tokens=10)
  want = sum(2 * 2 * (2 * F * d + F) for d in (7 / 8, 4 / 8, 2 / 8, 1 / 8))
  assert r['per_phase']['sparse'] == pytest.approx(want, rel=1e-12)
  assert [s['stage'] for s in r['segments'] if s['phase'] == 'sparse'] == [0, 1, 2, 3]


def test_training_step_needs_switch_step():
  sp = _tiny('step', total=10, finetune_steps=2, **{'step.t_min': 0.0, 'step.t_max': None})
  with pytest.raises(ValueError, match='switch_step'):
    flops.training_flops(TINY, None, sp, tokens=10)
  r = flops.training_flops(TINY, None, sp, tokens=10, switch_step=3)
  assert r['per_phase'] == {'dense': 3 * 2 * 3 * F, 'sparse': 5 * 2 * 2 * F,
                            'finetune': 2 * 2 * 2 * F}


def test_training_dense_recipe_and_config_input():
  r = flops.training_flops(TINY, rules.resolve([('layer/kernel', NMSpec(2, 4, (0,)))], TINY,
                                                log=False),
                           recipe_config('dense'), tokens=10, total_steps=10)
  assert r['flops'] == r['dense_flops'] == 10 * 2 * 3 * F and r['ratio'] == 1.0
