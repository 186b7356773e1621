"""Orbax checkpoints: every K steps, at the end and on SIGTERM; resume from the newest readable one.

Nothing on disk is created, cleaned or changed before the first save, so a refused
resume leaves the workdir as it was.

Resume order: the workdir's newest checkpoint; if its files cannot be read (missing,
partial or corrupt), the error is logged and the one before it is tried. A readable
checkpoint of another run is refused before anything is restored (``CannotResume``):
another sparsity setting, another run length, or another state tree (parameter paths,
shapes or dtypes). Checkpoints that exist but none of which can be read are refused too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any

# Tensorstore reports a missing, truncated or corrupt array file as a ValueError with one of these
# status prefixes (found by corrupting checkpoints: tests/test_checkpoints.py).
_UNREADABLE_STATUS = ('DATA_LOSS:', 'NOT_FOUND:', 'OUT_OF_RANGE:')
_MAX_LISTED = 10


class CannotResume(ValueError):
  """The workdir's checkpoints cannot continue this run: resume with their config or use a new --workdir."""


class SparsityMismatch(CannotResume):
  """The checkpoint was written under another sparsity setting."""


class RunLengthMismatch(CannotResume):
  """The checkpoint was written for another run length (total_steps or steps_per_epoch)."""


class StructureMismatch(CannotResume):
  """The checkpoint's state tree (paths, shapes, dtypes) differs from the model's."""


class NoReadableCheckpoint(CannotResume):
  """Checkpoints exist but none can be read."""


class _Unreadable(Exception):
  """A checkpoint's files are missing, partial or corrupt (internal: triggers the fallback)."""


def is_unreadable(error: Exception) -> bool:
  """Whether an error of an Orbax read means that the checkpoint's files are missing, partial or corrupt.

  ``FileNotFoundError`` (a metadata file), ``KeyError`` (an item's folder), a JSON decode
  error, or tensorstore's ``ValueError`` with a data-loss / not-found / out-of-range status.
  """
  if isinstance(error, (FileNotFoundError, KeyError, json.JSONDecodeError)):
    return True
  return isinstance(error, ValueError) and str(error).startswith(_UNREADABLE_STATUS)


def _read(fn, what: str):
  try:
    out = fn()
  except (FileNotFoundError, KeyError, ValueError) as e:
    if not is_unreadable(e):
      raise
    raise _Unreadable(f'{what}: {type(e).__name__}: {str(e)[:300]}') from e
  if out is None:
    raise _Unreadable(f'{what}: no metadata')
  return out


def _handlers() -> dict:
  return dict(state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
              meta=ocp.JsonCheckpointHandler())


class Checkpointer:
  """``ocp.CheckpointManager`` with items ``state`` (pytree), ``data`` and ``meta`` (JSON).

  Read-only until the first ``save``, which creates the folder and cleans Orbax's leftovers.
  """

  def __init__(self, directory: str, *, every: int, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.every = max(int(every), 1)
    self.keep = keep
    self._unreadable: set[int] = set()
    self._writing = False
    self._mngr = ocp.CheckpointManager(
        self.directory, item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False))

  def steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: PyTree, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Saves at multiples of ``every`` (or when ``force``); returns whether it saved.

    A step that exists is replaced only if it was found unreadable on resume.
    """
    if not force and step % self.every:
      return False
    if not self._writing:
      self._mngr.close()
      self._mngr = ocp.CheckpointManager(
          self.directory, item_handlers=_handlers(),
          options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True,
                                               cleanup_tmp_directories=True))
      self._writing = True
    if step in self._mngr.all_steps():
      if step not in self._unreadable:
        raise FileExistsError(f'checkpoint {step} already exists in {self.directory}; is another run '
                              'writing to this workdir?')
      logging.warning('replacing the unreadable checkpoint %d in %s.', step, self.directory)
      self._mngr.delete(step)
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    return True

  def read_meta(self, step: int) -> dict:
    """The ``meta`` item of ``step``; ``_Unreadable`` if its files are missing or corrupt."""
    return _read(lambda: self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'],
                 'meta')

  def latest_meta(self) -> tuple[int, dict] | None:
    """``(step, meta)`` of the newest checkpoint whose meta can be read; None without checkpoints."""
    steps = self.steps()
    for step in reversed(steps):
      try:
        return step, self.read_meta(step)
      except _Unreadable as e:
        self._log_unreadable(step, e)
    if steps:
      raise self._none_readable(steps)
    return None

  def restore_latest(self, abstract_state: PyTree, meta: dict) -> tuple[PyTree, dict, dict] | None:
    """The newest readable checkpoint as ``(state, data_state, meta)``, or None when there is none.

    Each candidate's meta (``check_meta``) and state tree (``tree_differences`` against
    ``abstract_state``) are checked before it is restored: a mismatch raises ``CannotResume``.
    """
    steps = self.steps()
    for step in reversed(steps):
      try:
        stored_meta = self.read_meta(step)
        check_meta(stored_meta, meta, step, self.directory)
        tree = _read(lambda: self._mngr.metadata(step).item_metadata['state'], 'state metadata')
        check_tree(tree, abstract_state, step, self.directory)
        out = _read(lambda: self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())), 'state')
      except _Unreadable as e:
        self._log_unreadable(step, e)
        continue
      logging.info('resumed from checkpoint %d in %s', step, self.directory)
      return out['state'], out['data'], stored_meta
    if steps:
      raise self._none_readable(steps)
    return None

  def _log_unreadable(self, step: int, error: Exception) -> None:
    self._unreadable.add(step)
    logging.error('checkpoint %d in %s is unreadable (corrupt or partial: %s); trying the previous one.',
                  step, self.directory, error)

  def _none_readable(self, steps: list[int]) -> NoReadableCheckpoint:
    return NoReadableCheckpoint(
        f'None of the checkpoints {steps} in {self.directory} can be read (see the errors above); '
        'move that folder away to start from scratch, or use a new --workdir.')

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


# ----------------------------------------------------------------------------- checks

def check_meta(stored: dict, current: dict, step: int, directory: str) -> None:
  """Refuses a checkpoint of another sparsity setting or run length (``SparsityMismatch``, ``RunLengthMismatch``)."""
  a, b = stored.get('sparsity'), current.get('sparsity')
  if a != b:
    raise SparsityMismatch(
        f'The checkpoint at step {step} in {directory} was trained with another sparsity setting '
        f'({_diff(a or {}, b or {})}). Resume with the same config.sparsity, or use a new --workdir.')
  for key in ('total_steps', 'steps_per_epoch'):
    if key not in current:
      continue
    if key not in stored:
      logging.warning('the checkpoint at step %d has no %s in its meta: not compared.', step, key)
    elif stored[key] != current[key]:
      raise RunLengthMismatch(
          f'The checkpoint at step {step} in {directory} was written for {key}={stored[key]}, this config '
          f'gives {key}={current[key]}; every sparsity schedule is derived from the run length. Use the '
          f'checkpoint\'s run length (e.g. --config.total_steps={stored.get("total_steps")}), or train in a new '
          '--workdir.')


def flat_shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'a/b/kernel': (shape, dtype name)}`` for every array leaf, in Orbax's naming of a saved tree."""
  flat = ocp.tree.to_flat_dict(ocp.tree.serialize_tree(tree, keep_empty_nodes=True), sep='/')
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in flat.items()
          if hasattr(v, 'shape') and hasattr(v, 'dtype')}


def tree_differences(stored: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Every path missing from ``stored``, unexpected in it, or of another shape/dtype: one line each, params first."""
  out = {p: f'{p}: missing from the checkpoint (model {_sd(expected[p])})' for p in set(expected) - set(stored)}
  out |= {p: f'{p}: in the checkpoint ({_sd(stored[p])}) but not in the model' for p in set(stored) - set(expected)}
  out |= {p: f'{p}: checkpoint {_sd(stored[p])} vs model {_sd(expected[p])}'
          for p in set(stored) & set(expected) if stored[p] != expected[p]}
  return [out[p] for p in sorted(out, key=lambda p: (not p.startswith('params/'), p))]


def check_tree(stored_tree: PyTree, abstract_state: PyTree, step: int, directory: str) -> None:
  """Raises ``StructureMismatch`` naming the differing parameters when the stored tree is not the model's."""
  diffs = tree_differences(flat_shapes(stored_tree), flat_shapes(abstract_state))
  if diffs:
    more = f'; and {len(diffs) - _MAX_LISTED} more' if len(diffs) > _MAX_LISTED else ''
    raise StructureMismatch(
        f'The checkpoint at step {step} in {directory} does not fit the model ({len(diffs)} differences: '
        f'{"; ".join(diffs[:_MAX_LISTED])}{more}). Resume with the config that wrote it (the workdir\'s '
        'config.json), or use a new --workdir.')


def _sd(shape_dtype: tuple) -> str:
  shape, dtype = shape_dtype
  return f'{dtype}{list(shape)}'


def _diff(a: dict, b: dict, prefix: str = '') -> str:
  out = []
  for k in sorted(set(a) | set(b)):
    x, y = a.get(k), b.get(k)
    if isinstance(x, dict) and isinstance(y, dict):
      sub = _diff(x, y, f'{prefix}{k}.')
      if sub:
        out.append(sub)
    elif x != y:
      out.append(f'{prefix}{k}: checkpoint {json.dumps(x)} vs now {json.dumps(y)}')
  return '; '.join(out)


class PreemptionFlag:
  """Set by SIGTERM (and SIGINT) so the loop saves and exits cleanly at the next step."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    logging.warning('received signal %d: saving a checkpoint and stopping.', signum)
    self._event.set()

  def is_set(self, step: int | None = None) -> bool:
    if self._event.is_set():
      return True
    if step is not None and jax.process_count() > 1:
      return ocp.utils.reached_preemption(step) if hasattr(ocp, 'utils') else False
    return False

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
