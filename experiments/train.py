"""One train loop for every model family: ``train_and_evaluate(config, workdir)``.

The sparsity of each step (effective params, decay, structure, phase) comes from
``nmsparse`` as a pure function of the step and the sparsity state, so a run
resumed from a checkpoint continues exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import nmsparse
from experiments import checkpoints
from experiments import environment
from experiments import init_from as init_from_lib
from experiments import optimizer as optimizer_lib
from experiments import reporting
from experiments import state as state_lib
from experiments.tasks import Task, get_task

PyTree = Any


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config before any compilation."""

  config: ml_collections.ConfigDict
  task: Task
  model: Any
  mesh: jax.sharding.Mesh
  sp: nmsparse.Sparsifier
  tx: optax.GradientTransformation
  lr: optax.Schedule
  total_steps: int
  steps_per_epoch: int
  abstract_state: PyTree
  shardings: PyTree
  diagnostics_every: int = 0  # Steps between diagnostics steps (0: none); see diagnostics_every().


def sparsity_rules(config: ml_collections.ConfigDict, task: Task) -> list:
  """Explicit ``config.sparsity.rules`` (first) then the layer preset at ``config.sparsity.nm``."""
  s = config.sparsity
  rules = []
  for rule in s.rules or ():
    regex, nm, *axes = rule
    spec = None if nm is None else nmsparse.NMSpec(*nmsparse.parse_nm(nm), tuple(axes[0]) if axes else None)
    rules.append((regex, spec))
  if s.layers != 'none':
    rules += nmsparse.preset(s.layers, *nmsparse.parse_nm(s.nm), **task.preset_kwargs)
  return rules


def sparsity_meta(config: ml_collections.ConfigDict) -> dict:
  """The sparsity setting as JSON data, stored in every checkpoint and compared on resume."""
  return json.loads(json.dumps(config.sparsity.to_dict(), default=str))


def run_meta(s: Setup) -> dict:
  """What every checkpoint records and a resume must match: sparsity setting and run length."""
  return {'sparsity': sparsity_meta(s.config), 'total_steps': s.total_steps,
          'steps_per_epoch': s.steps_per_epoch}


def abstract_state(s: Setup) -> PyTree:
  """The train state's shapes, dtypes and shardings: the restore target."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                      s.abstract_state, s.shardings)


def setup(config: ml_collections.ConfigDict, *, steps_per_epoch: int, devices=None) -> Setup:
  """Builds model, sparsifier, optimizer and abstract state: shapes only, nothing compiled."""
  task = get_task(config.task)
  model = task.build_model(config)
  mesh = state_lib.make_mesh(config.mesh, devices)
  for name in ('batch_size', 'eval_batch_size'):
    size = config.get(name) or config.batch_size
    if size % mesh.size:
      raise ValueError(f'config.{name}={size} is not divisible by the {mesh.size} devices; '
                       'choose a multiple of the device count.')
  micro = config.get('diagnostics_microbatches') or 0
  if micro > 1 and config.batch_size % micro:
    raise ValueError(f'config.diagnostics_microbatches={micro} does not divide batch_size '
                     f'{config.batch_size}; choose a divisor (or 0 to skip the gradient-noise diagnostics).')
  total = optimizer_lib.duration_steps(config, 'total', steps_per_epoch, config.batch_size)
  if not total:
    raise ValueError('Set the run length: config.total_steps, total_epochs or total_examples.')
  diag_every = diagnostics_every(config, total)
  batch = task.dummy_batch(config, 2)
  abstract_params = jax.eval_shape(lambda: task.init(model, jax.random.key(0), batch))
  sp = nmsparse.make_sparsifier(config.sparsity.recipe, sparsity_rules(config, task), abstract_params,
                                total)
  tx, lr = optimizer_lib.make_optimizer(config.optimizer, sp, batch_size=config.batch_size,
                                        total_steps=total, steps_per_epoch=steps_per_epoch)
  abstract_state = jax.eval_shape(functools.partial(_create_state, task, model, sp, tx, batch),
                                  jax.random.key(0))
  shardings = state_lib.state_shardings(abstract_state, mesh)
  return Setup(config, task, model, mesh, sp, tx, lr, total, steps_per_epoch, abstract_state, shardings,
               diag_every)


def diagnostics_every(config: ml_collections.ConfigDict, total_steps: int) -> int:
  """Steps between diagnostics steps: ``diagnostics_every_steps``, or from ``diagnostics_points``.

  ``config.diagnostics_points = P`` spreads about P diagnostics steps over the run whatever its
  length (every ``max(1, total_steps // P)`` steps), so that a sweep over run lengths keeps the
  curves' resolution without a step count copied into the config; it replaces
  ``diagnostics_every_steps``. 0 or None in both: no diagnostics steps.
  """
  points = config.get('diagnostics_points')
  if points:
    if points < 0:
      raise ValueError(f'config.diagnostics_points={points}: give a positive number of points (or None).')
    return max(1, total_steps // points)
  return config.get('diagnostics_every_steps') or 0


def _create_state(task, model, sp, tx, batch, rng) -> state_lib.TrainState:
  params = task.init(model, rng, batch)
  return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                              sparsity=sp.init(params))


def create_state(s: Setup, rng: jax.Array) -> state_lib.TrainState:
  batch = s.task.dummy_batch(s.config, 2)
  return jax.jit(functools.partial(_create_state, s.task, s.model, s.sp, s.tx, batch),
                 out_shardings=s.shardings)(rng)


def initial_state(s: Setup, rng: jax.Array) -> state_lib.TrainState:
  """A fresh state; with ``config.init_from``, its params come from another run's checkpoint.

  The checkpoint is read and matched against the model's parameter shapes before anything
  is compiled; optimizer and sparsity state are then initialised from the loaded params.
  """
  if not init_from_lib.enabled(s.config):
    return create_state(s, rng)
  c = s.config.init_from
  merged, _ = init_from_lib.merge(s.abstract_state.params, init_from_lib.load_params(c.path, c.step),
                                  c.include)
  fresh = create_state(s, rng)
  params = jax.tree.map(lambda m, f: f if isinstance(m, jax.ShapeDtypeStruct) else m, merged, fresh.params)

  def restart(params):
    return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=s.tx.init(params), sparsity=s.sp.init(params))
  return jax.jit(restart, out_shardings=s.shardings)(params)


# ----------------------------------------------------------------------------- steps

def make_train_step(s: Setup, *, diagnostics: bool = False):
  """The jitted train step: sparsity update, forward/backward through the effective params, AdamW."""
  config, sp, task, model, tx = s.config, s.sp, s.task, s.model, s.tx
  base_rng = jax.random.key(config.seed)
  micro = config.get('diagnostics_microbatches') or 0

  def step_fn(state: state_lib.TrainState, batch: dict):
    step = state.step
    rng = jax.random.fold_in(base_rng, step)
    sparsity = sp.update(state.params, state.sparsity, step)

    def loss(params):
      eff = sp.apply(params, sparsity, step, state.opt_state)
      mean, sums, count = task.loss_fn(model, eff, batch, rng, True, config)
      return mean, (sums, count)

    (mean, (sums, count)), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'train/loss': mean, 'train/accuracy': sums.get('accuracy', 0.0) / jnp.maximum(count, 1),
               'train/grad_norm': optax.tree.norm(grads), 'train/lr': s.lr(step)}
    metrics.update({f'sparsity/{k}': v for k, v in sp.info(step, state.opt_state).items()})
    if diagnostics:
      masks = sp.masks(state.params, sparsity, step, state.opt_state)
      new_masks = sp.masks(params, sparsity, step, state.opt_state)
      eff = sp.apply(state.params, sparsity, step, state.opt_state)
      hard = sp.hard_params(state.params, sparsity, step, state.opt_state)
      metrics['sparsity/achieved'] = nmsparse.sparsity(eff, sp.specs)
      metrics['sparsity/nm_valid'] = nmsparse.nm_valid_fraction(eff, sp.specs)
      metrics['sparsity/hard_nm_valid'] = nmsparse.nm_valid_fraction(hard, sp.specs)
      metrics['sparsity/mask_flip_rate'] = nmsparse.mask_flip_rate(masks, new_masks)['mask_flip_rate']
      metrics.update({f'grad/{k}': v for k, v in nmsparse.grad_norms(grads, masks).items()})
      if micro > 1:  # Gradient noise on kept and pruned weights, from `micro` microbatch gradients.
        stacked = _microbatch_grads(state.params, batch, micro, lambda p, mb: task.loss_fn(
            model, sp.apply(p, sparsity, step, state.opt_state), mb, rng, True, config)[0])
        metrics.update({f'grad/{k}': v for k, v in nmsparse.gradient_noise(stacked, masks).items()})
    new_state = state.replace(step=step + 1, params=params, opt_state=opt_state, sparsity=sparsity)
    return new_state, metrics

  batch_sh = state_lib.batch_sharding(s.mesh)
  return jax.jit(step_fn, in_shardings=(s.shardings, batch_sh),
                 out_shardings=(s.shardings, state_lib.replicated(s.mesh)), donate_argnums=0)


def _microbatch_grads(params: PyTree, batch: dict, micro: int, loss) -> PyTree:
  """Gradients of ``loss(params, microbatch)`` on ``micro`` equal slices of the batch, stacked on axis 0."""
  split = jax.tree.map(lambda x: x.reshape((micro, x.shape[0] // micro) + x.shape[1:]), batch)
  return jax.lax.map(lambda mb: jax.grad(loss)(params, mb), split)


def make_eval_step(s: Setup, *, hard: bool = False):
  """Sums of the task's metrics on one batch, with the masks and decay of the state's own step.

  ``hard=True`` evaluates the deployable model: pruned weights zeroed by the step's masks.
  """
  config, sp, task, model = s.config, s.sp, s.task, s.model

  def eval_fn(state: state_lib.TrainState, batch: dict):
    make = sp.hard_params if hard else sp.apply
    params = make(state.params, state.sparsity, state.step, state.opt_state)
    _, sums, count = task.loss_fn(model, params, batch, jax.random.key(0), False, config)
    return {**sums, 'count': count}

  return jax.jit(eval_fn, in_shardings=(s.shardings, state_lib.batch_sharding(s.mesh)),
                 out_shardings=state_lib.replicated(s.mesh))


def evaluate(s: Setup, state: state_lib.TrainState, eval_input, *, hard: bool = False,
             eval_step=None) -> dict[str, float]:
  """One pass over the eval split; every example counted once (padding is masked)."""
  eval_step = eval_step or make_eval_step(s, hard=hard)
  sharding = state_lib.batch_sharding(s.mesh)
  totals: dict[str, float] = {}
  for batch in eval_batches(s, eval_input):
    out = jax.device_get(eval_step(state, state_lib.global_batch(batch, sharding)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop('count', 0.0)
  out = {k: v / max(count, 1.0) for k, v in totals.items()}
  if s.task.derived_metrics is not None:
    out = s.task.derived_metrics(out)
  if s.task.decode_metrics is not None and s.config.get('decode_eval', True):
    make = s.sp.hard_params if hard else s.sp.apply
    params = jax.jit(make)(state.params, state.sparsity, state.step, state.opt_state)
    out |= s.task.decode_metrics(s, params, eval_input)
  return out | {'count': count}


def eval_batches(s: Setup, eval_input):
  """The eval split's batches, the first ``config.eval_steps`` of them if set (None: all)."""
  limit = s.config.get('eval_steps')
  for i, batch in enumerate(eval_input.iterator(0)):
    if limit and i >= limit:
      return
    yield batch


# ----------------------------------------------------------------------------- loop

def make_input(config: ml_collections.ConfigDict, task: Task, *, train: bool, split: str | None = None):
  """The train split (shuffled, ``batch_size``) or an eval split (one padded pass,
  ``eval_batch_size``): ``config.eval_split`` unless ``split`` names another (the test split)."""
  kw = dict(seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
  if train:
    return task.make_input(config, split=config.train_split, train=True,
                           global_batch_size=config.batch_size, **kw)
  return task.make_input(config, split=split or config.eval_split, train=False,
                         global_batch_size=config.get('eval_batch_size') or config.batch_size, **kw)


def make_test_input(config: ml_collections.ConfigDict, task: Task):
  """``config.test_split``'s input, or None when it is unset; refuses a test split that is one of
  the splits the run trains or selects on."""
  test = config.get('test_split')
  if not test:
    return None
  if test in (config.train_split, config.eval_split):
    which = 'train_split' if test == config.train_split else 'eval_split'
    raise ValueError(f'config.test_split {test!r} is also config.{which}: the test split must be held '
                     "out from training and selection (e.g. train_split 'train[:90%]', eval_split "
                     "'train[90%:]', test_split 'test').")
  return make_input(config, task, train=False, split=test)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from ``workdir`` if it holds checkpoints), evaluates, returns final metrics.

  Every check runs before anything is written to ``workdir`` (a refused run leaves it as it
  was): the config, data and sparsity rules (``setup``), then the newest readable
  checkpoint's sparsity setting, run length and state tree (``checkpoints.CannotResume``).
  Then ``config.json`` and ``environment.json`` are written; ``final_metrics.json`` ends the run.
  """
  preempted = checkpoints.PreemptionFlag()  # First: a SIGTERM during set-up still saves cleanly.
  ckpt = writer = None
  try:
    task = get_task(config.task)
    train_input, eval_input = make_input(config, task, train=True), make_input(config, task, train=False)
    test_input = make_test_input(config, task)  # Opened now: a bad split stops the run before it trains.
    s = setup(config, steps_per_epoch=train_input.steps_per_epoch)
    _log_overview(s)
    meta = run_meta(s)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    every=config.checkpoint_every_steps, keep=config.keep_checkpoints)
    restored = ckpt.restore_latest(abstract_state(s), meta)
    if restored is None:
      state = initial_state(s, jax.random.key(config.seed))
      data_state = None
    else:
      state, data_state, _ = restored
    env = environment.describe()
    write_run_files(workdir, config, env)  # Every check passed: the first write to the workdir.

    start = int(jax.device_get(state.step))
    train_iter = train_input.iterator(start)
    if data_state is not None:
      train_iter.set_state(data_state)
    train_step = make_train_step(s)
    diag_step = make_train_step(s, diagnostics=True)
    eval_step = make_eval_step(s)
    writer = reporting.MetricWriter(workdir)
    every = s.diagnostics_every
    progress = reporting.Progress(start, s.total_steps, diagnostics_every=every)
    sharding = state_lib.batch_sharding(s.mesh)
    block_every_step = jax.device_count() > 2 and jax.devices()[0].platform == 'cpu'
    last_finite = start
    step = start
    while step < s.total_steps:
      batch = state_lib.global_batch(next(train_iter), sharding)
      diag = reporting.is_diagnostics_step(step, every, s.total_steps)
      state, metrics = (diag_step if diag else train_step)(state, batch)
      step += 1
      if block_every_step:
        jax.block_until_ready(state.step)
      if step % config.log_every_steps == 0 or diag or step == s.total_steps:
        values = writer.write(step, jax.device_get(metrics))
        if not math.isfinite(values['train/loss']):
          raise FloatingPointError(
              f'train/loss is {values["train/loss"]} at step {step}; it was finite at step {last_finite}: '
              f'the run diverged in steps ({last_finite}, {step}]. Lower the learning rate or check the data.')
        last_finite = step
        logging.info('%s | %s', progress.update(step), reporting.format_metrics(
            values, ('train/loss', 'train/accuracy', 'sparsity/decay', 'sparsity/density',
                     'sparsity/achieved', 'sparsity/nm_valid', 'sparsity/mask_flip_rate')))
      if step % config.eval_every_steps == 0 and step < s.total_steps:
        ev = evaluate(s, state, eval_input, eval_step=eval_step)
        writer.write(step, {f'eval/{k}': v for k, v in ev.items() if k != 'count'})
        logging.info('eval at step %d: %s', step, reporting.format_metrics(ev))
        progress.pause(step)
      stop = preempted.is_set(step)
      ckpt.save(step, state, train_iter.get_state(), meta, force=stop or step == s.total_steps)
      if stop:
        logging.warning('stopped at step %d after a signal; rerun the same command to resume.', step)
        ckpt.wait()
        return {'preempted_at_step': float(step)}
    final = final_evaluation(s, state, eval_input, eval_step=eval_step)
    if test_input is not None:
      final |= test_evaluation(s, state, test_input, eval_step=eval_step)
    writer.write(s.total_steps, {f'final/{k}': v for k, v in final.items()})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'final_metrics.json'), 'w') as f:
        json.dump(final | {'environment': env}, f, indent=2, sort_keys=True)
    logging.info('final: %s', reporting.format_metrics(final))
    return final
  finally:
    if ckpt is not None:
      ckpt.close()
    if writer is not None:
      writer.close()
    preempted.restore()


def write_run_files(workdir: str, config: ml_collections.ConfigDict, env: dict) -> None:
  """Creates ``workdir`` with ``config.json`` and ``environment.json`` (process 0).

  A resumed run whose environment differs from the previous start's is logged, naming what changed.
  """
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  path = os.path.join(workdir, 'environment.json')
  if os.path.exists(path):
    _log_environment_change(path, env)
  with open(path, 'w') as f:
    json.dump(env, f, indent=2, sort_keys=True)


def _log_environment_change(path: str, env: dict) -> None:
  with open(path) as f:
    try:
      previous = json.load(f)
    except json.JSONDecodeError as e:
      logging.warning('the previous %s is unreadable (%s); it is replaced.', path, e)
      return
  changed = sorted(k for k in set(previous) | set(env) if previous.get(k) != env.get(k))
  if changed:
    logging.warning('this run continues under another environment than its previous start: %s',
                    {k: {'before': previous.get(k), 'now': env.get(k)} for k in changed})


def final_evaluation(s: Setup, state: state_lib.TrainState, eval_input, *, eval_step=None) -> dict:
  """Metrics of the model as trained and of the deployable hard N:M model, plus its sparsity."""
  out = split_metrics(s, state, eval_input, 'eval_', 'hard_', eval_step=eval_step)
  hard = jax.jit(s.sp.hard_params)(state.params, state.sparsity, state.step, state.opt_state)
  out['sparsity'] = float(nmsparse.sparsity(hard, s.sp.specs))
  out['nm_valid'] = float(nmsparse.nm_valid_fraction(hard, s.sp.specs))
  out['step'] = float(jax.device_get(state.step))
  return out


def test_evaluation(s: Setup, state: state_lib.TrainState, test_input, *, eval_step=None) -> dict:
  """The final model on the held-out test split: ``test_<metric>`` as trained, ``test_hard_<metric>``
  for the deployable hard N:M model, ``test_<count unit>``."""
  return split_metrics(s, state, test_input, 'test_', 'test_hard_', eval_step=eval_step)


def split_metrics(s: Setup, state: state_lib.TrainState, inputs, prefix: str, hard_prefix: str, *,
                  eval_step=None) -> dict:
  """One pass over ``inputs`` as trained (``prefix``) and one with the hard N:M model (``hard_prefix``)."""
  ev = evaluate(s, state, inputs, eval_step=eval_step)
  hard_ev = evaluate(s, state, inputs, hard=True)
  out = {f'{prefix}{k}': v for k, v in ev.items() if k != 'count'}
  out |= {f'{hard_prefix}{k}': v for k, v in hard_ev.items() if k != 'count'}
  out[f'{prefix}{s.task.count_unit}'] = ev['count']
  return out


def _log_overview(s: Setup) -> None:
  try:
    from clu import parameter_overview  # pylint: disable=g-import-not-at-top
    logging.info('parameters:\n%s', parameter_overview.get_parameter_overview(
        s.abstract_state.params, include_stats=False))
  except ImportError:
    pass
  summary = nmsparse.rules.summarize(s.sp.specs, s.abstract_state.params)
  logging.info('model %s: %d params, %d sparsified at %s, overall density %.3f; recipe %s, %d steps '
               '(%d per epoch) on a %s mesh', s.config.model.get('variant', s.config.model.name),
               summary['params'], summary['sparsified'], s.config.sparsity.nm, summary['density'],
               s.sp.recipe.name, s.total_steps, s.steps_per_epoch, dict(s.mesh.shape))
