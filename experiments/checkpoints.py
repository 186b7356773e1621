"""Orbax checkpoints: every K steps, at the end and on SIGTERM; resume from the newest good one.

Resume order: the workdir's newest checkpoint; if it cannot be read (partial or
corrupt), it is reported and the one before it is used; with none, from scratch.
A checkpoint written under a different sparsity setting is refused.
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


class SparsityMismatch(ValueError):
  """The checkpoint was written under another sparsity setting."""


class Checkpointer:
  """A thin layer over ``ocp.CheckpointManager`` with items ``state`` (pytree), ``data`` and ``meta`` (JSON)."""

  def __init__(self, directory: str, *, every: int, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self.every = max(int(every), 1)
    self._mngr = ocp.CheckpointManager(
        self.directory, item_names=('state', 'data', 'meta'),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: PyTree, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Saves at multiples of ``every`` (or when ``force``); returns whether it saved."""
    if not force and step % self.every:
      return False
    if step in self._mngr.all_steps():
      return False
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    return True

  def restore_latest(self, abstract_state: PyTree, meta: dict) -> tuple[PyTree, dict, dict] | None:
    """The newest readable checkpoint as ``(state, data_state, meta)``, or None when there is none.

    ``meta['sparsity']`` must equal the stored one, or ``SparsityMismatch`` is raised.
    """
    for step in reversed(self.steps()):
      try:
        stored_meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # pylint: disable=broad-except
        logging.error('checkpoint %d in %s is unreadable (%s: %s); trying the previous one.',
                      step, self.directory, type(e).__name__, e)
        continue
      _check_sparsity(stored_meta, meta, step, self.directory)
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.error('checkpoint %d in %s is corrupt or partial (%s: %s); trying the previous one.',
                      step, self.directory, type(e).__name__, str(e)[:500])
        continue
      logging.info('resumed from checkpoint %d in %s', step, self.directory)
      return out['state'], out['data'], stored_meta
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _check_sparsity(stored: dict, current: dict, step: int, directory: str) -> None:
  a, b = stored.get('sparsity'), current.get('sparsity')
  if a != b:
    diff = _diff(a or {}, b or {})
    raise SparsityMismatch(
        f'The checkpoint at step {step} in {directory} was trained with another sparsity setting '
        f'({diff}). Resume with the same config.sparsity, or use a new --workdir.')


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
