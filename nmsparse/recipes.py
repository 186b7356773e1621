"""Recipes as a table: for each phase of a run, which keep-mask and which ``flow`` scalars.

    sp = nmsparse.make_sparsifier(nmsparse.recipe_config('mdgf'), rules, params, total_steps)
    sparsity = sp.init(params)                                   # lives in the train state
    # in the jitted step, before the forward pass:
    sparsity = sp.update(params, sparsity, step)                 # refresh stored masks
    loss = loss_fn(sp.apply(params, sparsity, step, opt_state))  # effective weights

A run has four phases (``schedules.Phases``); each is one row of the table below:
a keep-mask per kernel and the scalars ``(fwd, bwd, lam)`` of :func:`nmsparse.ops.flow`
(forward ``where(m, w, fwd w)``, gradient ``where(m, g, bwd g) + lam (1 - m) w``).

==========  ==============================  =======================  ==========================
phase       steps                           mask                     flow ``(fwd, bwd, lam)``
==========  ==============================  =======================  ==========================
dense       ``[0, dense_end)``              (any: flow is identity)  ``(1, 1, 0)``
sparse      ``[dense_end, finetune_start)`` the recipe's (below)     the recipe's (below)
finetune    ``[finetune_start, total)``     target N:M, every step   ``(0, 1, 0)`` STE
            (``finetune_mask='frozen'``)    stored at its first step ``(0, 0, 0)`` hard
final       ``step >= total``               mask of the last phase   ``(0, ., .)``: hard N:M
==========  ==============================  =======================  ==========================

The sparse phase, by recipe (``a`` = a(t), MDGF's decay; ``lam`` = ``srste_lambda``):

=============  ====================================================  =========================
recipe         mask                                                  flow ``(fwd, bwd, lam)``
=============  ====================================================  =========================
``dense``      none                                                  ``(1, 1, 0)`` throughout
``oneshot``    stored: taken at the first sparse step, then frozen   ``(0, 0, 0)``
``hard``       stored: retaken every ``refresh_every`` steps         ``(0, 0, 0)``
``ste``        target N:M, every step                                ``(0, 1, 0)``
``srste``      target N:M, every step                                ``(0, 1, lam)``
``mdgf``       target N:M, every step                                ``(a, 1, 0)``; ``(a, a, 0)``
                                                                     with ``decay_scaled``
``sdgf``       the layer's stage N:M (``structure``), every step     as ``sdgf_inner`` (ste|mdgf)
``mdgf_sdgf``  the layer's stage N:M, every step                     as ``mdgf``
``step``       target N:M once AutoSwitch froze Adam's v (dense      ``(0, 1, 0)``; ``(0, 1, lam)``
               before: its dense phase lives in the optimizer)       with ``step.srste``
=============  ====================================================  =========================

``oneshot`` keeps its stored mask in the fine-tune. The final row is what evaluation
and export see once a run is over: every recipe but ``dense`` gives the hard N:M
model of its final pattern there, whatever the phase layout. Each SDGF layer runs its
own stages, ``K = len(structure.patterns(n, m))`` equal intervals of the sparse phase.
Every row is a pure function of the step (and STEP's optimizer state), so a resumed
run is exact.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, Optional, Union

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
DENSE, SPARSE, FINETUNE, FINAL = 0, 1, 2, 3
PHASE_NAMES = ('dense', 'sparse', 'finetune', 'final')

# ----------------------------------------------------------------------------- config

_DEFAULTS: dict[str, Any] = dict(
    name='mdgf',
    dense_frac=0.0,
    dense_steps=None,
    finetune_frac=0.0,
    finetune_steps=None,
    finetune_mask='per_step',  # 'per_step' (STE, reference code) | 'frozen' (hard mask)
    srste_lambda=2e-4,
    refresh_every=1000,  # 'hard': the mask period f, in steps
    mdgf_backward=ops.DEFAULT_MDGF_BACKWARD,
    decay=dict(kind='exponential', final=0.02, duration=1.0, rate=None, interval=None,  # duration
               # None (configs written before it was a fraction) means the whole sparse phase.
               levels=16, width=None),
    structure=dict(kind='stepwise', levels=3, stages=None),
    sdgf_inner='ste',
    step=dict(t_min=0.1, t_max=0.5, t_min_steps=None, t_max_steps=None, threshold=1e-8,
              window=None, statistic='mean', scale_free=False, frozen_eps=None, srste=False),
)
# Types of the fields whose default is None (so that a config system can type them).
OPTIONAL_FIELDS: dict[str, type] = {
    'dense_steps': int, 'finetune_steps': int, 'decay.rate': float, 'decay.interval': int,
    'decay.width': float, 'structure.stages': tuple, 'step.t_min_steps': int,
    'step.t_max_steps': int, 'step.window': int, 'step.frozen_eps': float,
}
# Fields that hold a step count (int) or a fraction (float) alike.
_DURATIONS = ('step.t_max',)


def recipe_config(name: str = 'mdgf', **overrides: Any) -> dict[str, Any]:
  """The full recipe config, a plain nested dict: defaults, then ``overrides``.

  Overrides name top-level or dotted keys (``**{'decay.final': 0.05}``); an unknown
  key, an unknown recipe or a value of the wrong type is an error here, before any
  run starts. Durations: ``dense_frac``/``finetune_frac`` (and STEP's ``t_min``/
  ``t_max``) are fractions of the run; the ``*_steps`` fields, when set, are step
  counts and take precedence. MDGF's ``decay`` is relative to the sparse phase:
  ``final`` is a(t) at its end (exponential), ``duration`` the fraction of it after
  which a linear or cosine decay reaches 0 (stepwise: which its ``levels`` fill); an
  absolute per-step ``rate`` (or stepwise ``interval``) takes precedence when set.
  ``step.t_max=None`` lets AutoSwitch alone decide.
  """
  config = _merge(_DEFAULTS, {'name': name, **overrides})
  if config['name'] not in RECIPES:
    raise ValueError(f'Unknown recipe {config["name"]!r}; choose one of {", ".join(RECIPES)}.')
  return config


def _merge(defaults: dict, overrides: Mapping[str, Any]) -> dict:
  """A deep copy of ``defaults`` with dotted ``overrides`` applied and type-checked."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in defaults.items()}
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = out
    for p in parents:
      if not isinstance(node.get(p), dict):
        raise KeyError(f'Recipe config has no section {key.rsplit(".", 1)[0]!r} (in {key!r}); '
                       f'sections: {sorted(k for k, v in defaults.items() if isinstance(v, dict))}.')
      node = node[p]
    if leaf not in node:
      raise KeyError(f'Recipe config has no key {key!r}; known keys: {sorted(node)}.')
    if isinstance(node[leaf], dict):
      if not isinstance(value, Mapping):
        raise TypeError(f'Recipe config {key!r} is a section: give a dict, got {value!r}.')
      node[leaf] = _merge(node[leaf], dict(value))
      continue
    _check_type(key, value, node[leaf])
    node[leaf] = tuple(value) if key == 'structure.stages' and value is not None else value
  return out


def _check_type(key: str, value: Any, default: Any) -> None:
  if value is None:
    if key in OPTIONAL_FIELDS or key in ('step.t_max', 'decay.duration'):  # duration None: 1.0
      return
    raise TypeError(f'Recipe config {key!r} cannot be None.')
  want = OPTIONAL_FIELDS.get(key, type(default))
  if key in _DURATIONS:
    want = (int, float)
  elif want is float:
    want = (int, float)
  elif want is tuple:
    want = (tuple, list)
  is_bool = isinstance(value, (bool, np.bool_))
  if (is_bool and want is not bool) or not isinstance(value, want) or (
      want is bool and not is_bool):
    raise TypeError(f'Recipe config {key!r} = {value!r} has type {type(value).__name__}; '
                    f'expected {getattr(want, "__name__", want)}.')


def check_config(config: Any) -> dict[str, Any]:
  """The full recipe config from a partial dict or ``ConfigDict``, with every check that needs
  no run length (keys, types, names, ranges); errors name the bad key."""
  c = recipe_config(**_flatten(_as_dict(config)))
  if c['finetune_mask'] not in ('per_step', 'frozen'):
    raise ValueError(f'finetune_mask={c["finetune_mask"]!r}; choose "per_step" or "frozen".')
  if c['mdgf_backward'] not in ops.MDGF_BACKWARDS:
    raise ValueError(f'mdgf_backward={c["mdgf_backward"]!r}; choose one of {ops.MDGF_BACKWARDS}.')
  if c['refresh_every'] < 1:
    raise ValueError(f'refresh_every must be >= 1 step, got {c["refresh_every"]}.')
  if c['srste_lambda'] < 0:
    raise ValueError(f'srste_lambda must be >= 0, got {c["srste_lambda"]}.')
  if c['sdgf_inner'] not in ('ste', 'mdgf'):
    raise ValueError(f'sdgf_inner={c["sdgf_inner"]!r}; choose "ste" or "mdgf".')
  if c['name'] == 'step' and (c['dense_steps'] or c['dense_frac']):
    raise ValueError('recipe "step" finds its dense phase by AutoSwitch: leave dense_frac/'
                     'dense_steps at 0 and set step.t_min / step.t_max instead.')
  d, st = c['decay'], c['structure']
  schedules.Decay.over(d['kind'], 1, final=d['final'], rate=d['rate'],
                       duration=1.0 if d['duration'] is None else d['duration'],
                       interval=d['interval'], levels=d['levels'], width=d['width'])
  schedules.Structure(kind=st['kind'], levels=st['levels'], stages=tuple(st['stages'] or ()))
  return c


def _as_dict(config: Any) -> dict:
  """A plain dict from a dict or an ``ml_collections.ConfigDict`` (which has ``to_dict``)."""
  return config.to_dict() if hasattr(config, 'to_dict') else dict(config)


def _flatten(d: Mapping, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping) and f'{prefix}{k}'.split('.')[0] in ('decay', 'structure', 'step'):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


# ----------------------------------------------------------------------------- recipe

def step_bounds(step: dict, total_steps: int) -> tuple[int, Optional[int]]:
  """STEP's AutoSwitch bounds ``(T_min, T_max)`` in steps from its config (``recipe.step``):
  the ``*_steps`` fields when set, else the fractions of the run; ``T_max`` None: no bound."""
  t_min = step['t_min_steps'] if step['t_min_steps'] is not None else float(step['t_min'])
  t_max = step['t_max_steps'] if step['t_max_steps'] is not None else step['t_max']
  t_min = schedules.to_steps(t_min, total_steps, 'step.t_min')
  t_max = None if t_max is None else schedules.to_steps(t_max, total_steps, 'step.t_max')
  return t_min, t_max


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A validated recipe: the config with durations turned into steps for one run length."""

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
    """Parses a (possibly partial) recipe config, dict or ``ConfigDict``; errors name the bad key."""
    c = check_config(config)
    dense = c['dense_steps'] if c['dense_steps'] is not None else float(c['dense_frac'])
    finetune = c['finetune_steps'] if c['finetune_steps'] is not None else float(c['finetune_frac'])
    phases = schedules.Phases.from_durations(total_steps, dense, finetune)
    name = c['name']
    inner = 'mdgf' if name == 'mdgf_sdgf' else c['sdgf_inner']
    decay = structure = step_kwargs = None
    if name == 'mdgf' or (name in ('sdgf', 'mdgf_sdgf') and inner == 'mdgf'):
      d = c['decay']
      decay = schedules.Decay.over(d['kind'], phases.sparse_steps, final=d['final'],
                                   duration=1.0 if d['duration'] is None else d['duration'],
                                   rate=d['rate'], interval=d['interval'],
                                   levels=d['levels'], width=d['width'])
    if name in ('sdgf', 'mdgf_sdgf'):
      s = c['structure']
      structure = schedules.Structure(kind=s['kind'], levels=s['levels'], stages=tuple(s['stages'] or ()))
      if phases.sparse_steps == 0:
        raise ValueError('SDGF needs a sparse phase of at least one step.')
    if name == 'step':
      s = c['step']
      t_min, t_max = step_bounds(s, total_steps)
      step_kwargs = dict(t_min=t_min, t_max=t_max, threshold=s['threshold'], window=s['window'],
                         statistic=s['statistic'], scale_free=s['scale_free'],
                         frozen_eps=s['frozen_eps'])
    return cls(name=name, phases=phases, finetune_mask=c['finetune_mask'],
               srste_lambda=float(c['srste_lambda']), refresh_every=int(c['refresh_every']),
               mdgf_backward=c['mdgf_backward'], decay=decay, structure=structure,
               sdgf_inner=inner, step_kwargs=step_kwargs,
               step_srste=bool(c['step']['srste']) if name == 'step' else False)


# ----------------------------------------------------------------------------- the table

NONE, STAGE, TARGET, STORED = 'none', 'stage', 'target', 'stored'  # Mask sources.
A, LAM = 'a', 'lam'  # Scalars resolved per step: MDGF's a(t), SR-STE's lambda.
Scalar = Union[float, str]


@dataclasses.dataclass(frozen=True)
class Row:
  """One phase of a recipe: the keep-mask's source and the ``flow`` scalars."""

  mask: str  # NONE | STAGE (the layer's stage N:M) | TARGET (the layer's N:M) | STORED
  fwd: Scalar
  bwd: Scalar
  lam: Scalar


def table(r: Recipe) -> tuple[Row, Row, Row, Row]:
  """The rows (dense, sparse, finetune, final) of recipe ``r``: the tables of the module docstring."""
  if r.name == 'dense':
    return (Row(NONE, 1.0, 1.0, 0.0),) * 4
  dense = Row(NONE, 1.0, 1.0, 0.0)
  if r.name in ('oneshot', 'hard'):
    sparse = Row(STORED, 0.0, 0.0, 0.0)
  else:
    mdgf = r.decay is not None
    sparse = Row(STAGE, A if mdgf else 0.0,
                 A if mdgf and r.mdgf_backward == 'decay_scaled' else 1.0,
                 LAM if r.name == 'srste' or r.step_srste else 0.0)
  if r.name == 'oneshot' or r.finetune_mask == 'frozen':
    finetune = Row(STORED, 0.0, 0.0, 0.0)
  else:
    finetune = Row(TARGET, 0.0, 1.0, 0.0)
  ph = r.phases
  last = finetune if ph.finetune_start < ph.total else sparse if _has_sparse(r) else dense
  # The final model is hard (fwd 0) over the last phase's mask; bwd and lam, which no
  # forward pass uses, repeat the last phase's so that they stay static numbers.
  final = Row(STORED if last.mask == STORED else TARGET, 0.0, last.bwd, last.lam)
  return dense, sparse, finetune, final


def _has_sparse(r: Recipe) -> bool:
  return r.phases.sparse_steps > 0 or (r.name == 'step' and r.phases.finetune_start > 0)


def reachable(r: Recipe) -> tuple[int, ...]:
  """The phases a run of ``r`` passes through (FINAL always: evaluation once it is over)."""
  ph = r.phases
  out = []
  if ph.dense_end > 0 or (r.name == 'step' and ph.finetune_start > 0):
    out.append(DENSE)
  if _has_sparse(r):
    out.append(SPARSE)
  if ph.finetune_start < ph.total:
    out.append(FINETUNE)
  return tuple(out) + (FINAL,)


@dataclasses.dataclass(frozen=True)
class LayerSchedule:
  """One sparsified kernel's N:M over the sparse phase: ``patterns[k]`` from step ``starts[k]``."""

  patterns: tuple[tuple[int, int], ...]
  starts: tuple[int, ...]

  def stage(self, step: jax.Array) -> jax.Array:
    """Stage index at ``step`` (0 before the sparse phase, the last one after it)."""
    return schedules.stage_index(step, self.starts)


# ----------------------------------------------------------------------------- sparsifier

@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity (usable as a static arg).
class Sparsifier:
  """Everything a train step needs for one recipe over one params structure.

  Methods are pure: they take and return arrays and never mutate. ``specs`` is
  the params-shaped pytree of ``NMSpec`` (``None`` = dense).
  """

  recipe: Recipe
  specs: PyTree
  sizes: PyTree = None  # Params-shaped pytree of leaf sizes (for size-weighted densities).

  @property
  def phases(self) -> schedules.Phases:
    return self.recipe.phases

  @property
  def rows(self) -> tuple[Row, Row, Row, Row]:
    return table(self.recipe)

  def schedule(self, spec: rules_lib.NMSpec) -> LayerSchedule:
    """The N:M stages of a kernel with target ``spec``: one stage unless SDGF."""
    st, ph = self.recipe.structure, self.phases
    if st is None:
      return LayerSchedule(((spec.n, spec.m),), (ph.dense_end,))
    pats = tuple(st.patterns(spec.n, spec.m))
    return LayerSchedule(pats, tuple(int(x) for x in st.starts(ph, len(pats))))

  def phase(self, step: jax.Array, opt_state: PyTree = None) -> jax.Array:
    """The table row of ``step``: DENSE, SPARSE, FINETUNE or FINAL (int32)."""
    step, ph = jnp.asarray(step), self.phases
    if self.recipe.name == 'step':
      if opt_state is None:
        raise ValueError('recipe "step" reads its phase from the optimizer state: pass opt_state= '
                         'to the Sparsifier (and build the optimizer with sp.scale_by_adam).')
      sparse = step_optimizer.switched(opt_state)
    else:
      sparse = step >= ph.dense_end
    return jnp.where(step >= ph.total, FINAL, jnp.where(
        step >= ph.finetune_start, FINETUNE, jnp.where(sparse, SPARSE, DENSE))).astype(jnp.int32)

  @property
  def needs_masks(self) -> bool:
    """Whether a reachable row reads masks stored in the sparsity state."""
    rows = self.rows
    return any(rows[p].mask == STORED for p in reachable(self.recipe))

  # ---------------------------------------------------------------- state
  def _sparse_leaves(self, params: PyTree) -> list[tuple[str, rules_lib.NMSpec, Any]]:
    """``[(path, spec, leaf)]`` of the sparsified leaves, in flatten order."""
    named = rules_lib.named_leaves(params)
    return [(k, s, w) for (k, w), s in zip(named, rules_lib.spec_leaves(self.specs)) if s is not None]

  def init(self, params: PyTree) -> dict:
    """Sparsity state: ``{'masks': {path: bool mask}}`` for recipes that store masks, else ``{}``."""
    if not self.needs_masks:
      return {}
    return {'masks': {k: masks_lib.nm_mask(w, s.n, s.m, s.axes) for k, s, w in self._sparse_leaves(params)}}

  def update(self, params: PyTree, state: dict, step: jax.Array) -> dict:
    """Retakes stored masks where the recipe says so; call at the start of each step."""
    if not self.needs_masks:
      return state
    r, ph = self.recipe, self.phases
    step = jnp.asarray(step)
    if r.name == 'oneshot':
      retake = step == ph.dense_end
    else:
      retake = (step == ph.finetune_start) & (self.rows[FINETUNE].mask == STORED)
      if r.name == 'hard':
        retake |= ((step >= ph.dense_end) & (step < ph.finetune_start) &
                   ((step - ph.dense_end) % r.refresh_every == 0))
    masks = lax.cond(retake, lambda: self.init(params)['masks'], lambda: state['masks'])
    return {**state, 'masks': masks}

  # ---------------------------------------------------------------- the step's row
  def _scalars(self, phase: jax.Array, step: jax.Array) -> tuple[Any, Any, Any]:
    """``(fwd, bwd, lam)`` of the row of ``phase``: Python floats when every reachable row agrees."""
    rows, live = self.rows, reachable(self.recipe)
    values = {A: None, LAM: float(self.recipe.srste_lambda)}
    if self.recipe.decay is not None:
      values[A] = self.recipe.decay(self.phases.t(step))

    def pick(field):
      col = [getattr(rows[p], field) for p in range(4)]
      col = [values[v] if isinstance(v, str) else v for v in col]
      used = {col[p] for p in live if isinstance(col[p], float)}
      if len(used) == 1 and all(isinstance(col[p], float) for p in live):
        return used.pop()  # Static: compiles to no arithmetic for 0 and 1.
      return jnp.stack([jnp.asarray(0.0 if v is None else v, jnp.float32) for v in col])[phase]

    return pick('fwd'), pick('bwd'), pick('lam')

  def _masks(self, params: PyTree, state: dict, phase: jax.Array, step: jax.Array) -> list:
    """Keep-mask of each sparsified leaf (flatten order) in the row of ``phase``.

    Per leaf, the reachable rows name a few mask sources (its stage N:Ms, the stored
    mask). One source is computed directly; several, by a ``lax.switch`` over the
    boolean masks only (floats never pass through a conditional).
    """
    rows, live = self.rows, reachable(self.recipe)
    out = []
    for key, s, w in self._sparse_leaves(params):
      sched = self.schedule(s)
      k_last = len(sched.patterns) - 1

      def source(p, k):  # The mask source of row p at stage k: None in the dense row.
        return {NONE: None, STORED: (STORED,), TARGET: sched.patterns[k_last],
                STAGE: sched.patterns[k]}[rows[p].mask]

      grid = [[source(p, k) for k in range(k_last + 1)] for p in range(4)]
      sources = list(dict.fromkeys(x for p in live for x in grid[p] if x is not None))
      sources = sources or [sched.patterns[k_last]]
      fns = [self._mask_fn(src, s, w, state, key) for src in sources]
      if len(fns) == 1:
        out.append(fns[0]())
        continue
      index = np.asarray([[sources.index(x) if x in sources else 0 for x in grid[p]]
                          for p in range(4)], np.int32)
      out.append(lax.switch(jnp.asarray(index)[phase, sched.stage(step)], fns))
    return out

  @staticmethod
  def _mask_fn(source, s, w, state, key):
    if source == (STORED,):
      return lambda: state['masks'][key]
    n, m = source
    return lambda: masks_lib.nm_mask(w, n, m, s.axes)

  # ---------------------------------------------------------------- public views
  def apply(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Effective params for the forward pass at ``step``; differentiable in ``params``.

    One :func:`nmsparse.ops.flow` per kernel over the row's mask, its scalars picked
    by the row: the dense row (1, 1, 0) is the identity whatever the mask. At
    ``step >= total`` it is the hard N:M model. ``opt_state`` is needed only by
    recipe ``step`` (its phase lives in the optimizer).
    """
    if self.recipe.name == 'dense':
      return params
    phase = self.phase(step, opt_state)
    fwd, bwd, lam = self._scalars(phase, step)
    masks = iter(self._masks(params, state, phase, step))
    return rules_lib.map_sparse(lambda s, w: ops.flow(w, next(masks), fwd, bwd, lam), self.specs, params)

  def masks(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Keep-masks at ``step`` (params structure; all True in the dense row, None for dense leaves)."""
    if self.recipe.name == 'dense':
      return rules_lib.map_sparse(lambda s, w: jnp.ones(w.shape, bool), self.specs, params,
                                  dense=lambda w: None)
    phase = self.phase(step, opt_state)
    masks = iter(self._masks(params, state, phase, step))
    return rules_lib.map_sparse(lambda s, w: next(masks) | (phase == DENSE), self.specs, params,
                                dense=lambda w: None)

  def hard_params(self, params: PyTree, state: dict, step: jax.Array, opt_state: PyTree = None) -> PyTree:
    """Params with pruned weights zeroed by the masks of ``step`` (the deployable model)."""
    m = self.masks(params, state, step, opt_state)
    return rules_lib.map_sparse(lambda s, w, k: jnp.where(k, w, jnp.zeros((), w.dtype)),
                                self.specs, params, m)

  def info(self, step: jax.Array, opt_state: PyTree = None) -> dict[str, jax.Array]:
    """Scalars for logging, read off the step's row.

    ``phase`` (0 dense, 1 sparse, 2 fine-tune, 3 final), ``decay`` (the forward weight
    of pruned entries: 1 dense, a(t) in MDGF's sparse phase, else 0), ``density`` (the
    kept fraction of the sparsified kernels, size-weighted) and the SDGF ``stage`` (0
    for other recipes): one ``stage`` when every layer shares one schedule, else
    ``stage/N:M`` per target N:M. STEP adds AutoSwitch's latest ``autoswitch_z``, its window
    mean ``autoswitch_zbar`` (nan before the first) and ``switch_step`` (-1 before the switch).
    """
    if self.recipe.name == 'dense':
      one = jnp.float32(1.0)
      return dict(phase=jnp.int32(0), decay=one, stage=jnp.int32(0), density=one)
    step = jnp.asarray(step)
    phase = self.phase(step, opt_state)
    fwd, _, _ = self._scalars(phase, step)
    rows = self.rows
    kept, total = jnp.float32(0.0), 0.0
    stages: dict[str, jax.Array] = {}
    for s, size in zip(rules_lib.spec_leaves(self.specs), jax.tree_util.tree_leaves(self.sizes)):
      if s is None:
        continue
      sched = self.schedule(s)
      k = sched.stage(step)
      stage_density = jnp.asarray([n / m for n, m in sched.patterns], jnp.float32)[k]
      density = jnp.where(phase == DENSE, 1.0, jnp.where(
          (phase == SPARSE) & (rows[SPARSE].mask == STAGE), stage_density, s.n / s.m))
      kept, total = kept + size * density, total + size
      if self.recipe.structure is not None:
        stages.setdefault(f'stage/{s.n}:{s.m}', k)
    out = dict(phase=phase, decay=jnp.asarray(fwd, jnp.float32),
               density=kept / total if total else jnp.float32(1.0))
    if self.recipe.name == 'step':  # AutoSwitch: the latest Z, its window mean, the switch step.
      st = step_optimizer.find_step_state(opt_state)
      window = st.z_window.shape[0]
      out |= dict(autoswitch_z=jnp.where(st.z_count > 0, st.z_window[(st.z_count - 1) % window], jnp.nan),
                  autoswitch_zbar=step_optimizer.autoswitch_statistic(st), switch_step=st.switch_step)
    if len(stages) > 1:
      return out | stages
    return out | {'stage': next(iter(stages.values()), jnp.int32(0))}

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


def make_sparsifier(config: Any, rules: rules_lib.Rules, params: PyTree,
                    total_steps: int, *, log: bool = True) -> Sparsifier:
  """Builds a ``Sparsifier`` from a recipe config, ordered rules and (abstract) params.

  ``config`` is a dict (a partial one takes the defaults of :func:`recipe_config`) or
  an ``ml_collections.ConfigDict``. Checks everything before any compilation: the
  recipe and its options, the rules against every parameter's shape, and every SDGF
  stage's N:M against every kernel.
  """
  recipe = Recipe.from_config(config, total_steps)
  specs = rules_lib.resolve(rules, params, log=log)
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), params)
  sp = Sparsifier(recipe, specs, sizes)
  if recipe.structure is not None:
    for key, s, w in sp._sparse_leaves(params):  # pylint: disable=protected-access
      pats = sp.schedule(s).patterns
      for n, m in pats:
        try:
          masks_lib.check_nm(w.shape, n, m, s.axes, name=key)
        except ValueError as e:
          raise ValueError(f'SDGF {recipe.structure.kind} schedule {list(pats)} for target '
                           f'{s.n}:{s.m}: {e}') from None
  if log:
    logging.info('N:M recipe %s, phases %s', recipe.name, recipe.phases)
  return sp
