r"""T5 sequence-to-sequence on King James -> World English Bible verse pairs (offline), on 2 CPU cores.

    python -m experiments.main --config=configs/t5_bible.py --workdir=workdirs/t5_bible

Archaic to modern English, verse by verse (31,095 pairs; 98/1/1 % train/validation/test by
a hash of the verse reference). Arguments as in t5_english_text.py. Inputs and targets 80
tokens (the longest verse is 79 with the 8k vocabulary). Metrics: token loss, accuracy and
perplexity, and on greedy decodes of the validation verses (a jitted while loop) corpus BLEU
(sacrebleu) and exact match. For scale: copying the KJV verse unchanged scores BLEU 43.3
(0.9 % exact) on the validation split.
Fine-tuning a span-corruption model (same variant and vocabulary) instead of training from
scratch: ``--config=configs/t5_bible.py:init_from=workdirs/t5_text`` loads that run's newest
checkpoint's params (``config.init_from``: experiments/init_from.py).
Expected wall time and metrics: README results table.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='mini', recipe='mdgf', nm='1:8', layers='mlp', decay='exponential',
                       structure='stepwise', steps=3000, seed=0, init_from='', runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'seq2seq'
  c.model = ml_collections.ConfigDict(dict(name='t5', variant=a.variant, vocab_size=8192,
                                           dropout_rate=0.1, kwargs=dict()))
  c.data = defaults.text(name='nm_bible_pairs', objective='seq2seq', inputs_length=80,
                                   targets_length=80)
  c.train_split, c.eval_split = 'train', 'validation'
  c.z_loss = 1e-4
  c.batch_size = 32
  c.eval_batch_size = 166
  c.decode_eval = True  # BLEU and exact match from greedy decodes at every eval.
  common.run_defaults(c)
  c.seed = a.seed
  c.init_from.path = a.init_from or None
  c.total_steps = a.steps
  # MDGF's decay is relative to the sparse phase (80 % of the run): exponential a(t) falls to
  # 0.008 by its end, at any --config.total_steps or steps=.
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.1, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.final': 0.008,
                                  'structure.kind': a.structure})
  c.optimizer = common.optimizer(2e-3, wd=1e-4, clip=1.0, warmup_steps=100)
  c.log_every_steps = c.diagnostics_every_steps = 100
  c.eval_every_steps = 1500
  c.checkpoint_every_steps = 500
  if a.runlocal:
    c.model.variant = 'tiny'
    c.data.inputs_length = c.data.targets_length = 24
    c.total_steps = 6
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every_steps = c.diagnostics_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 3
    c.optimizer.warmup_steps = 2
  return c
