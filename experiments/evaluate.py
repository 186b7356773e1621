"""Evaluate the newest checkpoint with the masks and decay of its own step, and export it N:M-compressed.

    python -m experiments.main --mode=evaluate --config=<same config> --workdir=<run dir>

The run length (``total_steps``, ``steps_per_epoch``), from which every sparsity schedule
is derived, is read from the checkpoint, not from the train split; a config that gives
another run length or sparsity setting is refused. Writes ``export/model_nm.npz`` (kept
values + packed in-group indices for every sparsified kernel, dense leaves as they are),
``export/size_report.json`` and ``eval_metrics.json`` (with the ``environment``) into the workdir.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import ml_collections
import numpy as np

import nmsparse
from experiments import checkpoints
from experiments import environment
from experiments import train as train_lib
from experiments.tasks import get_task


def evaluate_and_export(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Restores the newest good checkpoint of ``workdir``, evaluates it and exports the hard N:M model."""
  task = get_task(config.task)
  directory = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoints.Checkpointer(directory, every=1)
  try:
    latest = ckpt.latest_meta()
    if latest is None:
      raise FileNotFoundError(f'No checkpoint in {directory}: train first with --mode=train.')
    step, stored = latest
    if 'steps_per_epoch' not in stored:
      raise checkpoints.CannotResume(
          f'The checkpoint at step {step} in {directory} does not record steps_per_epoch (written by an '
          'older nmsparse), so its run length and schedules cannot be rebuilt; evaluate it with the '
          'nmsparse commit that trained it.')
    s = train_lib.setup(config, steps_per_epoch=int(stored['steps_per_epoch']))
    restored = ckpt.restore_latest(train_lib.abstract_state(s), train_lib.run_meta(s))
  finally:
    ckpt.close()
  state = restored[0]
  eval_input = train_lib.make_input(config, task, train=False)
  metrics = train_lib.final_evaluation(s, state, eval_input)
  hard = jax.device_get(jax.jit(s.sp.hard_params)(state.params, state.sparsity, state.step,
                                                  state.opt_state))
  specs = s.sp.specs
  nmsparse.validate(hard, specs)
  compressed = nmsparse.compress(hard, specs)
  size = nmsparse.size_report(hard, specs)
  out_dir = os.path.join(workdir, 'export')
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    _save_npz(os.path.join(out_dir, 'model_nm.npz'), compressed)
    with open(os.path.join(out_dir, 'size_report.json'), 'w') as f:
      json.dump(_jsonable(size), f, indent=2, sort_keys=True)
    with open(os.path.join(workdir, 'eval_metrics.json'), 'w') as f:
      json.dump(metrics | {'environment': environment.describe()}, f, indent=2, sort_keys=True)
  metrics['compressed_ratio'] = float(size['ratio'])
  logging.info('evaluated step %d: %s; export %s', int(metrics['step']), metrics, out_dir)
  return metrics


def _save_npz(path: str, compressed) -> None:
  arrays = {}
  for key, leaf in nmsparse.rules.named_leaves(compressed):
    if isinstance(leaf, nmsparse.CompressedKernel):
      arrays[f'{key}.values'] = np.asarray(leaf.values)
      arrays[f'{key}.indices'] = np.asarray(leaf.indices)
      arrays[f'{key}.meta'] = np.frombuffer(json.dumps(dict(
          shape=list(leaf.shape), dtype=str(leaf.dtype), n=leaf.n, m=leaf.m, axes=list(leaf.axes),
          encoding=leaf.encoding, groups_per_word=leaf.groups_per_word,
          bits_per_word=leaf.bits_per_word)).encode(), np.uint8)
    else:
      arrays[key] = np.asarray(leaf)
  np.savez(path, **arrays)


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return x
