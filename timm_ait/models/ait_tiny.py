""" A tiny AiT (under 1M parameters) for tests and demos: 64x64 Triangle images, patch 32.

Small enough to train to about 98% on generated Triangle data on one CPU core in minutes, so the
publishing path (push to the Hub, ``pretrained=True`` back) is tested end to end with real weights
(tests/fixtures/README.md has the command).

Why these sizes: patch 32 is the paper's Triangle setting (4 patches per image). A width-64,
patch-16 model (0.18M parameters) stayed at the ~59% size cue of the data for 8 epochs of 50k
images, while this one passes it within the first 1,000 steps.
"""
from timm.models import generate_default_cfgs, register_model

from .ait import AssociativeTransformer, _create_ait, _triangle_cfg

__all__ = []

default_cfgs = generate_default_cfgs({
    **_triangle_cfg('ait_tiny_patch32_64'),
})


@register_model
def ait_tiny_patch32_64(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Tiny (2 blocks of width 128, 4 heads), 64x64 images, patch 32; 16 slots of 16, k=64."""
    model_args = dict(
        img_size=64, patch_size=32, embed_dim=128, depth=2, num_heads=4,
        num_slots=16, slot_dim=16, gwl_heads=4, bottleneck=64)
    return _create_ait('ait_tiny_patch32_64', pretrained=pretrained, **dict(model_args, **kwargs))
