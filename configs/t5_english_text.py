r"""T5 span-corruption pretraining on offline English (KJV + WEB from Debian packages), on 2 CPU cores.

    python -m experiments.main --config=configs/t5_english_text.py --workdir=workdirs/t5_text

Arguments (``:recipe=srste,nm=1:16,layers=all,runlocal``):
  variant   T5 variant (default ``mini``: d_model 128, 3 + 3 layers, 4 heads, d_ff 512)
  recipe    nmsparse recipe (dense, oneshot, hard, ste, srste, mdgf, sdgf, mdgf_sdgf, step)
  nm        N:M pattern (default ``1:8``); layers: mlp (wi_0, wi_1, wo) | mlp_qkv | all (+ o)
  steps     training length; runlocal: a few steps of the tiny model (smoke test)

Data: ``nm_english_text`` (14,445 train paragraphs), built on first use from the Debian
packages (``apt-get install -y bible-kjv sword-text-web diatheke``), with an 8k-piece
SentencePiece vocabulary trained on its train split; 100 sentinels on top (model vocab 8192).
Inputs 128 tokens (142 raw tokens, 15 % noise in spans of mean 3), targets 33.
Metrics: token loss, token accuracy, perplexity on the validation paragraphs.
Expected wall time and metrics: README results table.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='mini', recipe='mdgf', nm='1:8', layers='mlp', decay='exponential',
                       structure='stepwise', steps=2000, seed=0, runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'span_corruption'
  c.model = ml_collections.ConfigDict(dict(name='t5', variant=a.variant, vocab_size=8192,
                                           dropout_rate=0.0, kwargs=dict()))
  c.data = defaults.text(name='nm_english_text', objective='span_corruption', inputs_length=128)
  c.train_split, c.eval_split = 'train', 'validation'
  c.z_loss = 1e-4
  c.batch_size = 32
  c.eval_batch_size = 184
  common.run_defaults(c)
  c.seed = a.seed
  c.total_steps = a.steps
  # MDGF's decay is relative to the sparse phase (80 % of the run): exponential a(t) falls to
  # 0.041 by its end, at any --config.total_steps or steps=.
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.1, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.final': 0.041,
                                  'structure.kind': a.structure})
  c.optimizer = common.optimizer(2e-3, wd=1e-4, clip=1.0, warmup_steps=100)
  c.log_every_steps = c.diagnostics_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  if a.runlocal:
    c.model.variant = 'tiny'
    c.data.inputs_length = 32
    c.total_steps = 6
    c.batch_size = 8
    c.eval_batch_size = 64
    c.log_every_steps = c.diagnostics_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 3
    c.optimizer.warmup_steps = 2
  return c
