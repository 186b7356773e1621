"""Models for the experiments: Flax Linen modules whose parameter paths fit ``nmsparse.preset``."""

from experiments.models.swinv2 import VARIANTS as SWINV2_VARIANTS
from experiments.models.swinv2 import SwinV2, make_swinv2, swinv2_config
from experiments.models.t5 import VARIANTS as T5_VARIANTS
from experiments.models.t5 import T5, greedy_decode, make_t5, t5_config, t5_rules
from experiments.models.vit import VARIANTS, ViT, make_vit, vit_config
