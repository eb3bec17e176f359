""" A tiny AiT (under 1M parameters) for tests and demos: 64x64 Triangle images, patch 16.

Small enough to train to >= 97% on generated Triangle data on a CPU in minutes, so the publishing
path (push to the Hub, ``pretrained=True`` back) can be tested end to end with real weights.
"""
from timm.models import generate_default_cfgs, register_model

from .ait import AssociativeTransformer, _create_ait, _triangle_cfg

__all__ = []

default_cfgs = generate_default_cfgs({
    **_triangle_cfg('ait_tiny_patch16_64'),
})


@register_model
def ait_tiny_patch16_64(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Tiny (2 blocks of width 64), 64x64 images, patch 16, 16 slots of 16, k=64."""
    model_args = dict(
        img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
        num_slots=16, slot_dim=16, gwl_heads=4, bottleneck=64)
    return _create_ait('ait_tiny_patch16_64', pretrained=pretrained, **dict(model_args, **kwargs))
