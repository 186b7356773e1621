r"""ViT-B/16 on ImageNet-1k with the paper's reference recipe and N:M sparse MLPs.

    python -m experiments.main --config=configs/vit_imagenet.py:recipe=mdgf,nm=1:16 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/runs/vit_b16_mdgf_1x16

Hardware (measured ahead of time, ``results/tpu_plan.md``): fits a v4-32 at batch 4096 with
no fsdp or remat, 10.70 GB of a device's 17.18 GB (38 % headroom; MDGF 1:16: 10.28 GB); the
train step's roofline is 173 ms (memory-bound), so 350 epochs (109,200 steps) take at least
5.3 h, 84 chip-hours; on a v5e-32, 135 ms, 4.1 h, 132 chip-hours. A lower bound: the roofline
ignores the collectives and imperfect overlap. One process per host: on Cloud TPU set
NMSPARSE_DISTRIBUTED=1 and jax.distributed.initialize() autodetects. Plan another slice with
``--mode=compile --topology=...``.
Expected metric: top-1 about 79-80 % dense (DeiT-B-like recipe); the paper reports the
sparse recipes relative to it (up to +2 % over SR-STE at high sparsity).

Recipe (reference ViT config of the paper's code): 350 epochs, AdamW lr 1e-3 at batch
4096 (square-root scaled for other batch sizes), weight decay 0.05, 15 warm-up epochs,
cosine, gradient clipping 1.0, RandAugment m15 n2, mixup 0.5, bfloat16 activations,
sigmoid cross-entropy, N:M on the MLPs; MDGF exponential decay rate 1e-4.
Needs ``imagenet2012`` prepared by tfds in array_record format under ``data_dir``.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='B/16', recipe='mdgf', nm='1:16', layers='mlp',
                       decay='exponential', structure='stepwise', batch=4096, epochs=350.0, seed=0,
                       runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.model = ml_collections.ConfigDict(dict(
      name='vit', variant=a.variant, num_classes=1000, channels=3,
      kwargs=dict(pool_type='tok', posemb='learn', dtype='bfloat16', dropout=0.0)))
  c.data = defaults.image(
      name='imagenet2012', image_size=224, crop='inception', flip=True, randaugment_layers=2,
      randaugment_magnitude=15.0, mixup_alpha=0.5, num_threads=32, prefetch_batches=8)
  c.train_split, c.eval_split = 'train', 'validation'
  c.loss = 'sigmoid_xent'
  c.batch_size = a.batch
  c.eval_batch_size = 1024
  common.run_defaults(c)
  c.seed = a.seed
  c.total_epochs = a.epochs
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.0, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.rate': 1e-4,
                                  'structure.kind': a.structure})
  c.optimizer = common.optimizer(1e-3, wd=0.05, clip=1.0, warmup_epochs=15.0, base_batch=4096)
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000
  c.diagnostics_every_steps = 500
  c.mesh.data, c.mesh.fsdp = -1, 1
  if a.runlocal:
    c.model.variant = 'mu/16'
    c.model.kwargs.dtype = 'float32'
    c.data.image_size = 64
    c.data.num_threads = 2
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_epochs = None
    c.total_steps = 4
    c.log_every_steps = c.diagnostics_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.optimizer.warmup_epochs = None
    c.optimizer.warmup_steps = 1
  return c
