"""Adapters: train an unmodified Flax model (Linen or NNX) with a ``Sparsifier``.

Every adapter computes the same thing: the model's forward pass with its params
replaced by ``sp.apply(params, state, step, opt_state)``, differentiable in the
dense params. Pick the one that fits how the model is called.

Linen, params pytree (no wrapper; works for any ``apply``-style function)::

    apply = sparse_apply_fn(model.apply, sp)
    y = apply({'params': params, **other_collections}, sparsity, step, x)

Linen, wrapped module (kernels sparsified as they are read, via ``nn.map_variables``)::

    smodel = sparsify_module(model, sp)          # same params tree as ``model``
    params = smodel.init(rng, x)['params']       # init runs the plain model
    y = smodel.apply({'params': params}, x, nm_state=sparsity, nm_step=step)

NNX, functional (``nnx.split`` / ``jax.grad`` over the params state)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sp = nnx_sparsifier(recipe_config('ste'), rules, model, total_steps)
    apply = nnx_apply_fn(graphdef, sp)
    y, rest = apply(params, rest, sparsity, step, x)

NNX, stateful (eager, ``nnx.jit`` or ``nnx.grad``)::

    y = nnx_call(model, sp, sparsity, step, x)

The ``Sparsifier`` must be built over the params the adapter sees: the whole
model's params for the first, third and fourth adapter, and the wrapped module's
own params for ``sparsify_module`` (the whole model when it wraps the top-level module).
NNX state paths end in a ``value`` attribute, which rule matching ignores, so
the same regexes (``'.*/mlp/fc1/kernel'``) serve Linen and NNX.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
from flax import nnx

from nmsparse import recipes
from nmsparse import rules as rules_lib

PyTree = Any


# ----------------------------------------------------------------------------- Linen


def sparse_apply_fn(apply_fn: Callable[..., Any], sp: recipes.Sparsifier) -> Callable[..., Any]:
  """Wraps ``apply_fn(variables, *args, **kw)`` (e.g. ``model.apply``) to run on effective params.

  Returns ``fn(variables, state, step, *args, opt_state=None, **kw)``: it replaces
  ``variables['params']`` by ``sp.apply(params, state, step, opt_state)`` and passes
  every other collection, argument and keyword (``mutable=``, ``rngs=``) through.
  """

  def fn(variables: PyTree, state: dict, step: jax.Array, *args: Any,
         opt_state: PyTree = None, **kw: Any) -> Any:
    if 'params' not in variables:
      raise ValueError(f'sparse_apply_fn needs a "params" collection; got {sorted(variables)}.')
    effective = sp.apply(variables['params'], state, step, opt_state)
    return apply_fn({**variables, 'params': effective}, *args, **kw)

  return fn


class SparseModule(nn.Module):
  """Runs ``module`` with its params sparsified on read; the params tree is ``module``'s own.

  Call it like ``module`` plus the keywords ``nm_state`` (the sparsity state),
  ``nm_step`` (the global step) and, for recipe ``step``, ``nm_opt_state``.
  ``init`` runs the plain module (the keywords may be omitted); ``apply`` without
  ``nm_step`` is an error, so a forgotten step cannot silently train dense.
  Other collections (``batch_stats``, ``intermediates``) and rngs pass through.
  """

  module: nn.Module
  sparsifier: recipes.Sparsifier

  def setup(self):
    nn.share_scope(self, self.module)  # No extra nesting: params keep ``module``'s paths.

  def __call__(self, *args: Any, nm_state: Optional[dict] = None, nm_step: Optional[jax.Array] = None,
               nm_opt_state: PyTree = None, **kw: Any) -> Any:
    if self.is_initializing():
      return self.module(*args, **kw)
    if nm_step is None or nm_state is None:
      raise ValueError('SparseModule.apply needs nm_state= (from sp.init / sp.update) and nm_step=; '
                       'only init may omit them.')
    sp = self.sparsifier

    def trans_in(variables: dict) -> dict:  # Receives the collection dict {'params': ...}.
      return {**variables, 'params': sp.apply(variables['params'], nm_state, nm_step, nm_opt_state)}

    mapped = nn.map_variables(lambda mdl, *a, **k: mdl(*a, **k), 'params', trans_in_fn=trans_in)
    return mapped(self.module, *args, **kw)


def sparsify_module(module: Union[nn.Module, type[nn.Module]],
                    sp: recipes.Sparsifier) -> Union[SparseModule, Callable[..., SparseModule]]:
  """A Linen module computing ``module`` on sparsified params (see ``SparseModule``).

  Given an instance, returns a ``SparseModule``; given a class, returns a
  constructor with the class's signature. The params tree (and so ``sp``'s rule
  paths) is that of the plain module, which may also be used to ``init``.
  """
  if isinstance(module, type):
    if not issubclass(module, nn.Module):
      raise TypeError(f'sparsify_module needs a Linen Module class or instance, got {module!r}.')
    return lambda *args, **kw: SparseModule(module(*args, **kw), sp)
  if not isinstance(module, nn.Module):
    raise TypeError(f'sparsify_module needs a Linen Module class or instance, got {module!r}.')
  return SparseModule(module, sp)


# ----------------------------------------------------------------------------- NNX


def nnx_sparsifier(config: Any, rules: rules_lib.Rules, model: nnx.Module, total_steps: int,
                   *, log: bool = True) -> recipes.Sparsifier:
  """``make_sparsifier`` over the ``nnx.Param`` state of ``model`` (concrete or from ``nnx.eval_shape``).

  The result applies to the params of ``nnx.split(model, nnx.Param, ...)``.
  """
  params = nnx.state(model, nnx.Param)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  return recipes.make_sparsifier(config, rules, abstract, total_steps, log=log)


def nnx_apply_fn(graphdef: nnx.GraphDef, sp: recipes.Sparsifier, *,
                 method: Optional[str] = None) -> Callable[..., tuple[Any, nnx.State]]:
  """Pure forward of an NNX model split as ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``.

  Returns ``fn(params, rest, state, step, *args, opt_state=None, **kw) -> (out, rest)``:
  it merges the effective params with a copy of ``rest``, calls the module (or
  its ``method``) and returns the output and the updated non-param state (batch
  statistics, rng counters). Differentiable in ``params``.
  """

  def fn(params: nnx.State, rest: nnx.State, state: dict, step: jax.Array, *args: Any,
         opt_state: PyTree = None, **kw: Any) -> tuple[Any, nnx.State]:
    model = nnx.merge(graphdef, sp.apply(params, state, step, opt_state), rest, copy=True)
    out = (getattr(model, method) if method else model)(*args, **kw)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    return out, new_rest

  return fn


def nnx_call(model: nnx.Module, sp: recipes.Sparsifier, state: dict, step: jax.Array,
             *args: Any, opt_state: PyTree = None, method: Optional[str] = None, **kw: Any) -> Any:
  """Calls ``model`` (or its ``method``) on effective params; writes non-param state back into ``model``.

  ``model``'s own params are never modified. Works eagerly and inside
  ``nnx.jit`` / ``nnx.grad`` / ``nnx.value_and_grad`` (gradients reach ``model``'s params).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  out, new_rest = nnx_apply_fn(graphdef, sp, method=method)(params, rest, state, step, *args,
                                                            opt_state=opt_state, **kw)
  nnx.update(model, new_rest)
  return out
