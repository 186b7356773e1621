r"""A tiny SwinV2 on Fashion-MNIST (offline, from the Debian package), on 2 CPU cores.

    python -m experiments.main --config=configs/swinv2_fashion_mnist.py --workdir=workdirs/swin_fmnist

Arguments (``:recipe=srste,nm=1:16,layers=mlp_qkv,val=10,runlocal``) as in vit_fashion_mnist.py.
Model ``mu``: embed 32, depths 2-2, heads 2-4, patch 2, window 7 (shifted on the 14x14 stage).
Sparsity as in the paper: the MLPs (optionally Q, K, V); never the patch embedding, patch
merging, the position-bias MLP, the output projection or the head.
Hardware: 2 CPU cores. Measured (README results table): ``:epochs=1`` (468 steps) gives top-1
76.21 % at 1:8 in 10 min with test runs sharing the cores; the 5-epoch default is not measured.
"""

import ml_collections

from configs import common
from experiments.data import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, variant='mu', recipe='mdgf', nm='1:8', layers='mlp', decay='exponential',
                       structure='stepwise', epochs=5.0, seed=0, val=0, runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'classification'
  c.model = ml_collections.ConfigDict(dict(name='swinv2', variant=a.variant, num_classes=10,
                                           channels=1, kwargs=dict()))
  c.data = defaults.image(name='nm_fashion_mnist', image_size=28)
  c.loss = 'softmax_xent'
  c.batch_size = 128
  c.eval_batch_size = 1000
  common.run_defaults(c)
  common.splits(c, a.val)  # val=10: select on the last 10 % of train, report on test.
  c.seed = a.seed
  c.total_epochs = a.epochs
  c.sparsity = common.sparsity(a.recipe, a.nm, a.layers, dense_frac=0.1, finetune_frac=0.1,
                               **{'decay.kind': a.decay, 'decay.final': 0.024, 'structure.kind': a.structure})
  c.optimizer = common.optimizer(1e-3, wd=0.05, clip=5.0, warmup_epochs=0.5)
  c.log_every_steps = c.diagnostics_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  if a.runlocal:
    c.total_epochs = None
    c.total_steps = 20
    c.batch_size = 32
    c.eval_batch_size = 500
    c.log_every_steps = c.diagnostics_every_steps = 5
    c.eval_every_steps = c.checkpoint_every_steps = 10
    c.optimizer.warmup_epochs = None
    c.optimizer.warmup_steps = 2
  return c
