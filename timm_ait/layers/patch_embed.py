"""The AiT authors' patch embedding: ``LN(patch) -> Linear -> LN``, with clear input errors."""
from typing import List, Optional, Tuple, Union

import torch
from torch import nn
from timm.layers import to_2tuple

from .input_dtype import check_input_dtype

__all__ = ['LinearPatchEmbed', 'check_images', 'shape_str']


def shape_str(shape: List[int]) -> str:
    """``(2, 3, 32, 32)``: a shape as error messages print it, in eager and in TorchScript."""
    if torch.jit.is_scripting():
        return '(' + ', '.join([str(s) for s in shape]) + (',)' if len(shape) == 1 else ')')
    return str(tuple(shape))


@torch.fx.wrap
def check_images(x: torch.Tensor, in_chans: int, img_size: Tuple[int, int]) -> torch.Tensor:
    """``x`` itself if it is a batch of (in_chans, *img_size) images, else a ValueError naming both shapes.

    ``torch.fx.wrap`` makes it a leaf of every FX tracer (plain ``symbolic_trace``, timm's and torchvision's
    feature extractors), and TorchScript compiles it, so a traced or scripted model checks its input with the
    same message. FX patches the name in this module's globals only: another module that calls it runs
    ``torch.fx.wrap('check_images')`` at its top level too. Returning ``x`` keeps it in graphs that drop unused nodes.
    """
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[2] != img_size[0] or x.shape[3] != img_size[1]:
        raise ValueError(f'expected images of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}) '
                         f'(batch, channels, height, width), got {shape_str(x.shape)}')
    return x


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
        self.patch_size = to_2tuple(patch_size)
        self.set_input_size(img_size)
        self.in_chans = in_chans
        patch_dim = in_chans * self.patch_size[0] * self.patch_size[1]
        dd = dict(device=device, dtype=dtype)
        self.norm_in = nn.LayerNorm(patch_dim, **dd)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Embed another image size (timm's PatchEmbed API); the patch size is fixed."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(f'LinearPatchEmbed cannot change its patch size {self.patch_size} (got {patch_size})')
        img_size = to_2tuple(img_size or self.img_size)  # None: keep the current size
        if any(i % p for i, p in zip(img_size, self.patch_size)):
            raise ValueError(f'image size {img_size} is not divisible by patch size {self.patch_size}')
        self.img_size = img_size
        self.grid_size = tuple(i // p for i, p in zip(img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # fp16 / uint8 / ... images the weights cannot take
            check_input_dtype(x, self.proj.weight.dtype)
        x = check_images(x, self.in_chans, self.img_size)
        B, C, H, W = x.shape
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, ph * pw * C)
        return self.norm(self.proj(self.norm_in(x)))
