r"""T5.1.1-Base span-corruption pretraining on C4, mirroring T5X's pretraining setup, N:M sparse.

    python -m experiments.main --config=configs/t5_c4.py:recipe=mdgf,nm=1:16,layers=all \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
        --config.data.vocab=gs://BUCKET/vocabs/cc_all.32000/sentencepiece.model \
        --workdir=gs://BUCKET/runs/t5_base_mdgf_1x16

Hardware (measured ahead of time, ``results/tpu_plan.md``): fits a v4-32, data parallel, 5.08 GB
of a device's 17.18 GB (70 % headroom); the train step's roofline is 113 ms (memory-bound with 8
sequences per device), so 100k steps take at least 3.1 h, 50 chip-hours (v5e-32: 5.02 GB of 16,
93 ms, 2.6 h, 83 chip-hours). On Cloud TPU set
NMSPARSE_DISTRIBUTED=1.

T5X (t5_1_1/base.gin + runs/pretrain.gin, c4_v220_span_corruption): inputs 512 and targets 114
tokens (568 raw tokens, 15 % noise, mean span 3), batch 256, Adafactor (decay rate 0.8,
update clipping 1.0, parameter-scale updates), learning rate 0.01 * rsqrt decay after 10k
warm-up steps, dropout 0, z-loss 1e-4, bfloat16 activations, the 32k T5 vocabulary + 100
sentinels (model vocab 32128). Differences: T5X packs several documents per row; here each
row is one random 568-token window of a document (the model has no segment ids). STEP
(Adam-aware) switches the optimizer to AdamW. ``depth=2`` keeps the widths with 2 encoder and
2 decoder layers: a probe that compiles in 2 minutes (``results/tpu_plan.md``, Findings). Needs ``c4/en:3.1.0`` prepared by tfds in
array_record format under ``data_dir`` and the SentencePiece model at ``data.vocab``.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='base', recipe='mdgf', nm='1:16', layers='all', decay='exponential',
                       structure='stepwise', steps=100_000, batch=256, seed=0, depth=0, runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'span_corruption'
  c.model = ml_collections.ConfigDict(dict(name='t5', variant=a.variant, vocab_size=32128,
                                           dropout_rate=0.0, kwargs=dict(dtype='bfloat16')))
  if a.depth:  # A probe: the variant's widths with `depth` encoder and decoder layers.
    c.model.kwargs.update(num_encoder_layers=a.depth, num_decoder_layers=a.depth)
  c.data = defaults.text(name='c4/en:3.1.0', objective='span_corruption', inputs_length=512,
                                   targets_length=114, num_threads=32, prefetch_batches=8)
  c.train_split, c.eval_split = 'train', 'validation'
  c.z_loss = 1e-4
  c.batch_size = a.batch
  c.eval_batch_size = 256
  common.run_defaults(c)
  c.seed = a.seed
  c.total_steps = a.steps
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.0, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.rate': 1e-4, 'structure.kind': a.structure})
  if a.recipe == 'step':
    c.optimizer = common.optimizer(1e-3, wd=0.0, clip=1.0, warmup_steps=10_000)
  else:
    c.optimizer = common.optimizer(1e-2, wd=0.0, clip=0.0, warmup_steps=10_000)
    c.optimizer.name = 'adafactor'
    c.optimizer.schedule = 'rsqrt'
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.eval_steps = 20  # 5,120 validation documents per evaluation.
  c.checkpoint_every_steps = 2000
  c.diagnostics_every_steps = 1000
  c.mesh.data, c.mesh.fsdp = -1, 1  # Data parallel; --config.mesh.fsdp=8 shards params and moments 8 ways.
  if a.runlocal:
    c.model.variant = 'tiny'
    c.model.kwargs.dtype = 'float32'
    c.data.inputs_length, c.data.targets_length = 32, 8
    c.data.num_threads = 2
    c.batch_size = c.eval_batch_size = 8
    c.total_steps = 4
    c.log_every_steps = c.diagnostics_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.optimizer.warmup_steps = 1
  return c
