"""What a researcher sees: a progress line with ETA, metrics as JSON lines and TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard event files (no TensorFlow needed).

  Only process 0 writes.
  """

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:
        logging.warning('tensorboardX is not installed: metrics go to metrics.jsonl only.')

  def write(self, step: int, scalars: Mapping[str, Any]) -> dict[str, float]:
    out = {k: float(np.asarray(v)) for k, v in scalars.items()}
    if self.enabled:
      self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **out}) + '\n')
      if self._tb is not None:
        for k, v in out.items():
          self._tb.add_scalar(k, v, int(step))
    return out

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def is_diagnostics_step(step: int, every: int, total_steps: int) -> bool:
  """Whether the step that starts at ``step`` computes the diagnostics: every ``every`` steps and the last."""
  return bool(every) and (step % every == 0 or step + 1 == total_steps)


def count_diagnostics_steps(start: int, stop: int, every: int, total_steps: int) -> int:
  """How many of the steps ``start .. stop - 1`` are diagnostics steps (``is_diagnostics_step``)."""
  if not every or stop <= start:
    return 0
  n = (stop - 1) // every - (start - 1) // every  # Multiples of `every` in [start, stop).
  last = total_steps - 1
  return n + int(start <= last < stop and last % every != 0)


class Progress:
  """Steps/s and the ETA of the run, from smoothed times of ordinary and of diagnostics steps.

  ``update(step)`` is called after step ``step - 1`` ran; the steps since the last call are
  split into ordinary and diagnostics steps (``count_diagnostics_steps``), and each kind's
  time per step is an exponential moving average (weight ``smoothing`` on the newest
  interval). An interval of one kind gives that kind's time; a mixed one gives the
  diagnostics time once the ordinary time is known. The first interval of each kind holds
  its compilation and sets no time. ETA = ordinary steps left x ordinary time + diagnostics
  steps left x diagnostics time (the ordinary time until a diagnostics time is known).
  """

  def __init__(self, first_step: int, total_steps: int, *, diagnostics_every: int = 0,
               smoothing: float = 0.3, clock=None):
    self.total = total_steps
    self.every = diagnostics_every
    self.smoothing = smoothing
    self._clock = clock or time.perf_counter
    self._last_step, self._last_time = first_step, self._clock()
    self.step_time = math.nan   # Seconds per ordinary step.
    self.diag_time = math.nan   # Seconds per diagnostics step.
    self._seen = {'ordinary': False, 'diagnostics': False}  # A kind's first steps include compiling it.

  @property
  def steps_per_sec(self) -> float:
    return 1.0 / self.step_time if self.step_time > 0 else math.nan

  def pause(self, step: int) -> None:
    """Restarts the clock (after an eval or a checkpoint, which are not training time)."""
    self._last_step, self._last_time = step, self._clock()

  def eta(self, step: int) -> float:
    """Seconds left from ``step`` to the end (nan until an ordinary step time is known)."""
    if step >= self.total:
      return 0.0
    diag = count_diagnostics_steps(step, self.total, self.every, self.total)
    diag_time = self.diag_time if math.isfinite(self.diag_time) else self.step_time
    return (self.total - step - diag) * self.step_time + diag * diag_time

  def update(self, step: int) -> str:
    now = self._clock()
    self._record(self._last_step, step, now - self._last_time)
    self._last_step, self._last_time = step, now
    left = self.eta(step)
    return (f'step {step}/{self.total} ({100 * step / self.total:.1f}%) '
            f'{self.steps_per_sec:.2f} steps/s, ETA {_hms(left)}')

  def _record(self, start: int, stop: int, seconds: float) -> None:
    diag = count_diagnostics_steps(start, stop, self.every, self.total)
    ordinary = stop - start - diag
    if ordinary <= 0 and diag <= 0:
      return
    first = (ordinary and not self._seen['ordinary']) or (diag and not self._seen['diagnostics'])
    self._seen['ordinary'] |= bool(ordinary)
    self._seen['diagnostics'] |= bool(diag)
    if first:
      return
    if not diag:
      self.step_time = self._smooth(self.step_time, seconds / ordinary)
    elif not ordinary:
      self.diag_time = self._smooth(self.diag_time, seconds / diag)
    elif math.isfinite(self.step_time):
      self.diag_time = self._smooth(self.diag_time, max(seconds - ordinary * self.step_time, 0.0) / diag)

  def _smooth(self, old: float, new: float) -> float:
    return new if not math.isfinite(old) else (1 - self.smoothing) * old + self.smoothing * new


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def format_metrics(scalars: Mapping[str, float], keys: tuple[str, ...] = ()) -> str:
  keys = keys or tuple(sorted(scalars))
  return ', '.join(f'{k}={scalars[k]:.4g}' for k in keys if k in scalars)
