r"""A small ViT on Fashion-MNIST (offline, from the Debian package): the default experiment.

    python -m experiments.main --config=configs/vit_fashion_mnist.py --workdir=workdirs/vit_fmnist

Arguments (``--config=configs/vit_fashion_mnist.py:recipe=srste,nm=1:16``):
  variant   ViT variant (default ``mu/7``: width 64, depth 4, 4 heads, MLP 256, patch 7)
  recipe    nmsparse recipe (dense, oneshot, hard, ste, srste, mdgf, sdgf, mdgf_sdgf, step)
  nm        N:M pattern (default ``1:8``); layers: mlp | mlp_qkv | all
  decay     MDGF decay: exponential | linear | cosine | stepwise
  structure SDGF schedule: stepwise | geometric | densify
  epochs    training length; runlocal: a few steps of a tiny model (smoke test)
  val       percent of train held out for validation (default 0: evaluate on test); val=10 trains
            on train[:90%], evaluates on train[90%:] and reports the final model on test

Hardware: 2 CPU cores. Expected (measured, README results table): 2,340 steps in 3 minutes
(5 on a shared machine), top-1 86.68 % with 87.5 % of the MLP weights pruned (1:8).
"""

import ml_collections

import nmsparse

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='mu/7', recipe='mdgf', nm='1:8', layers='mlp', decay='exponential',
                       structure='stepwise', epochs=5.0, seed=0, val=0, runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.model = ml_collections.ConfigDict(dict(name='vit', variant=a.variant, num_classes=10, channels=1,
                                           kwargs=dict(pool_type='gap', posemb='learn')))
  c.data = defaults.image(name='nm_fashion_mnist', image_size=28)
  c.loss = 'softmax_xent'
  c.batch_size = 128
  c.eval_batch_size = 1000
  common.run_defaults(c)
  common.splits(c, a.val)  # val=10: select on the last 10 % of train, report on test.
  c.seed = a.seed
  c.total_epochs = a.epochs
  # Dense warm-up 10 %, the recipe, then a 10 % fine-tune at the final N:M. MDGF's decay is
  # relative to the sparse phase, so a run of any length (runlocal, another epochs, batch or
  # --config.total_steps) keeps the same a(t) shape: exponential falls to 0.024 by the end of
  # the sparse phase (the fine-tune then trains the hard N:M model); linear reaches 0 at 80 %.
  # SDGF-geometric starts at (2^L N):(2^L M); its M must divide the 64-wide contraction of the
  # mu models' kernels, so L = 3 stages before the target where they fit, fewer at 1:16 and 1:32.
  _, m = nmsparse.parse_nm(a.nm)
  levels = max(1, min(3, (64 // m).bit_length() - 1)) if a.structure in ('geometric', 'densify') else 3
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.1, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.final': 0.024,
                                  'decay.duration': 0.8 if a.decay == 'linear' else 1.0,
                                  'structure.kind': a.structure, 'structure.levels': levels})
  c.optimizer = common.optimizer(1e-3, wd=1e-4, clip=1.0, warmup_epochs=0.5)
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.diagnostics_every_steps = 100
  if a.runlocal:
    c.model.variant = 'mu/14'
    c.total_epochs = None
    c.total_steps = 20
    c.batch_size = 32
    c.eval_batch_size = 500
    c.log_every_steps = c.diagnostics_every_steps = 5
    c.eval_every_steps = c.checkpoint_every_steps = 10
    c.optimizer.warmup_epochs = None
    c.optimizer.warmup_steps = 2
  return c
