"""Gradient-flow ops: how a masked weight is used forward and how its gradient flows back.

Notation: ``w`` dense weights (what the optimizer updates), ``mask`` the boolean
keep-mask (1 kept, 0 pruned), ``g = dL/dw~`` the gradient reaching the effective
weight ``w~`` used in the forward pass. Each op is a ``jax.custom_vjp``:

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
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

MDGF_BACKWARDS = ('straight_through', 'decay_scaled')
# The authors' reference PyTorch code passes the gradient straight through.
DEFAULT_MDGF_BACKWARD = 'straight_through'


def _masked(w, mask):
  return jnp.where(mask, w, jnp.zeros((), w.dtype))


@jax.custom_vjp
def hard_mask(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Forward ``mask * w``; backward ``mask * g`` (pruned weights get no gradient)."""
  return _masked(w, mask)


def _hard_fwd(w, mask):
  return _masked(w, mask), mask


def _hard_bwd(mask, g):
  return _masked(g, mask), None


hard_mask.defvjp(_hard_fwd, _hard_bwd)


@jax.custom_vjp
def ste(w: jax.Array, mask: jax.Array) -> jax.Array:
  """Straight-through estimator: forward ``mask * w``; backward ``g`` to every weight."""
  return _masked(w, mask)


def _ste_fwd(w, mask):
  return _masked(w, mask), None


def _ste_bwd(_, g):
  return g, None


ste.defvjp(_ste_fwd, _ste_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def srste(w: jax.Array, mask: jax.Array, lam: float = 2e-4) -> jax.Array:
  """SR-STE (Zhou et al. 2021): forward ``mask * w``; backward ``g + lam * (1 - mask) * w``."""
  return _masked(w, mask)


def _srste_fwd(w, mask, lam):
  return _masked(w, mask), (w, mask)


def _srste_bwd(lam, res, g):
  w, mask = res
  return g + jnp.where(mask, jnp.zeros((), w.dtype), (lam * w).astype(g.dtype)), None


srste.defvjp(_srste_fwd, _srste_bwd)


def _decayed(x, mask, a):
  return jnp.where(mask, x, (a * x).astype(x.dtype))


def mdgf(w: jax.Array, mask: jax.Array, a: jax.Array,
         backward: str = DEFAULT_MDGF_BACKWARD) -> jax.Array:
  """MDGF: forward ``(mask + (1 - mask) a) * w``.

  ``backward='straight_through'`` (default, as the authors' PyTorch code) sends
  ``g`` to every weight; ``'decay_scaled'`` (as the predecessor JAX code) sends
  ``(mask + (1 - mask) a) * g``, the true gradient of the forward.
  """
  if backward not in MDGF_BACKWARDS:
    raise ValueError(f'Unknown MDGF backward {backward!r}; choose one of {MDGF_BACKWARDS}.')
  return _mdgf(w, mask, a, backward)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mdgf(w, mask, a, backward):
  return _decayed(w, mask, a)


def _mdgf_fwd(w, mask, a, backward):
  res = (mask, a) if backward == 'decay_scaled' else None
  return _decayed(w, mask, a), res


def _mdgf_bwd(backward, res, g):
  if backward == 'straight_through':
    return g, None, None
  mask, a = res
  return _decayed(g, mask, a), None, jnp.zeros_like(a)


_mdgf.defvjp(_mdgf_fwd, _mdgf_bwd)
