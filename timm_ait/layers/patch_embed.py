"""The AiT authors' patch embedding: ``LN(patch) -> Linear -> LN``, with clear input errors."""
from typing import Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import to_2tuple

from .input_dtype import check_input_dtype

__all__ = ['LinearPatchEmbed']


class LinearPatchEmbed(nn.Module):
    """Cut non-overlapping patches, flatten each as (p, p, C), and embed it.

    Takes the arguments of timm's ``PatchEmbed`` that apply to a fixed-size model, so it can be
    passed to ``VisionTransformer`` as ``embed_layer``. Normalising the raw patch before the
    projection and the embedding after it is what the AiT models were trained with.
    """
    dynamic_img_pad = False

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 32,
            patch_size: Union[int, Tuple[int, int]] = 4,
            in_chans: int = 3,
            embed_dim: int = 768,
            bias: bool = True,
            strict_img_size: bool = True,
            dynamic_img_pad: bool = False,
            norm_layer: Optional[type] = None,
            device=None,
            dtype=None,
            **kwargs,
    ):
        super().__init__()
        if not strict_img_size or dynamic_img_pad:
            raise ValueError('LinearPatchEmbed embeds a fixed image size: dynamic_img_size / dynamic_img_pad '
                             'are not supported')
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f'image size {self.img_size} is not divisible by patch size {self.patch_size}')
        self.in_chans = in_chans
        self.grid_size = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_dim = in_chans * self.patch_size[0] * self.patch_size[1]
        dd = dict(device=device, dtype=dtype)
        self.norm_in = nn.LayerNorm(patch_dim, **dd)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # fp16 / uint8 / ... images the weights cannot take
            check_input_dtype(x, self.proj.weight.dtype)
        if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
            expected = f'(B, {self.in_chans}, {self.img_size[0]}, {self.img_size[1]})'
            raise ValueError(f'expected images of shape {expected} (batch, channels, height, width), '
                             f'got {tuple(x.shape)}')
        B, C, H, W = x.shape
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, ph * pw * C)
        return self.norm(self.proj(self.norm_in(x)))
