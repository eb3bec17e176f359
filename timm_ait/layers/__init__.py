"""Building blocks of the Global Workspace Layer, one concept a module."""
from .balance_term import DEFAULT_BALANCE_LOSS_COEF, AddBalanceTerm
from .bottleneck import BottleneckAttention, BottleneckGates, balance_loss_from_gates, cv_squared
from .gwl import GWL_ARGS, GlobalWorkspaceLayer, balance_loss, reset_memory, set_balance_loss_scale
from .hopfield import CrossAttentionRetrieval, HopfieldRetrieval, hopfield_energy
from .memory import (
    MEMORY_INITS, ExplicitMemory, decorrelation_step, is_recomputing, mean_abs_slot_cosine, mean_slot_cosine,
    memory_by_layer, memory_participation_rank, memory_slot_similarity, skipped_memory_writes,
)
from .patch_embed import LinearPatchEmbed
