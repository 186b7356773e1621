"""T5 span corruption and packing on token ids, in NumPy (deterministic given a seed).

Span corruption (Raffel et al. 2020): about ``noise_density`` of the tokens, in spans of mean length
``mean_span_length``, are dropped from the inputs, each span replaced by one sentinel; the targets are
the sentinels each followed by its span. Both end with EOS. The sequence starts with a kept span and
ends with a noise span, as in T5. Sentinel ``i`` is ``vocab_size - 1 - i``: the model's vocabulary is
the SentencePiece model's plus ``num_extra_ids`` (T5: 100) sentinel ids on top.

Packing concatenates several examples into one row of fixed length per feature, with
``<feature>_segment_ids`` (1, 2, ...; 0 for padding) and ``<feature>_positions`` (restarting at 0 in
each segment), the layout T5 models use to keep packed examples from attending to one another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from experiments.data.defaults import NUM_EXTRA_IDS

PAD_ID, EOS_ID = 0, 1


def _lengths(num_tokens: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(number of noise tokens, number of noise spans) for a sequence of ``num_tokens`` tokens."""
  num_noise = int(round(num_tokens * noise_density))
  num_noise = min(max(num_noise, 1), num_tokens - 1)
  num_spans = max(int(round(num_noise / mean_span_length)), 1)
  return num_noise, num_spans


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
  """``parts`` positive integers summing to ``total``, uniformly among such compositions."""
  cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
  return np.diff(np.concatenate([[0], cuts, [total]]).astype(np.int64))


def noise_spans(num_tokens: int, rng: np.random.Generator, noise_density: float = 0.15,
                mean_span_length: float = 3.0) -> list[tuple[int, int]]:
  """The noise spans ``[(start, end), ...]`` (sorted, disjoint, non-adjacent) of a sequence."""
  if num_tokens < 2:
    raise ValueError(f'Span corruption needs at least 2 tokens, got {num_tokens}.')
  num_noise, num_spans = _lengths(num_tokens, noise_density, mean_span_length)
  num_spans = min(num_spans, num_noise, num_tokens - num_noise)
  noise = _random_partition(num_noise, num_spans, rng)
  keep = _random_partition(num_tokens - num_noise, num_spans, rng)
  spans, position = [], 0
  for kept, noisy in zip(keep, noise):
    position += int(kept)
    spans.append((position, position + int(noisy)))
    position += int(noisy)
  return spans


def noise_mask(num_tokens: int, rng: np.random.Generator, noise_density: float = 0.15,
               mean_span_length: float = 3.0) -> np.ndarray:
  """bool[num_tokens]: True where a token is noise."""
  mask = np.zeros(num_tokens, bool)
  for start, end in noise_spans(num_tokens, rng, noise_density, mean_span_length):
    mask[start:end] = True
  return mask


def sentinel_id(i: int, vocab_size: int) -> int:
  return vocab_size - 1 - i


def span_corrupt(tokens: Sequence[int] | np.ndarray, vocab_size: int,
                 seed: int | np.random.Generator, noise_density: float = 0.15,
                 mean_span_length: float = 3.0, num_extra_ids: int = NUM_EXTRA_IDS,
                 eos_id: int = EOS_ID) -> dict[str, np.ndarray]:
  """``{'inputs', 'targets'}`` (int32, each ending with EOS) for ``tokens`` (without EOS).

  ``vocab_size`` includes the ``num_extra_ids`` sentinels at its top; ``tokens`` must lie below them.
  ``seed`` (an int, or a Generator to draw from) makes the corruption deterministic.
  """
  tokens = np.asarray(tokens, np.int64)
  if tokens.ndim != 1:
    raise ValueError(f'tokens must be 1-D, got shape {tokens.shape}.')
  if tokens.size and tokens.max() >= vocab_size - num_extra_ids:
    raise ValueError(f'token {tokens.max()} collides with the sentinels (ids >= {vocab_size - num_extra_ids}).')
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  spans = noise_spans(tokens.size, rng, noise_density, mean_span_length)
  if len(spans) > num_extra_ids:
    raise ValueError(f'{len(spans)} noise spans need more than {num_extra_ids} sentinels; shorten the sequence.')
  inputs, targets, position = [], [], 0
  for i, (start, end) in enumerate(spans):
    sentinel = sentinel_id(i, vocab_size)
    inputs += [tokens[position:start], [sentinel]]
    targets += [[sentinel], tokens[start:end]]
    position = end
  inputs += [tokens[position:], [eos_id]]
  targets.append([eos_id])
  return {'inputs': np.concatenate(inputs).astype(np.int32),
          'targets': np.concatenate(targets).astype(np.int32)}


def corrupted_lengths(num_tokens: int, noise_density: float = 0.15,
                      mean_span_length: float = 3.0) -> tuple[int, int]:
  """(inputs length, targets length), EOS included, after corrupting ``num_tokens`` tokens."""
  num_noise, num_spans = _lengths(num_tokens, noise_density, mean_span_length)
  num_spans = min(num_spans, num_noise, num_tokens - num_noise)
  return num_tokens - num_noise + num_spans + 1, num_noise + num_spans + 1


def tokens_length_for(inputs_length: int, noise_density: float = 0.15,
                      mean_span_length: float = 3.0) -> tuple[int, int]:
  """The longest raw token count whose corrupted inputs fit ``inputs_length``, and its targets length."""
  n = 2
  while corrupted_lengths(n + 1, noise_density, mean_span_length)[0] <= inputs_length:
    n += 1
  return n, corrupted_lengths(n, noise_density, mean_span_length)[1]


def pad_or_truncate(ids: Sequence[int] | np.ndarray, length: int, pad_id: int = PAD_ID) -> np.ndarray:
  """int32[length]: ``ids`` cut to ``length`` or padded with ``pad_id``."""
  ids = np.asarray(ids, np.int32)[:length]
  return np.pad(ids, (0, length - ids.size), constant_values=pad_id)


def pad_batch(examples: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int],
              pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """One example a row: ``{feature: int32[len(examples), lengths[feature]]}``, truncated/padded."""
  return {key: np.stack([pad_or_truncate(ex[key], length, pad_id) for ex in examples]).astype(np.int32)
          for key, length in lengths.items()}


def pack(examples: Sequence[Mapping[str, np.ndarray]], lengths: Mapping[str, int],
         pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """Greedily packs examples (in order) into rows of ``lengths``; each is truncated to fit a row first.

  Returns, for each feature ``f``: ``f``, ``f_segment_ids`` and ``f_positions``, int32[rows, lengths[f]].
  A new row starts when the next example does not fit every feature of the current one.
  """
  keys = list(lengths)
  rows: list[list[dict[str, np.ndarray]]] = []
  used = {key: 0 for key in keys}
  for ex in examples:
    ex = {key: np.asarray(ex[key], np.int32)[:lengths[key]] for key in keys}
    if not rows or any(used[key] + ex[key].size > lengths[key] for key in keys):
      rows.append([])
      used = {key: 0 for key in keys}
    rows[-1].append(ex)
    for key in keys:
      used[key] += ex[key].size
  out = {}
  for key in keys:
    ids = np.full((len(rows), lengths[key]), pad_id, np.int32)
    segments = np.zeros_like(ids)
    positions = np.zeros_like(ids)
    for r, row in enumerate(rows):
      at = 0
      for s, ex in enumerate(row, start=1):
        n = ex[key].size
        ids[r, at:at + n] = ex[key]
        segments[r, at:at + n] = s
        positions[r, at:at + n] = np.arange(n)
        at += n
    out[key], out[f'{key}_segment_ids'], out[f'{key}_positions'] = ids, segments, positions
  return out
