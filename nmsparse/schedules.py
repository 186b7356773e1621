"""Phases, MDGF decay and SDGF structure schedules: pure functions of the step.

Because every schedule is a function of the global step alone, a run resumed at
any step (even mid-interval) sees exactly the values it would have seen.

A run has three phases:
``[0, dense_end)`` dense; ``[dense_end, finetune_start)`` the recipe;
``[finetune_start, total)`` fine-tune at the final N:M. ``t = step - dense_end``
is the recipe's clock: it is 0 at the first sparse step, whatever the warm-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

Duration = Union[int, float]
DENSE, SPARSE, FINETUNE = 0, 1, 2


def to_steps(value: Duration, total: int, what: str) -> int:
  """A duration as steps: a float in [0, 1] is a fraction of ``total``, an int is steps.

  Fractions round half up: ``floor(value * total + 1/2)`` (0.25 of 10 steps is 3).
  """
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise TypeError(f'{what} must be a fraction (float in [0, 1]) or a step count (int), got {value!r}.')
  if isinstance(value, (float, np.floating)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{what} = {value} as a fraction must lie in [0, 1]; give an int for a step count.')
    return int(math.floor(value * total + 0.5))
  if not 0 <= value <= total:
    raise ValueError(f'{what} = {value} steps lies outside the run of {total} steps.')
  return int(value)


@dataclasses.dataclass(frozen=True)
class Phases:
  """Step boundaries of the dense warm-up, the recipe and the fine-tune."""

  total: int
  dense_end: int = 0
  finetune_start: int | None = None

  def __post_init__(self):
    if self.finetune_start is None:
      object.__setattr__(self, 'finetune_start', self.total)
    if not 0 <= self.dense_end <= self.finetune_start <= self.total:
      raise ValueError(
          f'Phases need 0 <= dense_end ({self.dense_end}) <= finetune_start '
          f'({self.finetune_start}) <= total ({self.total}).')

  @classmethod
  def from_durations(cls, total: int, dense: Duration = 0, finetune: Duration = 0) -> 'Phases':
    """Phases from the lengths of the dense warm-up and the fine-tune (fractions or steps)."""
    if total <= 0:
      raise ValueError(f'total steps must be positive, got {total}.')
    d = to_steps(dense, total, 'dense warm-up')
    f = to_steps(finetune, total, 'fine-tune')
    if d + f > total:
      raise ValueError(f'dense warm-up ({d} steps) and fine-tune ({f} steps) exceed the run ({total}).')
    return cls(total, d, total - f)

  @property
  def sparse_steps(self) -> int:
    return self.finetune_start - self.dense_end

  def phase(self, step: jax.Array) -> jax.Array:
    """0 dense, 1 recipe, 2 fine-tune (int32)."""
    step = jnp.asarray(step)
    return (step >= self.dense_end).astype(jnp.int32) + (step >= self.finetune_start).astype(jnp.int32)

  def t(self, step: jax.Array) -> jax.Array:
    """Steps since the start of the sparse phase, clipped at 0 (the decay clock)."""
    return jnp.maximum(jnp.asarray(step) - self.dense_end, 0)


# ----------------------------------------------------------------------------- MDGF decay

DECAYS = ('linear', 'exponential', 'cosine', 'stepwise')


@dataclasses.dataclass(frozen=True)
class Decay:
  """MDGF decay a(t) of the forward (and optionally backward) flow to pruned weights; 1 dense, 0 N:M.

  - ``linear``:      a(t) = max(0, 1 - rate * t)
  - ``exponential``: a(t) = exp(-rate * t)           (reference ViT config: rate 1e-4)
  - ``cosine``:      a(t) = (1 + cos(pi * min(t / duration, 1))) / 2
  - ``stepwise``:    a(t) = max(0, 1 - k * width) for level k = floor(t / interval) < levels,
    and 0 from level ``levels`` on (the predecessor JAX code: 16 levels of width 1/16)

  ``t`` counts steps from the first sparse step. All arguments are in steps: build a
  decay relative to the length of a run's sparse phase with :meth:`over`.
  """

  kind: str = 'exponential'
  rate: float | None = None
  duration: int | None = None
  interval: int | None = None
  levels: int = 16
  width: float | None = None

  def __post_init__(self):
    if self.kind not in DECAYS:
      raise ValueError(f'Unknown decay {self.kind!r}; choose one of {DECAYS}.')
    if self.kind in ('linear', 'exponential') and not (self.rate is not None and self.rate > 0):
      raise ValueError(f'{self.kind} decay needs rate > 0 (per step), got {self.rate}.')
    if self.kind == 'cosine' and not (self.duration and self.duration > 0):
      raise ValueError(f'cosine decay needs duration > 0 steps, got {self.duration}.')
    if self.kind == 'stepwise':
      if not (self.interval and self.interval > 0) or self.levels < 1:
        raise ValueError(f'stepwise decay needs interval > 0 and levels >= 1, got '
                         f'interval={self.interval}, levels={self.levels}.')
      if self.width is not None and not 0 < self.width <= 1:
        raise ValueError(f'stepwise decay width must lie in (0, 1], got {self.width}.')

  @classmethod
  def over(cls, kind: str, sparse_steps: int, *, final: float | None = None,
           duration: float = 1.0, rate: float | None = None, interval: int | None = None,
           levels: int = 16, width: float | None = None) -> 'Decay':
    """A decay shaped relative to a sparse phase of ``sparse_steps`` steps.

    - ``exponential``: a reaches ``final`` at the end of the sparse phase
      (rate = -ln(final) / sparse_steps);
    - ``linear`` and ``cosine``: a reaches 0 after ``duration``, a fraction in (0, 1]
      of the sparse phase;
    - ``stepwise``: ``levels`` equal intervals fill ``duration`` of the sparse phase.

    An absolute ``rate`` (linear, exponential) or ``interval`` (stepwise), in steps,
    takes precedence over the relative setting.
    """
    length = max(int(sparse_steps), 1)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration <= 1:
      raise ValueError(f'{kind} decay duration must be a fraction in (0, 1] of the sparse phase, got '
                       f'{duration!r}; for an absolute length set rate (linear) or interval (stepwise).')
    span = max(int(math.floor(duration * length + 0.5)), 1)
    if kind == 'exponential' and rate is None:
      if final is None or not 0 < final < 1:
        raise ValueError(f'exponential decay needs final (a at the end of the sparse phase) in '
                         f'(0, 1), got {final}; or set an absolute per-step rate.')
      rate = -math.log(final) / length
    elif kind == 'linear' and rate is None:
      rate = 1.0 / span
    elif kind == 'stepwise' and interval is None:
      interval = max(span // max(levels, 1), 1)
    return cls(kind=kind, rate=rate, duration=span, interval=interval, levels=levels, width=width)

  def __call__(self, t: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    if self.kind == 'linear':
      return jnp.maximum(0.0, 1.0 - self.rate * t)
    if self.kind == 'exponential':
      return jnp.exp(-self.rate * t)
    if self.kind == 'cosine':
      return 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t / self.duration, 1.0)))
    width = self.width if self.width is not None else 1.0 / self.levels
    k = jnp.floor(t / self.interval)
    return jnp.where(k >= self.levels, 0.0, jnp.maximum(0.0, 1.0 - k * width))


# ----------------------------------------------------------------------------- SDGF structure

STRUCTURES = ('stepwise', 'geometric', 'densify', 'custom')


def stepwise_stages(n: int, m: int) -> list[tuple[int, int]]:
  """(M-1):M, M/2:M, M/4:M, ... while above N, then N:M (1:8 -> 7:8, 4:8, 2:8, 1:8)."""
  stages, k = [], m - 1
  if k > n:
    stages.append(k)
  k = m // 2
  while k > n:
    if not stages or k < stages[-1]:
      stages.append(k)
    k //= 2
  return [(s, m) for s in stages] + [(n, m)]


@dataclasses.dataclass(frozen=True)
class Structure:
  """SDGF: a piecewise-constant N:M schedule ending at each layer's target N:M.

  - ``stepwise``:  (M-1):M, M/2:M, ..., N:M over K = len(stages) equal intervals
  - ``geometric``: N*2^j : M*2^j for j = levels..0 (same density, coarse to fine groups)
  - ``densify``:   N : M*2^j for j = levels..0 (the reference code's variant)
  - ``custom``:    ``stages`` = ((start, N, M), ...); ``start`` a fraction (float) of the
    sparse phase or a step offset (int) from its start; the first starts at 0 and the
    last is the layer's target N:M.
  """

  kind: str = 'stepwise'
  levels: int = 3
  stages: tuple[tuple[Duration, int, int], ...] = ()

  def __post_init__(self):
    if self.kind not in STRUCTURES:
      raise ValueError(f'Unknown structure schedule {self.kind!r}; choose one of {STRUCTURES}.')
    if self.kind == 'custom' and not self.stages:
      raise ValueError('custom structure schedule needs stages=((start, N, M), ...).')
    if self.levels < 0:
      raise ValueError(f'structure levels must be >= 0, got {self.levels}.')
    object.__setattr__(self, 'stages', tuple(tuple(s) for s in self.stages))

  def patterns(self, n: int, m: int) -> list[tuple[int, int]]:
    """The N:M of each stage for a layer whose target is n:m."""
    if self.kind == 'stepwise':
      return stepwise_stages(n, m)
    if self.kind == 'geometric':
      return [(n * 2**j, m * 2**j) for j in range(self.levels, -1, -1)]
    if self.kind == 'densify':
      return [(n, m * 2**j) for j in range(self.levels, -1, -1)]
    pats = [(int(a), int(b)) for _, a, b in self.stages]
    if pats[-1] != (n, m):
      raise ValueError(f'custom structure schedule ends at {pats[-1][0]}:{pats[-1][1]} but the '
                       f'layer target is {n}:{m}; the last stage must be the target N:M.')
    return pats

  def starts(self, phases: Phases, num_stages: int) -> np.ndarray:
    """Absolute first step of each stage: K equal intervals, or the custom starts."""
    if self.kind != 'custom':
      return stage_starts(num_stages, phases)
    offs = [to_steps(start, phases.sparse_steps, f'custom stage #{i} start')
            for i, (start, _, _) in enumerate(self.stages)]
    if offs[0] != 0 or any(b <= a for a, b in zip(offs, offs[1:])):
      raise ValueError(f'custom stage starts {offs} (steps into the sparse phase) must begin at 0 '
                       'and strictly increase.')
    return phases.dense_end + np.asarray(offs, np.int64)


def stage_starts(num_stages: int, phases: Phases) -> np.ndarray:
  """First step of each of K equal intervals of the sparse phase: dense_end + floor(k L / K)."""
  length = phases.sparse_steps
  return phases.dense_end + (np.arange(num_stages, dtype=np.int64) * length) // num_stages


def stage_index(step: jax.Array, starts: Sequence[int]) -> jax.Array:
  """Index of the stage containing ``step`` (0 before the first start), as int32."""
  starts = jnp.asarray(np.asarray(starts)[1:], jnp.int32)
  return jnp.sum(jnp.asarray(step)[..., None] >= starts, axis=-1).astype(jnp.int32)
