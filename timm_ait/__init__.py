"""timm-ait: the Associative Transformer (AiT) and its relatives for timm.

Importing this package registers every model with timm, so that
``timm.create_model("ait_small_patch4_32")`` works.
"""
from .version import __version__
from .hub import HF_HUB_ORG
from . import layers, models  # noqa: F401  (registers the models with timm)
from .layers import (  # noqa: F401
    balance_loss, memory_slot_similarity, reset_memory, set_balance_loss_scale, skipped_memory_writes,
)
