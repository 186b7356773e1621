"""Gradient-flow ops: how a masked weight is used forward and how its gradient flows back.

Notation: ``w`` dense weights (what the optimizer updates), ``mask`` the boolean
keep-mask (1 kept, 0 pruned), ``g = dL/dw~`` the gradient reaching the effective
weight ``w~`` used in the forward pass:

==================  ===============================  ====================================
op                  forward ``w~``                   gradient reaching ``w``
==================  ===============================  ====================================
``hard_mask``       mask * w                         mask * g
``ste``             mask * w                         g
``srste``           mask * w                         g + lam * (1 - mask) * w
``mdgf``            (mask + (1 - mask) a) * w        g (``straight_through``) or
                                                     (mask + (1 - mask) a) * g (``decay_scaled``)
==================  ===============================  ====================================

The mask receives no gradient; the decay ``a`` receives none either.

Every op is one setting of the scalars ``(fwd, bwd, lam)`` of :func:`flow`, one
``jax.custom_vjp``: ``hard_mask`` ``(0, 0, 0)``, ``ste`` ``(0, 1, 0)``, ``srste``
``(0, 1, lam)``, ``mdgf`` ``(a, 1, 0)`` or ``(a, a, 0)``, and a dense weight
``(1, 1, 0)``. A train step selects the scalars by phase, so one op serves every
phase with no switch.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp

MDGF_BACKWARDS = ('straight_through', 'decay_scaled')
# The authors' reference PyTorch code passes the gradient straight through.
DEFAULT_MDGF_BACKWARD = 'straight_through'


def _masked(w, mask):
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


def hard_mask(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Forward ``mask * w``; backward ``mask * g`` (pruned weights get no gradient)."""
  return flow(w, mask, 0.0, 0.0)


def ste(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Straight-through estimator: forward ``mask * w``; backward ``g`` to every weight."""
  return flow(w, mask, 0.0, 1.0)


def srste(w: jax.Array, mask: jax.Array, lam: Any = 2e-4) -> jax.Array:
  """SR-STE (Zhou et al. 2021): forward ``mask * w``; backward ``g + lam * (1 - mask) * w``."""
  return flow(w, mask, 0.0, 1.0, lam)


def mdgf(w: jax.Array, mask: jax.Array, a: jax.Array,
         backward: str = DEFAULT_MDGF_BACKWARD) -> jax.Array:
  """MDGF: forward ``(mask + (1 - mask) a) * w``.

  ``backward='straight_through'`` (default, as the authors' PyTorch code) sends
  ``g`` to every weight; ``'decay_scaled'`` (as the predecessor JAX code) sends
  ``(mask + (1 - mask) a) * g``, the true gradient of the forward.
  """
  if backward not in MDGF_BACKWARDS:
    raise ValueError(f'Unknown MDGF backward {backward!r}; choose one of {MDGF_BACKWARDS}.')
  return flow(w, mask, a, a if backward == 'decay_scaled' else 1.0)


def flow(w: jax.Array, mask: jax.Array, fwd: Any = 0.0, bwd: Any = 1.0,
         lam: Any = 0.0) -> jax.Array:
  """The general gradient-flow op; the ops above are settings of its three scalars.

  Forward ``w~ = where(mask, w, fwd * w)``; the gradient reaching ``w`` is
  ``where(mask, g, bwd * g) + where(mask, 0, lam * w)``. ``fwd``, ``bwd`` and
  ``lam`` may be traced scalars (a phase-dependent choice); Python numbers are
  static, and the common values (``fwd`` 0 or 1, ``bwd`` 1, ``lam`` 0) compile to
  no arithmetic at all. With ``fwd = bwd = 1`` and ``lam = 0`` it is the identity,
  forward and backward, whatever the mask.
  """
  statics = tuple(_static(v) for v in (fwd, bwd, lam))
  arrays = tuple(jnp.zeros((), jnp.float32) if st is not None else jnp.asarray(v)
                 for st, v in zip(statics, (fwd, bwd, lam)))
  return _flow(w, mask, *arrays, statics)


def _static(v) -> Optional[float]:
  """``float(v)`` for a Python number, None for an array (traced or not)."""
  return float(v) if isinstance(v, (int, float)) else None


def _scaled(x, mask, a, static):
  """``where(mask, x, a * x)``, with the static cases a = 0 and a = 1 folded."""
  if static == 1.0:
    return x
  if static == 0.0:
    return _masked(x, mask)
  a = a if static is None else static
  return jnp.where(mask, x, (a * x).astype(x.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flow(w, mask, fwd, bwd, lam, statics):
  return _scaled(w, mask, fwd, statics[0])


def _flow_fwd(w, mask, fwd, bwd, lam, statics):
  regularize = statics[2] != 0.0
  res = (mask if regularize or statics[1] != 1.0 else None, bwd, lam, w if regularize else None,
         (fwd, bwd, lam))
  return _scaled(w, mask, fwd, statics[0]), res


def _flow_bwd(statics, res, g):
  mask, bwd, lam, w, scalars = res
  dw = _scaled(g, mask, bwd, statics[1])
  if w is not None:
    lam = lam if statics[2] is None else statics[2]
    dw = dw + jnp.where(mask, jnp.zeros((), g.dtype), (lam * w).astype(g.dtype))
  return dw, None, *(jnp.zeros_like(x) for x in scalars)


_flow.defvjp(_flow_fwd, _flow_bwd)
