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


class Progress:
  """Steps/s over the last interval and the ETA of the run."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self._last_step, self._last_time = first_step, time.perf_counter()
    self.steps_per_sec = math.nan
    self._first = True  # The first interval includes compilation: it sets no rate.

  def pause(self, step: int) -> None:
    """Restarts the rate clock (after an eval or a checkpoint, which are not training time)."""
    self._last_step, self._last_time = step, time.perf_counter()

  def update(self, step: int) -> str:
    now = time.perf_counter()
    if self._first:
      self._first = False
    elif step > self._last_step:
      self.steps_per_sec = (step - self._last_step) / (now - self._last_time)
    self._last_step, self._last_time = step, now
    left = (self.total - step) / self.steps_per_sec if self.steps_per_sec > 0 else math.nan
    return (f'step {step}/{self.total} ({100 * step / self.total:.1f}%) '
            f'{self.steps_per_sec:.2f} steps/s, ETA {_hms(left)}')


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  s = int(seconds)
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def format_metrics(scalars: Mapping[str, float], keys: tuple[str, ...] = ()) -> str:
  keys = keys or tuple(sorted(scalars))
  return ', '.join(f'{k}={scalars[k]:.4g}' for k in keys if k in scalars)
