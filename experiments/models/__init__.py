"""Models for the experiments: Flax Linen modules whose parameter paths fit ``nmsparse.preset``."""

from experiments.models.vit import VARIANTS, ViT, make_vit, vit_config
