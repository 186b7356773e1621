"""Recipes as configuration: one entry point from a recipe config and rules to a train step's needs.

    sp = nmsparse.make_sparsifier(recipe_config('mdgf'), rules, params, total_steps)
    sparsity = sp.init(params)                                   # lives in the train state
    # in the jitted step, before the forward pass:
    sparsity = sp.update(params, sparsity, step)                 # refresh stored masks
    loss = loss_fn(sp.apply(params, sparsity, step, opt_state))  # effective weights

``apply`` is a pure function of (params, sparsity state, step[, optimizer state]):
every schedule is a function of the step, so a resumed run is exact.

Recipes (``config.name``):

==============  ====================================================================
``dense``       no sparsity (the baseline)
``oneshot``     ASP-style: mask of the weights at the first sparse step, frozen; hard mask
``hard``        hard mask recomputed every ``refresh_every`` steps, frozen between
``ste``         mask recomputed every step, gradient straight through
``srste``       STE plus ``srste_lambda * (1 - mask) * w`` on pruned weights
``mdgf``        decaying mask (m + (1 - m) a(t)) w, ``decay`` gives a(t)
``sdgf``        N:M changing over the run (``structure``) over ``sdgf_inner`` (ste | mdgf)
``mdgf_sdgf``   ``sdgf`` over ``mdgf``: both decays in one run
``step``        STEP: dense Adam until AutoSwitch freezes v, then STE masks (``step.*``)
==============  ====================================================================

Fine-tune (the last ``finetune_*`` of the run) uses the final N:M with the mask
recomputed every step (STE, as the reference code) or frozen at its start
(``finetune_mask='frozen'``, hard mask); ``oneshot`` keeps its one mask throughout.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from nmsparse import masks as masks_lib
from nmsparse import ops
from nmsparse import rules as rules_lib
from nmsparse import schedules
from nmsparse import step_optimizer

PyTree = Any
RECIPES = ('dense', 'oneshot', 'hard', 'ste', 'srste', 'mdgf', 'sdgf', 'mdgf_sdgf', 'step')
_STATEFUL = ('oneshot', 'hard')


def recipe_config(name: str = 'mdgf', **overrides: Any) -> 'ml_collections.ConfigDict':
  """Default ``ConfigDict`` for a recipe; ``overrides`` set top-level or dotted keys.

  Durations: ``dense_frac``/``finetune_frac`` (and STEP's ``t_min``/``t_max``) are
  fractions of the run; the ``*_steps`` fields, when set, are step counts and take
  precedence. ``step.t_max=None`` lets AutoSwitch alone decide.
  """
  import ml_collections  # Lazy: the library itself needs only jax, flax and optax.

  ph = ml_collections.config_dict.placeholder
  c = ml_collections.ConfigDict()
  c.name = name
  c.dense_frac = 0.0
  c.dense_steps = ph(int)
  c.finetune_frac = 0.0
  c.finetune_steps = ph(int)
  c.finetune_mask = 'per_step'  # 'per_step' (STE, reference code) | 'frozen' (hard mask)
  c.srste_lambda = 2e-4
  c.refresh_every = 1000  # 'hard': the mask period f
  c.mdgf_backward = ops.DEFAULT_MDGF_BACKWARD
  c.decay = ml_collections.ConfigDict(dict(
      kind='exponential', rate=2e-4, duration=ph(int), interval=ph(int), levels=16, width=ph(float)))
  c.structure = ml_collections.ConfigDict(dict(kind='stepwise', levels=3, stages=ph(tuple)))
  c.sdgf_inner = 'ste'
  c.step = ml_collections.ConfigDict(dict(
      t_min=0.1, t_max=0.5, t_min_steps=ph(int), t_max_steps=ph(int), threshold=1e-8, window=ph(int), statistic='mean', scale_free=False,
      frozen_eps=ph(float), srste=False))
  c.lock()  # A misspelt key is an error, here and in `--config.recipe.x=...` overrides.
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


class _attrs:
  """Attribute view of a nested mapping, so a plain dict works like a ``ConfigDict``."""

  def __init__(self, d):
    self._d = d

  def __getattr__(self, key):
    try:
      v = self._d[key]
    except KeyError:
      raise ValueError(f'Recipe config has no key {key!r}; start from nmsparse.recipe_config().') from None
    return _attrs(v) if hasattr(v, 'keys') else v


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A validated recipe: what ``recipe_config`` holds, with durations turned into steps."""

  name: str
  phases: schedules.Phases
  finetune_mask: str = 'per_step'
  srste_lambda: float = 2e-4
  refresh_every: int = 1000
  mdgf_backward: str = ops.DEFAULT_MDGF_BACKWARD
  decay: Optional[schedules.Decay] = None
  structure: Optional[schedules.Structure] = None
  sdgf_inner: str = 'ste'
  step_kwargs: Optional[dict] = None
  step_srste: bool = False

  @classmethod
  def from_config(cls, config: Any, total_steps: int) -> 'Recipe':
    """Parses and checks a recipe config (``ConfigDict`` or nested dict); errors name the bad key."""
    c = _attrs(config)
    if c.name not in RECIPES:
      raise ValueError(f'Unknown recipe {c.name!r}; choose one of {RECIPES}.')
    dense = c.dense_steps if c.dense_steps is not None else float(c.dense_frac)
    finetune = c.finetune_steps if c.finetune_steps is not None else float(c.finetune_frac)
    if c.name == 'step' and dense:
      raise ValueError('recipe "step" finds its dense phase by AutoSwitch: leave dense_frac/'
                       'dense_steps at 0 and set step.t_min / step.t_max instead.')
    phases = schedules.Phases.from_durations(total_steps, dense, finetune)
    if c.finetune_mask not in ('per_step', 'frozen'):
      raise ValueError(f'finetune_mask={c.finetune_mask!r}; choose "per_step" or "frozen".')
    if c.mdgf_backward not in ops.MDGF_BACKWARDS:
      raise ValueError(f'mdgf_backward={c.mdgf_backward!r}; choose one of {ops.MDGF_BACKWARDS}.')
    if c.refresh_every < 1:
      raise ValueError(f'refresh_every must be >= 1 step, got {c.refresh_every}.')
    if c.srste_lambda < 0:
      raise ValueError(f'srste_lambda must be >= 0, got {c.srste_lambda}.')
    inner = 'mdgf' if c.name == 'mdgf_sdgf' else c.sdgf_inner
    if inner not in ('ste', 'mdgf'):
      raise ValueError(f'sdgf_inner={inner!r}; choose "ste" or "mdgf".')
    decay = structure = step_kwargs = None
    if c.name == 'mdgf' or (c.name in ('sdgf', 'mdgf_sdgf') and inner == 'mdgf'):
      d = c.decay
      decay = schedules.Decay(
          kind=d.kind, rate=d.rate, duration=d.duration or max(phases.sparse_steps, 1),
          interval=d.interval or max(phases.sparse_steps // max(d.levels, 1), 1),
          levels=d.levels, width=d.width)
    if c.name in ('sdgf', 'mdgf_sdgf'):
      s = c.structure
      structure = schedules.Structure(kind=s.kind, levels=s.levels, stages=tuple(s.stages or ()))
      if phases.sparse_steps == 0:
        raise ValueError('SDGF needs a sparse phase of at least one step.')
    if c.name == 'step':
      s = c.step
      t_min = s.t_min_steps if s.t_min_steps is not None else float(s.t_min)
      t_max = s.t_max_steps if s.t_max_steps is not None else s.t_max
      t_min = schedules.to_steps(t_min, total_steps, 'step.t_min')
      t_max = None if t_max is None else schedules.to_steps(t_max, total_steps, 'step.t_max')
      step_kwargs = dict(t_min=t_min, t_max=t_max, threshold=s.threshold, window=s.window,
                         statistic=s.statistic, scale_free=s.scale_free, frozen_eps=s.frozen_eps)
    return cls(name=c.name, phases=phases, finetune_mask=c.finetune_mask,
               srste_lambda=float(c.srste_lambda), refresh_every=int(c.refresh_every),
               mdgf_backward=c.mdgf_backward, decay=decay, structure=structure,
               sdgf_inner=inner, step_kwargs=step_kwargs,
               step_srste=bool(c.step.srste) if c.name == 'step' else False)


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity (usable as a static arg).
class Sparsifier:
  """Everything a train step needs for one recipe over one params structure.

  Methods are pure: they take and return arrays and never mutate. ``specs`` is
  the params-shaped pytree of ``NMSpec`` (``None`` = dense).
  """

  recipe: Recipe
  specs: PyTree
  sizes: PyTree = None  # Params-shaped pytree of leaf sizes (for size-weighted densities).

  # ---------------------------------------------------------------- structure
  @property
  def phases(self) -> schedules.Phases:
    return self.recipe.phases

  @property
  def num_stages(self) -> int:
    """Stages of the sparse phase: SDGF's structure stages, else 1."""
    if self.recipe.structure is None:
      return 1
    counts = {len(self.recipe.structure.patterns(s.n, s.m))
              for s in rules_lib.spec_leaves(self.specs) if s is not None}
    # Layers whose schedules are shorter repeat their first stage (see stage_patterns).
    return max(counts) if counts else 1

  def stage_patterns(self, spec: rules_lib.NMSpec) -> list[tuple[int, int]]:
    """N:M of each sparse stage for a layer (padded at the front to ``num_stages``)."""
    if self.recipe.structure is None:
      return [(spec.n, spec.m)]
    pats = self.recipe.structure.patterns(spec.n, spec.m)
    return [pats[0]] * (self.num_stages - len(pats)) + pats

  def stage_starts(self):
    if self.recipe.structure is None:
      return [self.phases.dense_end]
    return self.recipe.structure.starts(self.phases, self.num_stages)

  @property
  def needs_masks(self) -> bool:
    r = self.recipe
    return r.name in _STATEFUL or (r.finetune_mask == 'frozen' and
                                   r.phases.finetune_start < r.phases.total and r.name != 'dense')

  # ---------------------------------------------------------------- state
  def _target_masks(self, params):
    return {k: masks_lib.nm_mask(w, s.n, s.m, s.axes)
            for k, (s, w) in self._keyed_sparse(params).items()}

  def _keyed_sparse(self, params) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    specs = rules_lib.spec_leaves(self.specs)
    return {rules_lib.path_str(p): (s, w) for (p, w), s in zip(flat, specs) if s is not None}

  def init(self, params: PyTree) -> dict:
    """Sparsity state: ``{'masks': {path: bool mask}}`` for recipes that remember masks, else ``{}``."""
    if not self.needs_masks:
      return {}
    return {'masks': self._target_masks(params)}

  def update(self, params: PyTree, state: dict, step: jax.Array) -> dict:
    """Refreshes stored masks where the recipe says so; call at the start of each step."""
    if not self.needs_masks:
      return state
    r, ph = self.recipe, self.phases
    step = jnp.asarray(step)
    if r.name == 'oneshot':
      refresh = step == ph.dense_end
    else:
      refresh = (step == ph.finetune_start) & (r.finetune_mask == 'frozen')
      if r.name == 'hard':
        refresh |= ((step >= ph.dense_end) & (step < ph.finetune_start) &
                    ((step - ph.dense_end) % r.refresh_every == 0))
    masks = lax.cond(refresh, lambda: self._target_masks(params), lambda: state['masks'])
    return {**state, 'masks': masks}

  # ---------------------------------------------------------------- schedules
  def decay_value(self, step: jax.Array) -> jax.Array:
    """a(t) of MDGF at ``step`` (1 in the dense phase, 0 in fine-tune); 0 for other recipes."""
    if self.recipe.decay is None:
      return jnp.where(self.phases.phase(step) == schedules.DENSE, 1.0, 0.0)
    ph = self.phases.phase(step)
    a = self.recipe.decay(self.phases.t(step))
    return jnp.where(ph == schedules.DENSE, 1.0, jnp.where(ph == schedules.FINETUNE, 0.0, a))

  def stage(self, step: jax.Array) -> jax.Array:
    """SDGF stage index at ``step`` (0 outside SDGF)."""
    return schedules.stage_index(step, self.stage_starts())

  def branch(self, step: jax.Array, opt_state: PyTree = None) -> jax.Array:
    """0 dense, 1 + stage in the sparse phase, 1 + num_stages in fine-tune."""
    step = jnp.asarray(step)
    ft = step >= self.phases.finetune_start
    if self.recipe.name == 'step':
      if opt_state is None:
        raise ValueError('recipe "step" reads its phase from the optimizer state: pass opt_state= '
                         'to Sparsifier.apply (and build the optimizer with sp.scale_by_adam).')
      sparse = step_optimizer.switched(opt_state)
      return jnp.where(ft, 2, jnp.where(sparse, 1, 0)).astype(jnp.int32)
    ph = self.phases.phase(step)
    return jnp.where(ph == schedules.DENSE, 0,
                     jnp.where(ph == schedules.FINETUNE, 1 + self.num_stages,
                               1 + self.stage(step))).astype(jnp.int32)

  def info(self, step: jax.Array, opt_state: PyTree = None) -> dict[str, jax.Array]:
    """Scalars for logging: phase, MDGF decay, SDGF stage and the density of the sparsified kernels."""
    if self.recipe.name == 'dense':
      one = jnp.float32(1.0)
      return dict(phase=jnp.int32(0), decay=one, stage=jnp.int32(0), density=one)
    b = self.branch(step, opt_state)
    dens = jnp.asarray([1.0] + [self._stage_density(k) for k in range(self.num_stages)] +
                       [self._stage_density(self.num_stages - 1)])
    return dict(phase=jnp.minimum(b, 1) + (b == 1 + self.num_stages),
                decay=self.decay_value(step), stage=self.stage(step),
                density=dens[b])

  def _stage_density(self, k: int) -> float:
    """Kept fraction of the sparsified kernels' entries in stage ``k`` (size-weighted)."""
    flat = jax.tree_util.tree_leaves(self.sizes)
    pairs = [(self.stage_patterns(s)[k], size)
             for s, size in zip(rules_lib.spec_leaves(self.specs), flat) if s is not None]
    total = sum(size for _, size in pairs)
    return float(sum(size * n / m for (n, m), size in pairs) / total) if total else 1.0

  def _branches(self, step, state) -> list[tuple['_MaskFn', '_Flow']]:
    """Per branch (dense, each sparse stage, fine-tune): ``(mask_fn, flow)`` over one kernel.

    ``mask_fn(spec, w, key)`` gives the keep-mask (None when dense; equal
    :class:`_MaskFn` give equal masks) and ``flow`` the scalars of
    :func:`nmsparse.ops.flow` that turn it into the effective kernel.
    """
    r = self.recipe

    def stored_fn(s, w, key):
      if 'masks' not in state:  # A frozen fine-tune outside the run (`finetune` of 0 steps): the
        return masks_lib.nm_mask(w, s.n, s.m, s.axes)  # branch is still traced.
      return state['masks'][key]

    if r.name == 'srste' or (r.name == 'step' and r.step_srste):
      sparse_flow = _Flow(0.0, 1.0, float(r.srste_lambda))
    elif r.decay is not None:
      a = r.decay(self.phases.t(step))
      sparse_flow = _Flow(a, a if r.mdgf_backward == 'decay_scaled' else 1.0, 0.0)
    else:
      sparse_flow = _STE

    def stage_mask(k):
      def fn(s, w, key):
        n, m = self.stage_patterns(s)[k]
        return masks_lib.nm_mask(w, n, m, s.axes)
      return _MaskFn('stage', k, fn) if r.structure is not None else target

    target = _MaskFn('target', None, lambda s, w, key: masks_lib.nm_mask(w, s.n, s.m, s.axes))
    stored = _MaskFn('stored', None, stored_fn)
    if r.name in _STATEFUL:
      sparse = [(stored, _HARD)] * self.num_stages
    else:
      sparse = [(stage_mask(k), sparse_flow) for k in range(self.num_stages)]
    if r.name in _STATEFUL or r.finetune_mask == 'frozen':
      finetune = (stored, _HARD)
    else:
      finetune = (target, _STE)
    return [(_MaskFn('none', None, lambda s, w, key: None), _DENSE)] + sparse + [finetune]

  def _branch_masks(self, params, state, step, opt_state, branches, dense_ones: bool) -> list:
    """Keep-masks of the sparsified leaves (flattened order) in the branch of ``step``.

    One reachable mask function: computed directly, with no conditional (and all
    True in the dense phase if ``dense_ones``). Several (SDGF's stages): a
    ``lax.switch`` over the boolean masks only.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    specs = rules_lib.spec_leaves(self.specs)
    sparse = [(s, w, rules_lib.path_str(p)) for (p, w), s in zip(flat, specs) if s is not None]
    if not sparse:
      return []

    def make(mask_fn):
      return lambda: [_mask_or_ones(mask_fn(s, w, key), w) for s, w, key in sparse]

    reachable = self._reachable_branches()
    fns = {branches[b][0] for b in reachable if b != 0}
    if not fns:
      return make(branches[0][0])()
    if len(fns) == 1:
      out = make(fns.pop())()
      if dense_ones and 0 in reachable:
        dense_now = self.branch(step, opt_state) == 0
        out = [m | dense_now for m in out]
      return out
    return lax.switch(self.branch(step, opt_state), [make(m) for m, _ in branches])

  def apply(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Effective (sparsified) params for the forward pass at ``step``; differentiable in ``params``.

    One :func:`nmsparse.ops.flow` per kernel, its scalars selected by the phase, over
    the phase's mask: no conditional moves float kernels, forward or backward, and
    the dense phase (``flow`` of 1, 1, 0) is the identity whatever the mask.
    ``opt_state`` is needed only by recipe ``step`` (its phase lives in the optimizer).
    """
    if self.recipe.name == 'dense':
      return params
    branches = self._branches(step, state)
    reachable = self._reachable_branches()
    b = self.branch(step, opt_state) if len(reachable) > 1 else None

    def scalar(field):
      values = [getattr(f, field) for _, f in branches]
      used = {v for i, v in enumerate(values) if i in reachable and isinstance(v, float)}
      if len(used) == 1 and all(isinstance(values[i], float) for i in reachable):
        return used.pop()  # Static: the same number in every reachable branch.
      if b is None:
        return values[reachable[0]]
      return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])[b]

    fwd, bwd, lam = scalar('fwd'), scalar('bwd'), scalar('lam')
    masks = iter(self._branch_masks(params, state, step, opt_state, branches, dense_ones=False))
    return rules_lib.map_sparse(lambda s, w: ops.flow(w, next(masks), fwd, bwd, lam),
                                self.specs, params)

  def masks(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Keep-masks used at ``step`` (params structure; all True in the dense phase, None for dense leaves)."""
    if self.recipe.name == 'dense':
      return rules_lib.map_sparse(lambda s, w: jnp.ones(w.shape, bool), self.specs, params,
                                  dense=lambda w: None)
    masks = iter(self._branch_masks(params, state, step, opt_state,
                                    self._branches(step, state), dense_ones=True))
    return rules_lib.map_sparse(lambda s, w: next(masks), self.specs, params, dense=lambda w: None)

  def _reachable_branches(self) -> list[int]:
    ph, r = self.phases, self.recipe
    out = []
    if ph.dense_end > 0 or r.name == 'step':
      out.append(0)
    if ph.sparse_steps > 0 or r.name == 'step':
      out.extend(range(1, 1 + self.num_stages))
    if ph.finetune_start < ph.total:
      out.append(1 + self.num_stages)
    return out or [1]

  def hard_params(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Params with pruned weights zeroed by the masks of ``step`` (for evaluation and export)."""
    m = self.masks(params, state, step, opt_state)
    return rules_lib.map_sparse(lambda s, w, k: jnp.where(k, w, jnp.zeros((), w.dtype)),
                                self.specs, params, m)

  # ---------------------------------------------------------------- optimizer
  def scale_by_adam(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    **kw: Any) -> optax.GradientTransformation:
    """Adam's preconditioner for this recipe: ``optax.scale_by_adam``, or STEP's for ``step``."""
    if self.recipe.name != 'step':
      return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, **kw)
    sparse_mask = jax.tree.map(lambda s: s is not None, self.specs,
                               is_leaf=lambda x: x is None or isinstance(x, rules_lib.NMSpec))
    return step_optimizer.scale_by_step_adam(b1=b1, b2=b2, eps=eps, sparse_mask=sparse_mask,
                                        **self.recipe.step_kwargs, **kw)


@dataclasses.dataclass(frozen=True)
class _MaskFn:
  """A branch's keep-mask of one kernel: ``fn(spec, w, key)``; equal instances give equal masks."""

  kind: str  # 'none' (dense) | 'target' (N:M of the spec) | 'stage' (SDGF stage) | 'stored'
  stage: Optional[int]
  fn: Callable = dataclasses.field(compare=False)

  def __call__(self, s, w, key):
    return self.fn(s, w, key)


@dataclasses.dataclass(frozen=True)
class _Flow:
  """A branch's scalars of :func:`nmsparse.ops.flow`: forward and backward decay, SR-STE lambda."""

  fwd: Any
  bwd: Any = 1.0
  lam: Any = 0.0


_DENSE, _STE, _HARD = _Flow(1.0, 1.0, 0.0), _Flow(0.0, 1.0, 0.0), _Flow(0.0, 0.0, 0.0)


def _mask_or_ones(mask, w):
  return jnp.ones(w.shape, bool) if mask is None else mask


def make_sparsifier(config: Any, rules: rules_lib.Rules, params: PyTree,
                    total_steps: int, *, log: bool = True) -> Sparsifier:
  """Builds a ``Sparsifier`` from a recipe config, ordered rules and (abstract) params.

  Checks everything before any compilation: the recipe and its options, the rules
  against every parameter's shape, and every SDGF stage's N:M against every kernel.
  """
  recipe = Recipe.from_config(config, total_steps)
  specs = rules_lib.resolve(rules, params, log=log)
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), params)
  sp = Sparsifier(recipe, specs, sizes)
  if recipe.structure is not None:
    for key, (s, w) in sp._keyed_sparse(params).items():
      for n, m in sp.stage_patterns(s):
        try:
          masks_lib.check_nm(w.shape, n, m, s.axes, name=key)
        except ValueError as e:
          raise ValueError(f'SDGF {recipe.structure.kind} schedule {sp.stage_patterns(s)} for '
                           f'target {s.n}:{s.m}: {e}') from None
    sp.stage_starts()  # Validates custom starts.
  if log:
    logging.info('N:M recipe %s, phases %s', recipe.name, recipe.phases)
  return sp
