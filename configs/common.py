"""Shared pieces of the experiment configs: the argument string and the default blocks."""

from __future__ import annotations

from typing import Any

import ml_collections

import nmsparse

ph = ml_collections.config_dict.placeholder


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses ``'variant=S/16,recipe=mdgf,runlocal'`` into a locked ConfigDict.

  Values are typed by their defaults (a bare key sets a bool to True); unknown
  keys are an error that lists the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; known: {sorted(defaults)}.')
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f'Config argument {key!r} needs a value ({key}=...).')
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'Config argument {key}={value!r}: write true or false.')
      out[key] = value.lower() in ('true', '1')
    else:
      out[key] = type(default)(value) if default is not None else value
  out.lock()
  return out


def splits(config: ml_collections.ConfigDict, val: int, *, train: str = 'train', test: str = 'test') -> None:
  """Sets the train / eval / test splits. ``val`` = 0: train on ``train``, evaluate on ``test``.
  ``val`` in (0, 100): hold out the last ``val`` % of ``train`` as the validation split that the
  run evaluates on (for choosing a setting), and report the final model on ``test`` (test_* keys)."""
  if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < 100:
    raise ValueError(f'Config argument val={val!r}: the percent of {train!r} held out for validation, '
                     'an integer in [0, 100) (0: no validation split).')
  if val == 0:
    config.train_split, config.eval_split = train, test
  else:
    cut = 100 - val
    config.train_split, config.eval_split, config.test_split = f'{train}[:{cut}%]', f'{train}[{cut}%:]', test


def sparsity(recipe: str, nm: str, layers: str, **recipe_overrides: Any) -> ml_collections.ConfigDict:
  """The ``config.sparsity`` block: a recipe, the N:M pattern and the layer preset."""
  nmsparse.parse_nm(nm)
  if recipe == 'step':  # STEP's dense phase ends at its AutoSwitch, no earlier than t_min.
    recipe_overrides['step.t_min'] = recipe_overrides.pop('dense_frac', 0.1) or 0.1
  return ml_collections.ConfigDict(dict(
      recipe=typed(nmsparse.recipe_config(recipe, **recipe_overrides)),
      nm=nm,
      layers=layers,        # nmsparse.preset name: 'mlp' | 'mlp_qkv' | 'all'
      rules=ph(tuple),      # Optional explicit ((regex, 'N:M' or None, axes), ...), before the preset.
  ))


def typed(recipe: dict, prefix: str = '') -> ml_collections.ConfigDict:
  """A recipe config (``nmsparse.recipe_config``'s plain dict) as a ConfigDict whose unset
  fields are typed placeholders, so that ``--config.sparsity.recipe.x=...`` parses and checks."""
  out = {}
  for key, value in recipe.items():
    if isinstance(value, dict):
      out[key] = typed(value, f'{prefix}{key}.')
    elif value is None:
      out[key] = ph(nmsparse.recipes.OPTIONAL_FIELDS[f'{prefix}{key}'])
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


def init_from() -> ml_collections.ConfigDict:
  """The ``config.init_from`` block (experiments/init_from.py): ``path`` unset starts fresh."""
  return ml_collections.ConfigDict(dict(path=ph(str), step=ph(int), include='.*'))


def optimizer(lr: float, *, wd: float = 1e-4, clip: float = 1.0, b1: float = 0.9, b2: float = 0.999,
              warmup_steps: int | None = None, warmup_epochs: float | None = None,
              base_batch: int | None = None) -> ml_collections.ConfigDict:
  """AdamW with linear warm-up then cosine; ``base_batch`` enables square-root lr scaling."""
  return ml_collections.ConfigDict(dict(
      name='adamw', lr=lr, b1=b1, b2=b2, eps=1e-8, wd=wd, clip=clip, schedule='cosine',
      warmup_steps=ph(int) if warmup_steps is None else warmup_steps,
      warmup_epochs=ph(float) if warmup_epochs is None else warmup_epochs,
      base_batch=ph(int) if base_batch is None else base_batch,
  ))


def run_defaults(config: ml_collections.ConfigDict) -> None:
  """Fields every config has: durations (steps | epochs | examples), logging, checkpoints, mesh."""
  config.seed = 0
  config.total_steps = ph(int)
  config.total_epochs = ph(float)
  config.total_examples = ph(int)
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.eval_steps = ph(int)  # Eval batches per evaluation; None: the whole split.
  # Set for model selection: eval_split is then the validation split (e.g. 'train[90%:]', with
  # train_split 'train[:90%]') and the final model is also evaluated once on test_split
  # (final_metrics.json: test_* keys), which nothing during training looks at.
  config.test_split = ph(str)
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.diagnostics_every_steps = 50  # nmsparse diagnostics (sparsity, flips, grad norms)
  config.diagnostics_points = ph(int)  # Instead: about this many diagnostics steps over the run.
  config.diagnostics_microbatches = 4  # Gradient noise from 4 microbatch gradients (0: skip).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  config.abstract_lowering_only = False
  config.init_from = init_from()  # Params from another run's checkpoint (fine-tuning).
