"""Tests for nmsparse.schedules: phases, MDGF decay and SDGF structure schedules.

Expected values are hand-computed or written out from docs/method.md §2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nmsparse.schedules import (
    Decay, Phases, Structure, stage_index, stage_starts, stepwise_stages, to_steps)


def f(x):
  return float(np.asarray(x))


def indices(steps, starts):
  """stage_index of each step (stage_index takes a scalar step)."""
  return np.asarray(jax.vmap(lambda s: stage_index(s, starts))(jnp.asarray(steps)))


# ----------------------------------------------------------------------------- phases

def test_phases_from_fractions():
  p = Phases.from_durations(1000, dense=0.3, finetune=0.2)
  assert (p.total, p.dense_end, p.finetune_start, p.sparse_steps) == (1000, 300, 800, 500)


def test_phases_from_steps():
  p = Phases.from_durations(1000, dense=250, finetune=100)
  assert (p.dense_end, p.finetune_start, p.sparse_steps) == (250, 900, 650)
  p = Phases.from_durations(1000)
  assert (p.dense_end, p.finetune_start, p.sparse_steps) == (0, 1000, 1000)
  p = Phases(1000)
  assert (p.dense_end, p.finetune_start) == (0, 1000)


def test_phases_int_one_is_a_step_and_float_one_is_everything():
  assert Phases.from_durations(1000, dense=1).dense_end == 1
  assert Phases.from_durations(1000, dense=1.0).dense_end == 1000
  assert Phases.from_durations(1000, dense=np.float32(0.5)).dense_end == 500
  assert Phases.from_durations(1000, dense=np.int64(7)).dense_end == 7


def test_to_steps():
  assert to_steps(0.3, 1000, 'x') == 300
  assert to_steps(0.0, 1000, 'x') == 0
  assert to_steps(0, 1000, 'x') == 0
  assert to_steps(1000, 1000, 'x') == 1000
  assert to_steps(0.25, 10, 'x') == 3  # Half rounds up: floor(2.5 + 0.5), not Python's round (2).
  assert to_steps(0.45, 10, 'x') == 5
  assert to_steps(0.24, 10, 'x') == 2
  assert to_steps(1 / 3, 999, 'x') == 333


@pytest.mark.parametrize('kwargs', [
    dict(dense=1.5), dict(dense=-0.1), dict(dense=-1), dict(dense=1001),
    dict(finetune=2.0), dict(dense=0.6, finetune=0.5), dict(dense=600, finetune=500),
])
def test_bad_durations_raise(kwargs):
  with pytest.raises(ValueError):
    Phases.from_durations(1000, **kwargs)


@pytest.mark.parametrize('value', [True, '0.3', None, [0.3]])
def test_bad_duration_types_raise(value):
  with pytest.raises((TypeError, ValueError)):
    Phases.from_durations(1000, dense=value)


def test_bad_phases_raise():
  with pytest.raises(ValueError):
    Phases.from_durations(0)
  with pytest.raises(ValueError):
    Phases(100, dense_end=60, finetune_start=50)
  with pytest.raises(ValueError):
    Phases(100, dense_end=-1)
  with pytest.raises(ValueError):
    Phases(100, finetune_start=101)


def test_phase_index_at_boundaries():
  p = Phases(1000, 300, 800)
  steps = jnp.array([0, 299, 300, 301, 799, 800, 999])
  np.testing.assert_array_equal(np.asarray(p.phase(steps)), [0, 0, 1, 1, 1, 2, 2])
  assert int(p.phase(300)) == 1


def test_t_starts_at_zero_at_first_sparse_step():
  p = Phases.from_durations(1000, dense=0.3)
  np.testing.assert_array_equal(np.asarray(p.t(jnp.array([0, 150, 299, 300, 301, 400, 999]))),
                                [0, 0, 0, 0, 1, 100, 699])
  assert int(Phases(1000).t(0)) == 0 and int(Phases(1000).t(17)) == 17


@pytest.mark.parametrize('dense', [0, 0.1, 0.3, 0.5, 123])
def test_t_zero_whatever_the_warmup(dense):
  p = Phases.from_durations(1000, dense=dense)
  assert int(p.t(p.dense_end)) == 0
  assert int(p.t(p.dense_end + 37)) == 37


@pytest.mark.parametrize('kind', ['exponential', 'linear'])
def test_decay_clock_regression_reference_bug_5_2(kind):
  """Dense warm-up of 30 % of 1000 steps: the decay is exactly 1 at step 300
  (first sparse step) and exp(-rate * 100) / 1 - rate * 100 at step 400."""
  rate = 2e-4 if kind == 'exponential' else 1e-3
  p = Phases.from_durations(1000, dense=0.3)
  d = Decay(kind, rate=rate)
  assert f(d(p.t(300))) == 1.0
  assert f(d(p.t(0))) == 1.0 and f(d(p.t(299))) == 1.0
  expect = math.exp(-rate * 100) if kind == 'exponential' else 1 - rate * 100
  assert f(d(p.t(400))) == pytest.approx(expect, rel=1e-6)
  # Reference bug 2 (docs/method.md §5: origin 0.3 / 100 of the run, i.e. step 3) would give t = 397 here.
  wrong = math.exp(-rate * 397) if kind == 'exponential' else 1 - rate * 397
  assert f(d(p.t(400))) != pytest.approx(wrong, rel=1e-6)


# ----------------------------------------------------------------------------- decay

def test_linear_decay_values():
  d = Decay('linear', rate=0.01)
  ts = jnp.array([0, 1, 10, 50, 99, 100, 101, 1000])
  np.testing.assert_allclose(np.asarray(d(ts)), [1.0, 0.99, 0.9, 0.5, 0.01, 0.0, 0.0, 0.0],
                             rtol=1e-6, atol=1e-6)
  assert f(d(1000)) == 0.0  # Clipped, never negative.


def test_exponential_decay_values():
  d = Decay('exponential', rate=1e-4)
  ts = [0, 1, 1000, 6931, 10000, 50000]
  expect = [1.0, 0.999900005, 0.904837418, 0.500023591, 0.367879441, 0.006737947]
  np.testing.assert_allclose(np.asarray(d(jnp.array(ts))), expect, rtol=1e-5)
  with pytest.raises(ValueError, match='rate'):  # No hidden absolute default.
    Decay('exponential')


def test_cosine_decay_values():
  d = Decay('cosine', duration=100)
  ts = jnp.array([0, 25, 50, 75, 100, 150, 1000])
  # (1 + cos(pi t / T)) / 2: 1, (1 + sqrt(2)/2)/2, 1/2, (1 - sqrt(2)/2)/2, 0, then 0.
  r = math.sqrt(2) / 2
  np.testing.assert_allclose(np.asarray(d(ts)), [1.0, (1 + r) / 2, 0.5, (1 - r) / 2, 0.0, 0.0, 0.0],
                             rtol=1e-5, atol=1e-6)


def test_stepwise_decay_values():
  d = Decay('stepwise', interval=10, levels=4)  # width 1/4
  ts = jnp.array([0, 9, 10, 19, 20, 25, 35, 39, 40, 41, 1000])
  np.testing.assert_allclose(np.asarray(d(ts)),
                             [1.0, 1.0, 0.75, 0.75, 0.5, 0.5, 0.25, 0.25, 0.0, 0.0, 0.0], atol=1e-7)


def test_stepwise_decay_is_zero_from_level_levels_on():
  """Regression (issue 11, item 4): as the predecessor JAX code, a = 0 from level ``levels`` on,
  even when ``levels * width`` < 1 (width 0.05 and 16 levels would otherwise stay at 0.2)."""
  d = Decay('stepwise', interval=10, width=0.05)  # 16 levels
  ts = jnp.array([0, 10, 150, 159, 160, 10**6])
  # k = 0, 1, 15, 15, 16, ...: 1, 0.95, 0.25, 0.25, then 0.
  np.testing.assert_allclose(np.asarray(d(ts)), [1.0, 0.95, 0.25, 0.25, 0.0, 0.0], rtol=1e-6, atol=0)
  d = Decay('stepwise', interval=10, levels=4, width=0.05)
  np.testing.assert_allclose(np.asarray(d(jnp.array([0, 10, 30, 39, 40, 100]))),
                             [1.0, 0.95, 0.85, 0.85, 0.0, 0.0], rtol=1e-6, atol=0)
  # Default: 16 levels of width 1/16.
  d = Decay('stepwise', interval=5)
  np.testing.assert_allclose(np.asarray(d(jnp.array([0, 5, 40, 79, 80, 800]))),
                             [1.0, 15 / 16, 0.5, 1 / 16, 0.0, 0.0], atol=1e-7)
  # A width larger than 1 / levels is clipped at 0.
  d = Decay('stepwise', interval=10, levels=16, width=0.3)
  np.testing.assert_allclose(np.asarray(d(jnp.array([0, 10, 30, 40, 160]))),
                             [1.0, 0.7, 0.1, 0.0, 0.0], atol=1e-6)


def test_decay_over_a_sparse_phase():
  """``Decay.over``: the shape relative to the sparse phase, by hand."""
  d = Decay.over('exponential', 1000, final=0.01)
  assert d.rate == pytest.approx(math.log(100) / 1000)
  assert f(d(1000)) == pytest.approx(0.01, rel=1e-5)
  d = Decay.over('linear', 1000, duration=0.8)
  assert f(d(400)) == pytest.approx(0.5, abs=1e-6) and f(d(800)) == 0.0
  d = Decay.over('linear', 1000, duration=1)  # The whole sparse phase.
  assert f(d(500)) == pytest.approx(0.5, abs=1e-6)
  with pytest.raises(ValueError, match='fraction'):
    Decay.over('linear', 1000, duration=200)
  d = Decay.over('cosine', 1000, duration=0.5)
  assert d.duration == 500 and f(d(250)) == pytest.approx(0.5, abs=1e-6)
  d = Decay.over('stepwise', 1000, levels=4)  # 4 levels of 250 steps.
  assert d.interval == 250
  np.testing.assert_allclose(np.asarray(d(jnp.array([249, 250, 999, 1000]))), [1.0, 0.75, 0.25, 0.0])
  assert Decay.over('exponential', 1000, final=0.5, rate=1e-3).rate == 1e-3  # Absolute wins.
  with pytest.raises(ValueError, match='final'):
    Decay.over('exponential', 1000, final=0.0)


def test_decay_under_jit_and_array_steps():
  d = Decay('linear', rate=0.25)
  np.testing.assert_allclose(np.asarray(jax.jit(d)(jnp.arange(6))),
                             [1.0, 0.75, 0.5, 0.25, 0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize('kwargs', [
    dict(kind='nope'), dict(kind='linear', rate=0.0), dict(kind='exponential', rate=-1.0),
    dict(kind='cosine'), dict(kind='cosine', duration=0), dict(kind='stepwise'),
    dict(kind='stepwise', interval=0), dict(kind='stepwise', interval=10, levels=0),
])
def test_bad_decay_raises(kwargs):
  with pytest.raises(ValueError):
    Decay(**kwargs)


# ----------------------------------------------------------------------------- structure

@pytest.mark.parametrize('n,m,expect', [
    (1, 8, [(7, 8), (4, 8), (2, 8), (1, 8)]),
    (1, 16, [(15, 16), (8, 16), (4, 16), (2, 16), (1, 16)]),
    (2, 4, [(3, 4), (2, 4)]),
    (1, 4, [(3, 4), (2, 4), (1, 4)]),
    (2, 8, [(7, 8), (4, 8), (2, 8)]),
    (4, 8, [(7, 8), (4, 8)]),
    (2, 16, [(15, 16), (8, 16), (4, 16), (2, 16)]),
    (1, 32, [(31, 32), (16, 32), (8, 32), (4, 32), (2, 32), (1, 32)]),
])
def test_stepwise_sequences_from_spec(n, m, expect):
  assert stepwise_stages(n, m) == expect
  assert Structure('stepwise').patterns(n, m) == expect


@pytest.mark.parametrize('n,m', [(1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (1, 16), (2, 16),
                                 (4, 16), (8, 16), (1, 32), (1, 64), (2, 64), (1, 128)])
def test_stepwise_count_power_of_two(n, m):
  assert len(stepwise_stages(n, m)) == int(math.log2(m // n)) + 1


@pytest.mark.parametrize('n,m,expect', [
    (3, 8, [(7, 8), (4, 8), (3, 8)]),
    (3, 16, [(15, 16), (8, 16), (4, 16), (3, 16)]),
    (5, 32, [(31, 32), (16, 32), (8, 32), (5, 32)]),
    (6, 8, [(7, 8), (6, 8)]),
    (7, 8, [(7, 8)]),
    (1, 6, [(5, 6), (3, 6), (1, 6)]),
])
def test_stepwise_non_power_of_two(n, m, expect):
  pats = stepwise_stages(n, m)
  assert pats == expect
  assert pats[-1] == (n, m)
  ns = [a for a, _ in pats]
  assert all(b < a for a, b in zip(ns, ns[1:]))
  assert all(b == m for _, b in pats)


def test_geometric_and_densify():
  assert Structure('geometric').patterns(1, 8) == [(8, 64), (4, 32), (2, 16), (1, 8)]
  assert Structure('geometric').patterns(2, 4) == [(16, 32), (8, 16), (4, 8), (2, 4)]
  assert Structure('geometric', levels=1).patterns(1, 8) == [(2, 16), (1, 8)]
  assert Structure('densify').patterns(1, 8) == [(1, 64), (1, 32), (1, 16), (1, 8)]
  assert Structure('densify', levels=2).patterns(2, 4) == [(2, 16), (2, 8), (2, 4)]
  assert Structure('densify', levels=0).patterns(1, 8) == [(1, 8)]
  # Geometric keeps the density; densify raises the sparsity.
  assert {n / m for n, m in Structure('geometric').patterns(1, 8)} == {1 / 8}


def test_custom_with_fractions():
  s = Structure('custom', stages=((0.0, 4, 8), (0.5, 2, 8), (0.75, 1, 8)))
  assert s.patterns(1, 8) == [(4, 8), (2, 8), (1, 8)]
  p = Phases(1000, 200, 600)  # Sparse phase of 400 steps.
  np.testing.assert_array_equal(s.starts(p, 3), [200, 400, 500])


def test_custom_with_steps():
  s = Structure('custom', stages=[(0, 15, 16), (30, 4, 16), (70, 1, 16)])
  assert s.patterns(1, 16) == [(15, 16), (4, 16), (1, 16)]
  p = Phases(500, 100, 400)
  np.testing.assert_array_equal(s.starts(p, 3), [100, 130, 170])
  starts = s.starts(p, 3)
  np.testing.assert_array_equal(
      indices([0, 100, 129, 130, 169, 170, 499], starts),
      [0, 0, 0, 1, 1, 2, 2])


def test_custom_wrong_end_raises():
  s = Structure('custom', stages=((0.0, 4, 8), (0.5, 2, 8)))
  with pytest.raises(ValueError, match='2:8'):
    s.patterns(1, 8)
  with pytest.raises(ValueError):
    s.patterns(2, 16)


@pytest.mark.parametrize('stages', [
    ((0.1, 2, 8), (0.5, 1, 8)),            # Does not start at 0.
    ((0.0, 2, 8), (0.5, 4, 8), (0.5, 1, 8)),  # Not strictly increasing.
    ((0.0, 2, 8), (0.7, 4, 8), (0.4, 1, 8)),
    ((0.0, 2, 8), (1.5, 1, 8)),            # Fraction above 1.
    ((0, 2, 8), (500, 1, 8)),              # Step beyond the sparse phase.
])
def test_custom_bad_starts_raise(stages):
  p = Phases(1000, 200, 600)
  with pytest.raises(ValueError):
    Structure('custom', stages=stages).starts(p, len(stages))


def test_bad_structure_raises():
  with pytest.raises(ValueError):
    Structure('nope')
  with pytest.raises(ValueError):
    Structure('custom')
  with pytest.raises(ValueError):
    Structure('geometric', levels=-1)


# ----------------------------------------------------------------------------- stage boundaries

def test_stage_starts_equal_intervals():
  p = Phases(600, 100, 500)  # dense_end 100, sparse length 400.
  np.testing.assert_array_equal(stage_starts(4, p), [100, 200, 300, 400])
  np.testing.assert_array_equal(Structure('stepwise').starts(p, 4), [100, 200, 300, 400])
  np.testing.assert_array_equal(stage_starts(1, p), [100])
  # 3 intervals of 400: floor(k * 400 / 3) = 0, 133, 266.
  np.testing.assert_array_equal(stage_starts(3, p), [100, 233, 366])
  np.testing.assert_array_equal(stage_starts(5, Phases(1000, 0, 1000)), [0, 200, 400, 600, 800])


def test_stage_index_boundaries_and_mid_interval():
  starts = [100, 200, 300, 400]
  steps = [0, 99, 100, 150, 199, 200, 250, 299, 300, 399, 400, 450, 499, 500, 10**6]
  np.testing.assert_array_equal(indices(steps, starts),
                                [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3])
  assert int(stage_index(250, starts)) == 1
  assert int(jax.jit(lambda s: stage_index(s, starts))(jnp.int32(300))) == 2
  assert int(stage_index(5, [100])) == 0 and int(stage_index(10**6, [100])) == 0


def pattern_at(step, n, m, structure, phases):
  pats = structure.patterns(n, m)
  starts = structure.starts(phases, len(pats))
  return pats[int(stage_index(step, starts))]


def test_schedule_is_pure_function_of_step_regression_5_8():
  """Evaluating at step s directly equals evaluating along a run up to s; a run resumed
  mid-interval stays in that interval's stage (the reference code reverted to the target)."""
  p = Phases(600, 100, 500)
  s = Structure('stepwise')
  pats = s.patterns(1, 8)
  starts = s.starts(p, len(pats))
  jit_idx = jax.jit(lambda step: stage_index(step, starts))
  along = []
  for step in range(600):  # A run, step by step.
    along.append(int(jit_idx(jnp.int32(step))))
  along = np.array(along)
  expect = np.zeros(600, int)
  expect[200:300], expect[300:400], expect[400:] = 1, 2, 3
  np.testing.assert_array_equal(along, expect)
  for resume in (0, 150, 250, 299, 333, 450, 599):  # Fresh evaluation, e.g. after restore.
    assert int(stage_index(resume, starts)) == along[resume]
    assert pattern_at(resume, 1, 8, s, p) == pats[along[resume]]
  assert pattern_at(250, 1, 8, s, p) == (4, 8)  # Mid-interval: stage 1, not the target 1:8.
  assert pattern_at(150, 1, 8, s, p) == (7, 8)
  assert pattern_at(550, 1, 8, s, p) == (1, 8)  # Fine-tune: the final N:M.


def test_decay_is_pure_function_of_step():
  p = Phases.from_durations(1000, dense=0.3)
  d = Decay('exponential', rate=1e-2)
  f_jit = jax.jit(lambda step: d(p.t(step)))
  for s in (0, 299, 300, 301, 512, 999):  # Each step evaluated fresh, as after a restore.
    assert float(f_jit(jnp.int32(s))) == pytest.approx(math.exp(-1e-2 * max(0, s - 300)), rel=1e-6)
