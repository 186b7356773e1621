"""Tasks: what a model family brings to the shared train loop (model, data, loss, metrics)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Task:
  """The per-family pieces; the train loop in ``experiments.train`` is shared by all.

  - ``build_model(config) -> nn.Module``
  - ``make_input(config, *, split, train, global_batch_size, seed, process_index, process_count)``
    -> an input with ``num_examples``, ``steps_per_epoch`` and ``iterator(start_step)``
  - ``dummy_batch(config, batch_size) -> dict`` of arrays with a batch's shapes (for init/lowering)
  - ``init(model, rng, batch) -> params``
  - ``loss_fn(model, params, batch, rng, train, config) -> (mean loss, {metric: sum}, count)``
  - ``preset_kwargs``: axes of this family's kernels for ``nmsparse.preset``
  - ``eval_metric``: the metric the results tables report (higher is better)
  - ``derived_metrics(metrics) -> metrics``: optional, adds metrics computed from the
    averaged ones (e.g. perplexity from the loss)
  - ``decode_metrics(setup, params, eval_input) -> {metric: value}``: optional, metrics
    of generated outputs (e.g. BLEU of greedy decodes), computed after the summed ones
  """

  name: str
  build_model: Callable[..., Any]
  make_input: Callable[..., Any]
  dummy_batch: Callable[..., dict]
  init: Callable[..., Any]
  loss_fn: Callable[..., Any]
  preset_kwargs: dict = dataclasses.field(default_factory=dict)
  eval_metric: str = 'accuracy'
  count_unit: str = 'examples'  # What ``loss_fn``'s count counts (the text tasks: target tokens).
  derived_metrics: Callable[[dict], dict] | None = None
  decode_metrics: Callable[..., dict] | None = None


NAMES = ('classification', 'span_corruption', 'seq2seq')


def get_task(name: str) -> Task:
  """The task registered under ``name``."""
  if name == 'classification':
    from experiments.tasks import classification  # pylint: disable=g-import-not-at-top
    return classification.TASK
  if name in ('span_corruption', 'seq2seq'):
    from experiments.tasks import text  # pylint: disable=g-import-not-at-top
    return text.SPAN_CORRUPTION if name == 'span_corruption' else text.SEQ2SEQ
  raise ValueError(f'Unknown task {name!r}; known: {list(NAMES)}.')
