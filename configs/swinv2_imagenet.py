r"""SwinV2 on ImageNet-1k with the SwinV2 recipe and N:M sparse MLPs (the paper's SwinV2 setting).

    python -m experiments.main --config=configs/swinv2_imagenet.py:variant=B-w16,recipe=mdgf,nm=1:16 \
        --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir=gs://BUCKET/runs/swinv2_b_mdgf

Default variant ``B-w16`` = swinv2_base_window16_256 (embed 128, depths 2-2-18-2, heads
4-8-16-32, window 16, 256 px). Recipe of the SwinV2 paper for ImageNet-1k from scratch: 300
epochs, AdamW lr 1e-3 at batch 1024 (square-root scaled), weight decay 0.05, 20 warm-up epochs,
cosine, gradient clipping 5.0, RandAugment m9 n2, mixup 0.8, stochastic depth 0.5 (B), bf16.
Hardware (measured ahead of time, ``results/tpu_plan.md``): fits a v4-32 at batch 1024 with no
fsdp or remat, 14.64 GB of a device's 17.18 GB (15 % headroom; MDGF's diagnostics step 14.78 GB);
the train step's roofline is 238 ms (memory-bound), so 300 epochs
(375,300 steps) take at least 24.9 h, 399 chip-hours. On a v5e-32 (16 GB per chip) data parallel
leaves 8.8 % free: add ``--config.mesh.fsdp=8 --config.mesh.data=-1`` (13.26 GB, 17 % headroom;
155 ms, 16.2 h, 519 chip-hours). Expected top-1 about 84-85 % dense (B-w16).
Needs ``imagenet2012`` prepared in array_record format under ``data_dir``.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='B-w16', recipe='mdgf', nm='1:16', layers='mlp',
                       decay='exponential', structure='stepwise', batch=1024, epochs=300.0, seed=0,
                       runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  drop_path = {'T': 0.2, 'S': 0.3}.get(a.variant, 0.5)
  c.model = ml_collections.ConfigDict(dict(name='swinv2', variant=a.variant, num_classes=1000,
                                           channels=3, kwargs=dict(dtype='bfloat16', drop_path=drop_path)))
  c.data = defaults.image(
      name='imagenet2012', image_size=256, crop='inception', flip=True, randaugment_layers=2,
      randaugment_magnitude=9.0, mixup_alpha=0.8, normalize='imagenet', num_threads=32,
      prefetch_batches=8)
  c.train_split, c.eval_split = 'train', 'validation'
  c.loss = 'softmax_xent'
  c.batch_size = a.batch
  c.eval_batch_size = 1024
  common.run_defaults(c)
  c.seed = a.seed
  c.total_epochs = a.epochs
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.0, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.rate': 1e-4, 'structure.kind': a.structure})
  c.optimizer = common.optimizer(1e-3, wd=0.05, clip=5.0, warmup_epochs=20.0, base_batch=1024)
  c.log_every_steps = 100
  c.eval_every_steps = 2500
  c.checkpoint_every_steps = 1000
  c.diagnostics_every_steps = 500
  if a.runlocal:
    c.model.variant = 'mu'
    c.model.kwargs = dict(dtype='float32', drop_path=0.1)
    c.data.image_size = 28
    c.data.num_threads = 2
    c.batch_size = c.eval_batch_size = 8
    c.total_epochs = None
    c.total_steps = 4
    c.log_every_steps = c.diagnostics_every_steps = 2
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.optimizer.warmup_epochs = None
    c.optimizer.warmup_steps = 1
  return c
