"""T5 text tasks: the grain text pipelines, the T5 loss, decode metrics, and both tasks end to end."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import run_main_in_process
from test_text_data import write_synthetic_source
from experiments import optimizer as optimizer_lib
from experiments.data.text import pipeline
from experiments.data.text import span_corruption as sc
from experiments.tasks import text as text_task

PIECES = 36  # The synthetic corpus has 14 words: a small vocabulary (spm allows at most 38).


@pytest.fixture(scope='module')
def text_dirs(tmp_path_factory):
  """(data_dir, source_dir): a synthetic KJV/WEB source; datasets and vocab are built on first use."""
  source = tmp_path_factory.mktemp('bible_raw')
  write_synthetic_source(source)
  return str(tmp_path_factory.mktemp('text_tfds')), str(source)


def data_config(text_dirs, **kw):
  data_dir, source_dir = text_dirs
  return pipeline.default_config(data_dir=data_dir, source_dir=source_dir, vocab_pieces=PIECES,
                                 num_threads=1, **kw)


def restore_spans(inputs: np.ndarray, targets: np.ndarray, first_sentinel: int) -> list[int]:
  """Undoes span corruption: each sentinel in the inputs replaced by the tokens after it in the targets."""
  spans, current = {}, None
  for t in targets:
    if t == sc.EOS_ID or t == 0:
      break
    if t >= first_sentinel:
      current = int(t)
      spans[current] = []
    else:
      spans[current].append(int(t))
  out = []
  for t in inputs:
    if t == sc.EOS_ID or t == 0:
      break
    out += spans[int(t)] if t >= first_sentinel else [int(t)]
  return out


def test_span_corruption_batches_are_windows_of_the_text(text_dirs):
  cfg = data_config(text_dirs, inputs_length=24)
  inp = pipeline.make_input(cfg, split='train', train=True, global_batch_size=4, seed=3)
  inputs_len, targets_len = pipeline.lengths(cfg)
  raw_len, expected_targets = sc.tokens_length_for(24)
  assert (inp.inputs_length, inp.targets_length) == (inputs_len, targets_len) == (24, expected_targets)
  batch = next(inp.iterator(0))
  assert batch['inputs'].shape == (4, 24) and batch['targets'].shape == (4, targets_len)
  texts = [inp.source[i]['text'].decode() for i in range(len(inp.source))]
  tokenized = [inp.vocab.encode(t) for t in texts]
  pieces = inp.vocab.get_piece_size()
  assert pieces == PIECES
  for row_in, row_t in zip(batch['inputs'], batch['targets']):
    sentinels = row_in[row_in >= pieces]
    assert len(sentinels) and list(sentinels) == list(range(pieces + 99, pieces + 99 - len(sentinels), -1))
    window = restore_spans(row_in, row_t, pieces)
    assert len(window) == raw_len  # Paragraphs are longer than a window here.
    # The window is a contiguous slice of one paragraph's tokens.
    assert any(any(ids[s:s + raw_len] == window for s in range(len(ids) - raw_len + 1)) for ids in tokenized)


def test_text_iterator_resumes_exactly_and_depends_on_the_seed(text_dirs):
  cfg = data_config(text_dirs, inputs_length=24)
  inp = pipeline.make_input(cfg, split='train', train=True, global_batch_size=4, seed=0)
  it = inp.iterator(0)
  batches = [next(it) for _ in range(6)]
  state = json.loads(json.dumps(it.get_state()))
  resumed = inp.iterator(0)
  resumed.set_state({**state, 'step': 4})
  for want in batches[4:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  other = next(pipeline.make_input(cfg, split='train', train=True, global_batch_size=4, seed=1).iterator(0))
  assert not np.array_equal(other['inputs'], batches[0]['inputs'])
  # Two hosts together read exactly the global batch.
  halves = [next(pipeline.make_input(cfg, split='train', train=True, global_batch_size=4, seed=0,
                                     process_index=i, process_count=2).iterator(0)) for i in range(2)]
  assert np.array_equal(np.concatenate([h['inputs'] for h in halves]), batches[0]['inputs'])


def test_seq2seq_batches_decode_to_the_pairs_and_eval_counts_each_once(text_dirs):
  cfg = data_config(text_dirs, name='nm_bible_pairs', objective='seq2seq', inputs_length=128,
                    targets_length=128, source_prefix='said ')  # Prefix in the synthetic vocabulary.
  ev = pipeline.make_input(cfg, split='train', train=False, global_batch_size=64, seed=0)
  seen = []
  for batch in ev.iterator(0):
    for inputs, targets, keep, index in zip(batch['inputs'], batch['targets'], batch['mask'], batch['index']):
      if not keep:
        continue
      seen.append(int(index))
      example = ev.source[int(index)]
      assert ev.decode(inputs) == 'said ' + example['source'].decode()
      assert ev.decode(targets) == example['target'].decode() == ev.reference(index)
      assert inputs[list(inputs).index(sc.EOS_ID)] == sc.EOS_ID
  assert sorted(seen) == list(range(ev.num_examples))


def test_bad_text_configs_fail_with_what_to_do(text_dirs):
  cfg = data_config(text_dirs, inputs_length=24)
  with pytest.raises(ValueError, match='model.vocab_size=100 cannot hold .* at least 136'):
    pipeline.make_input(cfg, split='train', train=True, global_batch_size=4, seed=0, model_vocab_size=100)
  with pytest.raises(ValueError, match='data.vocab is not set'):
    pipeline.load_vocab(pipeline.default_config(name='c4/en:3.1.0'))
  with pytest.raises(ValueError, match='Unknown text data config fields'):
    pipeline.make_input({'nme': 'x'}, split='train', train=True, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match='objective'):
    pipeline.lengths({'objective': 'mlm'})
  with pytest.raises(FileNotFoundError, match='not prepared'):
    pipeline.open_source('c4/en:3.1.0', split='train', data_dir=text_dirs[0], source_dir=None)
  assert pipeline.padded_vocab_size(cfg, 8000) == 8192 and pipeline.padded_vocab_size(cfg, 32000) == 32128


def test_t5_loss_matches_a_numpy_reference():
  config = ml_collections.ConfigDict(dict(model=dict(name='t5', variant='tiny', vocab_size=40, dropout_rate=0.0,
                                                     kwargs={}), z_loss=1e-3))
  model = text_task.build_model(config)
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 40, (3, 7)).astype(np.int32)
  targets = rng.integers(2, 40, (3, 5)).astype(np.int32)
  targets[0, 3:] = 0  # Padding.
  targets[1, 4] = 1
  mask = np.array([True, True, False])
  batch = {'inputs': inputs, 'targets': targets, 'mask': mask}
  params = text_task.init(model, jax.random.key(0), batch)
  mean, sums, count = text_task.loss_fn(model, params, batch, jax.random.key(1), False, config)
  dec_in = np.concatenate([np.zeros((3, 1), np.int32), targets[:, :-1]], axis=1)
  logits = np.asarray(model.apply({'params': params}, inputs, dec_in, train=False,
                                  decoder_target_mask=targets > 0), np.float64)
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  log_p = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - log_z
  w = (targets > 0) & mask[:, None]
  assert count == w.sum() == 3 + 5
  np.testing.assert_allclose(sums['loss'], -(log_p * w).sum(), rtol=1e-5)
  np.testing.assert_allclose(mean, ((-log_p + 1e-3 * log_z ** 2) * w).sum() / w.sum(), rtol=1e-5)
  assert sums['accuracy'] == ((logits.argmax(-1) == targets) & w).sum()
  assert text_task.derived_metrics({'loss': 2.0})['perplexity'] == pytest.approx(np.e ** 2)


@pytest.mark.parametrize('answer,bleu,exact', [('target', 100.0, 100.0), ('empty', 0.0, 0.0)])
def test_decode_metrics_score_every_eval_example_once(text_dirs, monkeypatch, answer, bleu, exact):
  """A stand-in decoder that returns each target (or nothing): BLEU and exact match 100 (or 0)."""
  cfg = data_config(text_dirs, name='nm_bible_pairs', objective='seq2seq', inputs_length=128,
                    targets_length=128)  # No verse truncated.
  ev = pipeline.make_input(cfg, split='validation', train=False, global_batch_size=16, seed=0)
  by_input = {}
  for batch in ev.iterator(0):
    for inputs, targets in zip(batch['inputs'], batch['targets']):
      by_input[inputs.tobytes()] = targets if answer == 'target' else np.zeros_like(targets)

  def fake_decode(model, params, encoder_tokens, max_len):
    del model, params
    assert max_len == 128
    return jnp.asarray(np.stack([by_input[np.asarray(row).tobytes()] for row in np.asarray(encoder_tokens)]))

  monkeypatch.setattr(text_task.models, 'greedy_decode', fake_decode)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'fsdp'))
  s = type('S', (), {'mesh': mesh, 'model': None, 'config': ml_collections.ConfigDict({'eval_steps': None})})()
  out = text_task.decode_metrics(s, None, ev)
  assert out == pytest.approx({'bleu': bleu, 'exact_match': exact})


def test_adafactor_and_rsqrt_schedule():
  import nmsparse  # pylint: disable=g-import-not-at-top
  params = {'w': jnp.ones((256, 256)), 'b': jnp.ones((4,))}
  rules = [('w', nmsparse.NMSpec(1, 4))]
  cfg = ml_collections.ConfigDict(dict(name='adafactor', lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
                                       clip=0.0, schedule='rsqrt', warmup_steps=100, base_batch=None))
  sp = nmsparse.make_sparsifier(nmsparse.recipe_config('mdgf'), rules, params, 1000)
  tx, lr = optimizer_lib.make_optimizer(cfg, sp, batch_size=8, total_steps=1000, steps_per_epoch=10)
  for step, want in ((0, 1e-2), (50, 1e-2), (100, 1e-2), (400, 1e-2 * 0.5), (10000, 1e-3)):
    assert float(lr(step)) == pytest.approx(want)
  state = tx.init(params)
  assert any('v_row' in str(type(s)) or hasattr(s, 'v_row') for s in jax.tree.leaves(
      state, is_leaf=lambda x: hasattr(x, 'v_row')))  # Factored second moments.
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  sp_step = nmsparse.make_sparsifier(nmsparse.recipe_config('step'), rules, params, 1000)
  with pytest.raises(ValueError, match='adamw'):
    optimizer_lib.make_optimizer(cfg, sp_step, batch_size=8, total_steps=1000, steps_per_epoch=10)


# Each task compiles one train step: XLA's CPU compile of a T5 step is slow, twice as slow with
# the microbatch gradients of the diagnostics and again with dropout's random bits. The translation
# task (dropout 0.1 in its runlocal config) runs the plain step only; the span-corruption task
# (same text loss and model, no dropout) makes every step a diagnostics step, which is the plain
# step plus the diagnostics.
@pytest.mark.parametrize('config,metric,extra', [
    ('t5_english_text.py', 'eval_perplexity', ('--config.diagnostics_every_steps=1',)),
    ('t5_bible.py', 'eval_bleu', ('--config.diagnostics_every_steps=0',)),
])
def test_t5_tasks_train_end_to_end(text_dirs, tmp_path, monkeypatch, config, metric, extra):
  """Both T5 tasks through the entry point's flags (in process): 6 steps train, evaluate (BLEU and
  exact match for the translation task), write metrics and exact 1:8 groups; at the end every
  metric of the model evaluated equals that of the hard N:M model (the run is over).

  The gradient-noise diagnostics (span corruption) come from 4 microbatch gradients per
  diagnostics step: the microbatches hold different examples, so their gradients differ
  (noise > 0) and their mean is not zero (signal > 0) on the kept weights; on the pruned weights
  too once the sparse phase has begun (MDGF and the per-step fine-tune send gradients to pruned
  weights), while in the dense warm-up nothing is pruned (signal = noise = ratio = 0). The
  logged ratio is noise / signal. Microbatches that were one slice repeated, masks left out, or
  a gradient dropped would break one of these.
  """
  data_dir, source_dir = text_dirs
  work = tmp_path / 'work'
  returned = run_main_in_process(
      [f'--config=configs/{config}:runlocal', f'--workdir={work}', f'--config.data.data_dir={data_dir}',
       f'--config.data.source_dir={source_dir}', f'--config.data.vocab_pieces={PIECES}',
       '--config.data.num_threads=1', *extra], monkeypatch)
  final = json.load(open(work / 'final_metrics.json'))
  assert {k: v for k, v in final.items() if k != 'environment'} == returned
  assert final['step'] == 6 and final['nm_valid'] == 1.0
  assert final['sparsity'] == pytest.approx(0.875)
  assert np.isfinite(final[metric]) and final['eval_tokens'] > 0
  # The run is over: the model evaluated is the hard N:M model (docs/method.md §2).
  assert {k: v for k, v in final.items() if k.startswith('eval_') and k != 'eval_tokens'} == {
      'eval_' + k[5:]: v for k, v in final.items() if k.startswith('hard_')}
  rows = [json.loads(line) for line in open(work / 'metrics.jsonl')]
  assert any('eval/loss' in r for r in rows)
  if config == 't5_bible.py':
    assert 0.0 <= final['eval_bleu'] <= 100.0 and 0.0 <= final['eval_exact_match'] <= 100.0  # In %.
  noise = [r for r in rows if 'grad/pruned_grad_noise_ratio' in r]
  if config == 't5_bible.py':  # No diagnostics step.
    assert not noise and [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6]
    return
  # Every step: dense warm-up (10 % of 6 steps: the first), sparse phase, fine-tune (the last).
  assert [r['sparsity/phase'] for r in noise] == [0, 1, 1, 1, 1, 2]
  for r in noise:
    for part in ('kept', 'pruned'):
      signal, spread, ratio = (r[f'grad/{part}_grad_{k}'] for k in ('signal', 'noise', 'noise_ratio'))
      if part == 'pruned' and r['sparsity/phase'] == 0:  # Dense warm-up: no pruned weight.
        assert signal == spread == ratio == 0.0, r
      else:
        assert signal > 0 and spread > 0, (r['step'], part, signal, spread)
        assert ratio == pytest.approx(spread / signal, rel=1e-4)
