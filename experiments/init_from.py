"""Start a run from another run's weights: ``config.init_from`` (fine-tuning a pretrained model).

    c.init_from.path = 'workdirs/t5_text'   # a workdir, its checkpoints/ folder or one step's folder
    c.init_from.step = None                 # newest step when None
    c.init_from.include = r'.*'             # which parameters to load (full match on 'a/b/kernel' names)

Only the parameters are loaded; the step, optimizer and sparsity state start fresh, and the
sparsity state is initialised from the loaded weights (so STEP's or a hard mask's first mask
is the loaded model's). The loaded weights are the stored dense ones: a run trained sparse
hands over its latent weights, which the new run's recipe masks again by magnitude. Parameters
that ``include`` does not match keep their fresh initialisation. A run that already has a
checkpoint of its own resumes from it and ignores ``init_from``.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nmsparse import rules

PyTree = Any


def enabled(config: ml_collections.ConfigDict) -> bool:
  block = config.get('init_from')
  return bool(block and block.get('path'))


def resolve(path: str, step: int | None = None) -> tuple[str, int]:
  """``(checkpoint folder, step)`` for a workdir, a checkpoints folder or a step folder."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'init_from.path {path} does not exist; give the workdir (or its '
                            'checkpoints/ folder) of the run to start from.')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  elif os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, 'state')):
    path, named = os.path.dirname(path), int(os.path.basename(path))
    if step is not None and step != named:
      raise ValueError(f'init_from.path names step {named} but init_from.step is {step}; set one.')
    step = named
  steps = sorted(int(d) for d in os.listdir(path)
                 if d.isdigit() and os.path.isdir(os.path.join(path, d, 'state')))
  if not steps:
    raise FileNotFoundError(f'init_from.path {path} holds no checkpoint (no <step>/state folder); '
                            'train the source run first or point at its workdir.')
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f'init_from.step {step} is not in {path}; it has steps {steps}.')
  return path, step


def load_params(path: str, step: int | None = None) -> dict[str, np.ndarray]:
  """The stored ``params`` of a checkpoint, flat by ``'a/b/kernel'`` name, as host arrays."""
  directory, step = resolve(path, step)
  mngr = ocp.CheckpointManager(directory, item_names=('state', 'data', 'meta'))
  try:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']
  finally:
    mngr.close()
  if not isinstance(state, dict) or 'params' not in state:
    raise ValueError(f'checkpoint {directory}/{step} has no params item; is it a checkpoint of this codebase?')
  logging.info('init_from: loading params of step %d from %s', step, directory)
  return {name: np.asarray(x) for name, x in rules.named_leaves(state['params'])}


def merge(params: PyTree, source: dict[str, np.ndarray], include: str = '.*') -> tuple[PyTree, list[str]]:
  """``params`` with every leaf whose name fully matches ``include`` taken from ``source``.

  Returns the new tree and the loaded names. A matched name missing from ``source`` or of
  another shape is an error that names it.
  """
  pattern = re.compile(include)
  named = rules.named_leaves(params)
  loaded, missing, mismatched, leaves = [], [], [], []
  for name, leaf in named:
    value = source.get(name) if pattern.fullmatch(name) else None
    if pattern.fullmatch(name) and value is None:
      missing.append(name)
    elif value is not None and value.shape != leaf.shape:
      mismatched.append(f'{name}: checkpoint {value.shape} vs model {leaf.shape}')
    if value is None:
      leaves.append(leaf)
    else:
      leaves.append(value.astype(leaf.dtype))
      loaded.append(name)
  if missing:
    raise ValueError(f'init_from: {len(missing)} parameter(s) matched by include={include!r} are not in '
                     f'the checkpoint, e.g. {missing[:5]}; narrow init_from.include to the shared ones.')
  if mismatched:
    raise ValueError(f'init_from: {len(mismatched)} parameter(s) differ in shape: {mismatched[:5]}; '
                     'use the source run\'s model variant and vocabulary size, or exclude them with '
                     'init_from.include.')
  if not loaded:
    raise ValueError(f'init_from.include={include!r} matches none of the model\'s parameters, e.g. {[n for n, _ in named[:3]]}.')
  unused = sorted(set(source) - set(loaded))
  logging.info('init_from: loaded %d of %d parameters; %d of the checkpoint\'s unused%s', len(loaded),
               len(named), len(unused), f' (e.g. {unused[:3]})' if unused else '')
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves), loaded
