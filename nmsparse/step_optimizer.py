"""STEP: Adam with a frozen second moment for N:M mask learning (Lu et al., 2023).

Two phases, one global and one-way switch between them:

* Precondition phase: ``optax.scale_by_adam`` on every parameter,
  ``m_t = b1 m_{t-1} + (1 - b1) g_t``, ``v_t = b2 v_{t-1} + (1 - b2) g_t^2``,
  ``u_t = m_hat_t / (sqrt(v_hat_t + eps_root) + eps)``. For the N:M-sparsified
  leaves AutoSwitch records ``Z_t = mean |v_t - v_{t-1}|`` (over all their
  elements together) in a ring buffer of the last ``window`` steps.
* Mask-learning phase: ``m`` continues; for the sparsified leaves ``v`` stays
  frozen at its value ``v_T0`` at the switch step ``T0`` and
  ``u_t = m_hat_t / (sqrt(v_T0 / (1 - b2^T0) + eps_root) + frozen_eps)``.
  Other leaves keep ordinary Adam.

The switch fires at the end of step ``t`` (``t`` = the incremented count) when
``t > t_max`` or when ``Zbar_t < threshold and t > t_min``, with ``Zbar_t`` the
mean of the recorded window. The phase flag, the switch step and the window are
arrays in the optimizer state: everything is jit-friendly, shards and
checkpoints with the rest, and a resumed run keeps its phase. The train step
reads the phase with :func:`switched` (a traced boolean) to turn the mask on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

_STATISTICS = ('mean', 'geomean')
_TINY = float(jnp.finfo(jnp.float32).tiny)

MaskOrFn = Union[Any, Callable[[optax.Params], Any]]


class StepAdamState(NamedTuple):
  """State of :func:`scale_by_step_adam`; ``count, mu, nu`` as in optax's Adam."""

  count: jax.Array  # int32 scalar: number of updates applied.
  mu: optax.Updates  # First moment.
  nu: optax.Updates  # Second moment; frozen for the sparse leaves once switched.
  switched: jax.Array  # bool scalar: True once in the mask-learning phase.
  switch_step: jax.Array  # int32 scalar: count at which the switch fired, -1 before.
  z_window: jax.Array  # float32 (window,): ring buffer of Z_t, slot (t - 1) % window.
  z_count: jax.Array  # int32 scalar: number of Z values recorded so far.


# --------------------------------------------------------------------------- #
# Option handling.


def _concrete(x) -> Optional[float]:
  """``float(x)`` if ``x`` is a concrete scalar, else None (traced or odd)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _check(cond: bool, option: str, message: str, value) -> None:
  if not cond:
    raise ValueError(f'STEP option {option!r} {message}, got {value!r}.')


def _check_options(*, b1, b2, eps, eps_root, t_min, t_max, threshold, window,
                   statistic, scale_free, frozen_eps) -> None:
  """Eager validation; values traced by ``inject_hyperparams`` are skipped."""
  if (v := _concrete(b1)) is not None:
    _check(0.0 <= v < 1.0, 'b1', 'must be in [0, 1)', b1)
  if (v := _concrete(b2)) is not None:
    _check(0.0 < v < 1.0, 'b2', 'must be in (0, 1)', b2)
  for name, value in (('eps', eps), ('eps_root', eps_root), ('frozen_eps', frozen_eps)):
    if value is not None and (v := _concrete(value)) is not None:
      _check(v >= 0.0, name, 'must be >= 0', value)
  if (v := _concrete(threshold)) is not None:
    _check(v >= 0.0, 'threshold', 'must be >= 0 (0 disables the Z test)', threshold)
  lo = _concrete(t_min)
  if lo is not None:
    _check(lo >= 0, 't_min', 'must be >= 0', t_min)
  if t_max is not None and (hi := _concrete(t_max)) is not None:
    _check(hi >= 0, 't_max', 'must be >= 0 or None', t_max)
    if lo is not None:
      _check(lo <= hi, 't_max', f'must be >= t_min={t_min!r}', t_max)
  if window is not None:
    w = None if isinstance(window, bool) else _concrete(window)
    if w is not None or not isinstance(window, jax.Array):  # Skip if traced.
      _check(w is not None and w == int(w) and w >= 1, 'window',
             'must be an integer >= 1 or None', window)
  _check(statistic in _STATISTICS, 'statistic', f'must be one of {_STATISTICS}', statistic)
  _check(isinstance(scale_free, bool), 'scale_free', 'must be a bool', scale_free)


def _window_size(window, b2) -> Optional[int]:
  """Static window length: ``window`` or ``round(1 / (1 - b2))``; None if traced."""
  if window is not None:
    w = _concrete(window)
    return None if w is None else int(w)
  v = _concrete(b2)
  return None if v is None else max(1, round(1.0 / (1.0 - v)))


def _sparse_flags(sparse_mask: MaskOrFn, tree) -> list[bool]:
  """Static per-leaf flags (True = sparse) aligned with ``jax.tree.leaves(tree)``.

  ``sparse_mask`` is a pytree of bools with the structure of ``tree`` (or a
  prefix of it: one bool then covers a whole subtree), or a callable returning
  one, as in ``optax.masked``.
  """
  mask = sparse_mask(tree) if callable(sparse_mask) else sparse_mask
  if mask is None:
    raise ValueError("STEP option 'sparse_mask' is required (a pytree of bools "
                     'or a callable params -> pytree of bools).')

  def as_bool(m):
    try:
      return bool(m)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
      raise ValueError(f"STEP option 'sparse_mask' needs static Python bools as "
                       f'leaves, got {m!r}.') from e

  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: as_bool(m), sub), mask, tree)
    flags = jax.tree.structure(tree).flatten_up_to(full)
  except (ValueError, TypeError) as e:
    if 'sparse_mask' in str(e):
      raise
    raise ValueError("STEP option 'sparse_mask' must match the parameter tree "
                     f'(or be a prefix of it): {e}') from e
  return [bool(f) for f in flags]


def _window_mean(z_window: jax.Array, z_count: jax.Array) -> jax.Array:
  """Mean of the recorded ring-buffer entries; nan when none is recorded."""
  n = jnp.minimum(z_count, z_window.shape[0])
  valid = jnp.arange(z_window.shape[0]) < n
  return jnp.sum(jnp.where(valid, z_window, 0.0)) / n.astype(jnp.float32)


@functools.partial(jax.jit, inline=True)
def _debias(decay, count):
  """``1 - decay**count``, computed as ``optax.tree.bias_correction`` computes it."""
  return 1 - decay**count


# --------------------------------------------------------------------------- #
# Transformation.


def scale_by_step_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    sparse_mask: MaskOrFn,
    t_min: jax.typing.ArrayLike = 0,
    t_max: Optional[jax.typing.ArrayLike] = None,
    threshold: jax.typing.ArrayLike = 1e-8,
    window: Optional[int] = None,
    statistic: str = 'mean',
    scale_free: bool = False,
    frozen_eps: Optional[jax.typing.ArrayLike] = None,
) -> optax.GradientTransformation:
  r"""Adam that freezes the second moment of the N:M-sparse leaves (STEP).

  Before the switch this is ``optax.scale_by_adam``: the moments bit for bit,
  the update to within a few ulp (the sparse leaves divide by a selected
  bias-correction scalar in one fused in-place pass). AutoSwitch records, per step, ``Z_t = mean |v_t - v_{t-1}|`` over all elements of the
  sparse leaves (``statistic='geomean'``: ``exp(mean log(|dv| + tiny))``) and
  fires at the end of step ``t`` if ``t > t_max`` or
  ``(Zbar_t < threshold and t > t_min)``, ``Zbar_t`` being the mean of the last
  ``window`` values of Z (fewer before ``window`` steps); with ``scale_free``
  the tested quantity is ``Zbar_t / mean(v_t)`` (raw ``v`` of the sparse
  leaves). After the switch the sparse leaves use
  ``m_hat_t / (sqrt(v_T0 / (1 - b2^T0) + eps_root) + frozen_eps)``.

  Cost: once switched, the step costs what Adam's does (one pass over
  ``g, m, v``); before, Z adds one read of ``g`` and ``v`` of the sparse leaves.

  Args:
    b1, b2, eps, eps_root: as in ``optax.scale_by_adam``.
    sparse_mask: pytree of bools (True = N:M-sparsified kernel), or a callable
      params -> such pytree. Only True leaves get a frozen v and feed Z.
    t_min: the Z test can fire only for ``t > t_min``.
    t_max: switch at step ``t_max + 1`` at the latest; None: no bound.
    threshold: AutoSwitch threshold on ``Zbar`` (0 disables the Z test).
    window: AutoSwitch window length; default ``round(1 / (1 - b2))``.
    statistic: ``'mean'`` or ``'geomean'`` of ``|dv|`` over the sparse elements.
    scale_free: test ``Zbar / mean(v)`` instead of ``Zbar``.
    frozen_eps: ``eps`` of the mask-learning phase for the sparse leaves;
      default ``eps``.

  Returns:
    An ``optax.GradientTransformation`` with state :class:`StepAdamState`.
  """
  _check_options(b1=b1, b2=b2, eps=eps, eps_root=eps_root, t_min=t_min,
                 t_max=t_max, threshold=threshold, window=window,
                 statistic=statistic, scale_free=scale_free, frozen_eps=frozen_eps)
  if sparse_mask is None:
    raise ValueError("STEP option 'sparse_mask' is required (a pytree of bools "
                     'or a callable params -> pytree of bools).')
  init_window = _window_size(window, b2)

  def init_fn(params):
    _sparse_flags(sparse_mask, params)  # Validate the mask against the params.
    if init_window is None:
      raise ValueError("STEP option 'window' must be given explicitly when b2 "
                       'is not a concrete number (e.g. traced hyperparameters).')
    return StepAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params),
        nu=optax.tree.zeros_like(params),
        switched=jnp.zeros([], jnp.bool_),
        switch_step=jnp.full([], -1, jnp.int32),
        z_window=jnp.zeros([init_window], jnp.float32),
        z_count=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None):
    del params
    flags = _sparse_flags(sparse_mask, updates)
    treedef = jax.tree.structure(updates)
    was = state.switched

    # Same operations, in the same order, as optax.scale_by_adam.
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu_adam = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu_adam, b2, count_inc)

    # AutoSwitch: Z_t over the sparse leaves, computed only while not switched. It
    # recomputes v_t from (g_t, v_{t-1}), and the barrier below orders it before the
    # in-place update of v: no copy of v, and no pass over it once switched.
    nu_old = treedef.flatten_up_to(state.nu)
    sparse_g = [g for f, g in zip(flags, treedef.flatten_up_to(updates)) if f]
    sparse_old = [v for f, v in zip(flags, nu_old) if f]
    size = sum(v.size for v in sparse_old)

    def statistics():
      new = optax.tree.cast_like(
          optax.tree.update_moment_per_elem_norm(sparse_g, sparse_old, b2, 2), sparse_old)
      def total(fn, leaves):
        return sum(jnp.sum(fn(*x), dtype=jnp.float32) for x in zip(*leaves)) / size
      absdv = lambda a, b: jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))
      if statistic == 'mean':
        z = total(absdv, (new, sparse_old))
      else:
        z = jnp.exp(total(lambda a, b: jnp.log(absdv(a, b) + _TINY), (new, sparse_old)))
      mean_v = total(lambda a: a.astype(jnp.float32), (new,)) if scale_free else jnp.float32(1)
      return z.astype(jnp.float32), mean_v

    nan = jnp.float32(jnp.nan)
    z, mean_v = (nan, nan) if size == 0 else lax.cond(was, lambda: (nan, nan), statistics)
    frozen, z, mean_v = lax.optimization_barrier((was, z, mean_v))

    # Sparse leaves, once switched: v frozen at v_T0, bias-corrected with T0. Per
    # leaf one elementwise expression of (g, m_old, v_old), as in Adam, so XLA fuses
    # it into one in-place pass with no copy of v. (Dividing by the selected scalar
    # may round the last bit differently from optax's tree-wide division.)
    bc = jnp.where(frozen, _debias(b2, jnp.maximum(state.switch_step, 1)), _debias(b2, count_inc))
    eps_sparse = eps if frozen_eps is None else jnp.where(frozen, frozen_eps, eps)
    nu_new, out = [], []
    for flag, m, v, v_hat, v_old in zip(
        flags, treedef.flatten_up_to(mu_hat), treedef.flatten_up_to(nu_adam),
        treedef.flatten_up_to(nu_hat), nu_old):
      if flag:
        v = jnp.where(frozen, v_old, v)
        v_hat = v / bc.astype(v.dtype)
      out.append(m / (jnp.sqrt(v_hat + eps_root) + (eps_sparse if flag else eps)))
      nu_new.append(v)
    nu = optax.tree.cast_like(treedef.unflatten(nu_new), state.nu)

    window_len = state.z_window.shape[0]
    z_window = jnp.where(
        was, state.z_window,
        state.z_window.at[state.z_count % window_len].set(z.astype(jnp.float32)))
    z_count = jnp.where(was, state.z_count, optax.safe_increment(state.z_count))
    zbar = _window_mean(z_window, z_count)
    tested = zbar / mean_v if scale_free else zbar
    fire = (tested < threshold) & (count_inc > t_min)
    if t_max is not None:
      fire = fire | (count_inc > t_max)
    fire = fire & ~was

    new_state = StepAdamState(
        count=count_inc,
        mu=mu,
        nu=nu,
        switched=was | fire,
        switch_step=jnp.where(fire, count_inc, state.switch_step).astype(jnp.int32),
        z_window=z_window,
        z_count=z_count,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def step_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    weight_decay: jax.typing.ArrayLike = 0.0,
    weight_decay_mask: Optional[MaskOrFn] = None,
    sparse_mask: MaskOrFn,
    eps_root: jax.typing.ArrayLike = 0.0,
    t_min: jax.typing.ArrayLike = 0,
    t_max: Optional[jax.typing.ArrayLike] = None,
    threshold: jax.typing.ArrayLike = 1e-8,
    window: Optional[int] = None,
    statistic: str = 'mean',
    scale_free: bool = False,
    frozen_eps: Optional[jax.typing.ArrayLike] = None,
) -> optax.GradientTransformation:
  r"""STEP optimizer: :func:`scale_by_step_adam`, AdamW-style decay, learning rate.

  ``u_t = -lr_t * (step_adam_t + weight_decay * p_t)`` (decoupled decay as in
  ``optax.adamw``, applied where ``weight_decay_mask`` is True; by default to
  every leaf). With no switch and ``weight_decay=0`` it equals ``optax.adam``
  up to float rounding. The STEP options are explicit keywords (not ``**kwargs``) so
  ``optax.inject_hyperparams(step_adam)`` works; pass a callable
  ``sparse_mask`` through ``static_args`` there.
  """
  if (v := _concrete(weight_decay)) is not None:
    _check(v >= 0.0, 'weight_decay', 'must be >= 0', weight_decay)
  parts = [scale_by_step_adam(
      b1, b2, eps, eps_root, sparse_mask=sparse_mask, t_min=t_min, t_max=t_max,
      threshold=threshold, window=window, statistic=statistic,
      scale_free=scale_free, frozen_eps=frozen_eps)]
  # Static decision (a Python 0 skips the stage) so init and update agree even
  # when inject_hyperparams turns weight_decay into an array.
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# --------------------------------------------------------------------------- #
# State access.


def find_step_state(opt_state) -> StepAdamState:
  """The single :class:`StepAdamState` inside any nested optax state.

  Walks chains, ``inject_hyperparams``, ``masked``, ``multi_transform`` and any
  other pytree. Raises ValueError when there is none or more than one.
  """
  found = [
      x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, StepAdamState))
      if isinstance(x, StepAdamState)
  ]
  if not found:
    raise ValueError(
        'No StepAdamState in this optimizer state (type '
        f'{type(opt_state).__name__}): build the optimizer with step_adam or '
        'scale_by_step_adam, and restore checkpoints with a target so the '
        'NamedTuple types survive.')
  if len(found) > 1:
    raise ValueError(f'Found {len(found)} StepAdamStates in this optimizer state; '
                     'expected exactly one (STEP switches globally).')
  return found[0]


def switched(opt_state) -> jax.Array:
  """Bool scalar: True once the STEP optimizer is in the mask-learning phase."""
  return find_step_state(opt_state).switched


def autoswitch_statistic(state: StepAdamState) -> jax.Array:
  """``Zbar``: mean of the recorded window entries of Z (nan before any)."""
  return _window_mean(state.z_window, state.z_count)
