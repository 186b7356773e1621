"""nmsparse: N:M structured sparsity training for JAX/Flax models.

Pure functions over arrays and pytrees: N:M masks, decay and structure schedules,
``jax.custom_vjp`` gradient-flow ops for every recipe, and the glue that applies
them to the kernels of any Flax model chosen by ordered regex rules.
"""

from nmsparse import diagnostics, export, flops
from nmsparse.diagnostics import grad_norms, gradient_noise, mask_flip_rate, nm_valid_fraction, sparsity
from nmsparse.export import (CompressedKernel, compress, compress_kernel, decompress,
                             decompress_kernel, size_report, validate)
from nmsparse.flax_adapters import (SparseModule, nnx_apply_fn, nnx_call, nnx_sparsifier,
                                    sparse_apply_fn, sparsify_module)
from nmsparse.flops import inference_macs, training_flops
from nmsparse.masks import argsort_mask, check_nm, nm_mask, topk_mask
from nmsparse.ops import flow, hard_mask, mdgf, srste, ste
from nmsparse.recipes import RECIPES, Recipe, Sparsifier, make_sparsifier, recipe_config
from nmsparse.rules import NMSpec, parse_nm, preset, resolve
from nmsparse.schedules import Decay, Phases, Structure
from nmsparse.step_optimizer import find_step_state, scale_by_step_adam, step_adam, switched

__version__ = '0.1.0'
