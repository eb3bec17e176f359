""" Parallelized MLP-Mixer from hierarchical associative memory (HAM-Mixer)

Paper: `Hierarchical Associative Memory, Parallelized MLP-Mixer, and Symmetry Breaking`
    - https://arxiv.org/abs/2406.12220 (Karakida, Ota, Taki 2024)
Authors' code: https://github.com/Toshihiro-Ota/paramixer (a fork of timm's mlp_mixer)

One update of a three-layer hierarchical Hopfield network is one Mixer block whose token- and
channel-mixing MLPs run in parallel from one LayerNorm over the whole (tokens, channels) map.
Four block types share one model class:

    serial:     x <- x + T(LN1(x));  x <- x + C(LN2(x))      (vanilla Mixer, LN over (N, D))
    parallel:   x <- x + T(LN(x)) + C(LN(x))                  (each MLP is W2 act(W1 z))
    symmetric:  parallel with every MLP W1^T act(W1 z)        (the Hopfield energy's weights)
    symbreak:   parallel with every MLP W1^T act(W1 z) + W2 act(W1 z)

``n_iter`` applies each block n times with shared weights (n updates of the same Hopfield layer),
and ``lcoeff`` is the weight of an L2 penalty on the W2 matrices (``aux_loss()``, added to the
training loss by ``timm_ait.task.AiTClassificationTask``), as in the authors' code; see
``AUTHORS_MODELS`` for how each of their entry points is reached.

MLP biases are off by default, as in the authors' code and in the energy picture; with
``mlp_bias=True`` an MLP has a hidden bias b1 and one output bias b2 (a threshold on the visible
neurons, which keeps the energy picture and the W1 / W1^T tie intact).

Built on timm's MLP-Mixer (PatchEmbed stem, `_init_weights`, feature API).
"""
import argparse
import math
import re
from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, Mlp, PatchEmbed, get_device_dtype, to_2tuple
from timm.models._builder import build_model_with_cfg
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq, named_apply
from timm.models._registry import generate_default_cfgs, register_model
from timm.models.mlp_mixer import _init_weights

from ..checkpoint import source_checkpoint
from ..constants import CIFAR_MEAN, CIFAR_STD
from ..hub import explain_download_errors, hf_hub_id
from ..layers.input_dtype import check_input_dtype
from ..layers.patch_embed import check_images

__all__ = [
    'HamMixer', 'MixerBlock', 'SymmetricMlp', 'SymmetryBreakingMlp',
    'AUTHORS_MODELS', 'check_trained_as',
]  # register_model adds each entrypoint fn to this

torch.fx.wrap('check_images')  # FX patches a leaf by its name in each module that calls it: this one too


class SymmetricMlp(nn.Module):
    """ MLP with one weight matrix used as W1 and as its transpose: W1^T act(W1 z + b1) + b2.

    A Hopfield network's interactions are symmetric, so the hidden -> visible weights are the
    transpose of the visible -> hidden ones. `fc1` holds W1 (hidden, in); there is no fc2.
    """
    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = False,
            drop: Union[float, Tuple[float, float]] = 0.,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        hidden_features = hidden_features or in_features
        drop_probs = to_2tuple(drop)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        # b2, the output bias of the transposed use; starts at zero (timm's Mixer init draws MLP biases at std 1e-6)
        self.bias_out = nn.Parameter(torch.zeros(in_features, **dd)) if bias else None
        self.drop2 = nn.Dropout(drop_probs[1])

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """act(W1 z + b1), the hidden-neuron activity shared by both uses of W1."""
        return self.drop1(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(F.linear(self.hidden(x), self.fc1.weight.t(), self.bias_out))


class SymmetryBreakingMlp(SymmetricMlp):
    """ Symmetric MLP plus a free hidden -> visible matrix: W1^T act(W1 z + b1) + b2 + W2 act(W1 z + b1).

    `fc2` holds W2 and has no bias (b2 already sits in the symmetric part), so the output is the
    symmetric MLP's output plus the breaking term exactly, and the parameter count equals the
    untied `Mlp`'s.
    """
    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = False,
            drop: Union[float, Tuple[float, float]] = 0.,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__(in_features, hidden_features, act_layer=act_layer, bias=bias, drop=drop, **dd)
        self.fc2 = nn.Linear(self.fc1.out_features, in_features, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.drop2(F.linear(h, self.fc1.weight.t(), self.bias_out) + self.fc2(h))


def _check_n_iter(n_iter: int) -> int:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f'n_iter (how many times each block is applied) must be an int >= 1, got {n_iter!r}.')
    return n_iter


class MixerBlock(nn.Module):
    """ Mixer block with each LayerNorm over the whole (tokens, channels) map, as in the paper.

    serial:    x <- x + T(LN1(x)); x <- x + C(LN2(x))   (timm's MixerBlock wiring)
    parallel:  x <- x + T(LN(x)) + C(LN(x))             (one hierarchical-Hopfield update)

    applied n_iter times with the same weights (n_iter updates of one Hopfield layer). The norms are named as
    in the authors' checkpoints: norm1 / norm2 in a serial block, norm in a parallel one (the others are None).
    """
    def __init__(
            self,
            dim: int,
            seq_len: int,
            mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0),
            mlp_layer: Type[nn.Module] = Mlp,
            mlp_bias: bool = False,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            drop_path: float = 0.,
            n_iter: int = 1,
            parallel: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.n_iter = _check_n_iter(n_iter)
        self.parallel = parallel
        tokens_dim, channels_dim = [int(x * dim) for x in to_2tuple(mlp_ratio)]
        # registered in the authors' order: the state dict, and timm's init (random draws in module order), as theirs
        self.norm = norm_layer((seq_len, dim), **dd) if parallel else None
        self.norm1 = None if parallel else norm_layer((seq_len, dim), **dd)
        self.mlp_tokens = mlp_layer(seq_len, tokens_dim, act_layer=act_layer, bias=mlp_bias, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = None if parallel else norm_layer((seq_len, dim), **dd)
        self.mlp_channels = mlp_layer(dim, channels_dim, act_layer=act_layer, bias=mlp_bias, drop=drop, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_iter):
            if self.norm is not None:
                z = self.norm(x)
                # one drop_path per branch, as the serial wiring and the authors' code have, so that the
                # variants differ only in wiring, not in how stochastic depth regularises them
                x = x + self.drop_path(self.mlp_tokens(z.transpose(1, 2)).transpose(1, 2))
                x = x + self.drop_path(self.mlp_channels(z))
            else:
                x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
                x = x + self.drop_path(self.mlp_channels(self.norm2(x)))
        return x


# block_type -> (parallel, MLP)
_BLOCK_TYPES = {
    'serial': (False, Mlp),
    'parallel': (True, Mlp),
    'symmetric': (True, SymmetricMlp),
    'symbreak': (True, SymmetryBreakingMlp),
}


class HamMixer(nn.Module):
    """ MLP-Mixer with serial, parallel, symmetric or symmetry-breaking blocks.

    Based on: `Hierarchical Associative Memory, Parallelized MLP-Mixer, and Symmetry Breaking`
        - https://arxiv.org/abs/2406.12220
    """

    def __init__(
            self,
            num_classes: int = 1000,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            patch_size: int = 16,
            num_blocks: int = 8,
            embed_dim: int = 512,
            mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0),
            block_type: str = 'parallel',
            mlp_bias: bool = False,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            act_layer: Type[nn.Module] = nn.GELU,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            nlhb: bool = False,
            global_pool: str = 'avg',
            n_iter: int = 1,
            lcoeff: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_classes: Number of classes for classification.
            img_size: Input image size; fixed, the token-mixing MLPs and LayerNorms are sized for its token grid.
            in_chans: Number of input channels.
            patch_size: Patch size; must divide img_size.
            num_blocks: Number of mixer blocks.
            embed_dim: Embedding dimension.
            mlp_ratio: Token- and channel-MLP hidden widths as multiples of embed_dim.
            block_type: One of 'serial', 'parallel', 'symmetric', 'symbreak'.
            mlp_bias: Give the MLPs biases (off in the paper's models).
            norm_layer: Normalization layer; blocks build it over (num_patches, embed_dim).
            act_layer: Activation layer.
            drop_rate: Head dropout rate.
            proj_drop_rate: MLP dropout rate.
            drop_path_rate: Drop path rate, the same in every block as in timm's Mixer and the authors' code.
            nlhb: Use negative log bias initialization for the head.
            global_pool: Global pooling type ('avg' or '').
            n_iter: Times each block is applied, with its weights shared (the authors' ``*_ni2..4`` models).
                The state dict is the same for every n_iter; only the function differs.
            lcoeff: Weight of the L2 penalty ``lcoeff * sum ||W2||^2`` over every block's token and channel
                MLP (the authors' ``reg_weight2``, their ``asymmixer_*_lXX`` models), returned by
                ``aux_loss()`` for the training loss. W2 is the hidden-to-visible matrix their code names
                fc2: ``fc2.weight`` here, and for ``symmetric`` the tied ``fc1.weight`` (W2 = W1^T).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if block_type not in _BLOCK_TYPES:
            raise ValueError(f'Unknown block_type {block_type!r}, expected one of {sorted(_BLOCK_TYPES)}.')
        img_size = to_2tuple(img_size)
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f'img_size {img_size} is not divisible by patch_size {patch_size}.')
        if global_pool not in ('', 'avg'):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}.")
        _check_n_iter(n_iter)
        if not lcoeff >= 0:
            raise ValueError(f'lcoeff (the weight of the L2 penalty on W2) must be >= 0, got {lcoeff!r}.')
        parallel, mlp_layer = _BLOCK_TYPES[block_type]
        self.block_type = block_type
        self.n_iter = n_iter
        self.lcoeff = lcoeff
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False

        self.stem = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        self.blocks = nn.Sequential(*[
            MixerBlock(
                embed_dim,
                self.stem.num_patches,
                mlp_ratio,
                mlp_layer=mlp_layer,
                mlp_bias=mlp_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                drop=proj_drop_rate,
                drop_path=drop_path_rate,
                n_iter=n_iter,
                parallel=parallel,
                **dd,
            )
            for _ in range(num_blocks)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size) for i in range(num_blocks)]
        self.norm = norm_layer(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, self.num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.init_weights(nlhb=nlhb)

    @torch.jit.ignore
    def init_weights(self, nlhb: bool = False) -> None:
        head_bias = -math.log(self.num_classes) if nlhb else 0.
        named_apply(partial(_init_weights, head_bias=head_bias), module=self)  # depth-first

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        # the blocks' LayerNorm gains are 2-D (N, D), so timm's 1-D rule would decay them
        return {n for n, p in self.blocks.named_parameters(prefix='blocks') if '.norm' in n}

    @torch.jit.ignore
    def aux_loss(self) -> Optional[torch.Tensor]:
        """``lcoeff * sum ||W2||^2`` over every block's token and channel MLP, None when lcoeff is 0.

        The training task adds it to the loss (the authors' train.py adds their ``reg_weight2`` to the
        training loss only); its gradient reaches the W2 matrices alone.
        """
        if not self.lcoeff:
            return None
        attr = 'fc1' if self.block_type == 'symmetric' else 'fc2'
        squares = [getattr(mlp, attr).weight.square().sum()
                   for block in self.blocks for mlp in (block.mlp_tokens, block.mlp_channels)]
        return self.lcoeff * torch.stack(squares).sum()

    @torch.jit.ignore
    def check_checkpoint_arch(self, checkpoint: Dict[str, Any], what: str = 'checkpoint') -> None:
        """Refuse a training checkpoint whose ``arch`` / ``args`` say another block type or n_iter."""
        check_trained_as(checkpoint, self.block_type, self.n_iter, what)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ('', 'avg'):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}.")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        # token-mixing MLPs and (N, D) LayerNorms are sized for one token grid: no other image size can run
        if not torch.jit.is_scripting():  # fp16 / uint8 / ... images the weights cannot take
            check_input_dtype(x, self.stem.proj.weight.dtype)
        return check_images(x, self.in_chans, self.stem.img_size)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor.
            indices: Take last n blocks if int, all if None, select matching indices if sequence.
            norm: Apply the final norm layer to all intermediates.
            stop_early: Stop iterating over blocks when last desired intermediate hit.
            output_fmt: Shape of intermediate feature outputs ('NCHW' or 'NLC').
            intermediates_only: Only return intermediate features.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}.")
        x = self._check_input(x)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        if output_fmt == 'NCHW':
            H, W = self.stem.grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if intermediates_only:
            return intermediates

        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """ Prune layers not required for specified intermediates. """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: HamMixer) -> Dict[str, torch.Tensor]:
    """ Remap checkpoints from the authors' code (github.com/Toshihiro-Ota/paramixer).

    Their symmetric MLP stores its one matrix, shape (hidden, in), as `fc2.weight`; here it is `fc1.weight`.
    Every other key, and every checkpoint of the other block types, already matches.
    """
    source = source_checkpoint(state_dict, model)  # a damaged training checkpoint is refused
    if source is not None:  # n_iter shares the weights: only the run's settings tell the functions apart
        check_trained_as(source, model.block_type, model.n_iter, 'the checkpoint')
    if model.block_type != 'symmetric' or any('.fc1.' in k for k in state_dict):
        return state_dict
    return {k.replace('.fc2.', '.fc1.'): v for k, v in state_dict.items()}


def _authors_models() -> Dict[str, Tuple[str, Dict[str, Any]]]:
    """Every entry point of the authors' models/mixers.py: (our model name, kwargs)."""
    block_types = dict(vanillamixer='serial', paramixer='parallel', symmixer='symmetric')
    models = {}
    for prefix, block_type in block_types.items():
        for size in ('s32', 's16', 'b32', 'b16'):
            models[f'{prefix}_{size}_224'] = (f'hmixer_{block_type}_{size}_224', {})
        for n in (2, 3, 4):
            models[f'{prefix}_s16_224_ni{n}'] = (f'hmixer_{block_type}_s16_224', dict(n_iter=n))
        for patch in (32, 16):  # their L sizes: the B layout with 24 blocks of width 1024
            models[f'{prefix}_l{patch}_224'] = (
                f'hmixer_{block_type}_b{patch}_224', dict(num_blocks=24, embed_dim=1024))
    for suffix, lcoeff in (('l00', 0.), ('l01', 0.1), ('l02', 1e-2), ('l03', 1e-3), ('l035', 5e-4),
                           ('l04', 1e-4), ('l05', 1e-5), ('l06', 1e-6), ('l10', 1.0)):
        models[f'asymmixer_s16_224_{suffix}'] = ('hmixer_symbreak_s16_224', dict(lcoeff=lcoeff))
    return models


# The authors' entry point -> (model name, kwargs) that builds the same model here, e.g.
# 'paramixer_s16_224_ni2' -> ('hmixer_parallel_s16_224', {'n_iter': 2}),
# 'asymmixer_s16_224_l01' -> ('hmixer_symbreak_s16_224', {'lcoeff': 0.1}).
AUTHORS_MODELS = _authors_models()


def _trained_as(checkpoint: Dict[str, Any]) -> Optional[Tuple[str, int]]:
    """(block_type, n_iter) of a training checkpoint from its ``arch`` (the model name timm's
    CheckpointSaver saves, theirs or ours) and ``args.model_kwargs``; None when it does not say."""
    arch = checkpoint.get('arch')
    if not isinstance(arch, str):
        return None
    args = checkpoint.get('args')
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    name, kwargs = AUTHORS_MODELS.get(arch, (arch, {}))
    found = re.match(r'hmixer_(serial|parallel|symmetric|symbreak)_', name)
    if not found:
        return None
    kwargs = {**kwargs, **(args.get('model_kwargs') or {})}
    return found.group(1), kwargs.get('n_iter', 1)


def check_trained_as(checkpoint: Dict[str, Any], block_type: str, n_iter: int, what: str = 'checkpoint') -> None:
    """Raise a ValueError if a training checkpoint was trained with another n_iter or block type.

    n_iter shares the weights, so a checkpoint of any n_iter has the same keys and shapes and would
    load silently into a model that computes another function; parallel and symbreak have the same
    keys too. Only the checkpoint's ``arch`` and ``args`` tell them apart.
    """
    trained = _trained_as(checkpoint)
    if trained is None:
        return
    arch = checkpoint['arch']
    if trained[1] != n_iter:
        hint = f' ({AUTHORS_MODELS[arch][0]} with {AUTHORS_MODELS[arch][1]})' if arch in AUTHORS_MODELS else ''
        raise ValueError(
            f'{what} was trained as {arch!r}{hint}, each block applied n_iter={trained[1]} times; this model has '
            f'n_iter={n_iter}. The weights fit either way, so create the model with n_iter={trained[1]}.')
    if trained[0] != block_type:
        raise ValueError(f"{what} was trained as {arch!r}, block_type={trained[0]!r}; this model has "
                         f"block_type={block_type!r}.")


def _create_hmixer(variant: str, pretrained: bool = False, **kwargs) -> HamMixer:
    out_indices = kwargs.pop('out_indices', min(3, kwargs.get('num_blocks', 8)))  # features_only: the last 3 blocks
    with explain_download_errors(variant, kwargs):
        model = build_model_with_cfg(
            HamMixer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    return model


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5),
        'first_conv': 'stem.proj', 'classifier': 'head',
        'license': 'apache-2.0', 'paper_ids': 'arXiv:2406.12220',
        **kwargs
    }


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(
        num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD, **kwargs)


_BLOCK_NAMES = ('serial', 'parallel', 'symmetric', 'symbreak')

default_cfgs = generate_default_cfgs({
    **{
        f'hmixer_{b}_{s}_224.in1k': _cfg(hf_hub_id=hf_hub_id(f'hmixer_{b}_{s}_224', 'in1k'))
        for b in _BLOCK_NAMES for s in ('s16', 's32', 'b16', 'b32')
    },
    **{
        f'hmixer_{b}_s4_32.cifar10': _cifar_cfg(hf_hub_id=hf_hub_id(f'hmixer_{b}_s4_32', 'cifar10'))
        for b in _BLOCK_NAMES
    },
})


@register_model
def hmixer_serial_s16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/16 224x224, serial (vanilla Mixer, (N, D) LayerNorm). """
    model_args = dict(patch_size=16, num_blocks=8, embed_dim=512, block_type='serial')
    return _create_hmixer('hmixer_serial_s16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_serial_s32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/32 224x224, serial (vanilla Mixer, (N, D) LayerNorm). """
    model_args = dict(patch_size=32, num_blocks=8, embed_dim=512, block_type='serial')
    return _create_hmixer('hmixer_serial_s32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_serial_b16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/16 224x224, serial (vanilla Mixer, (N, D) LayerNorm). """
    model_args = dict(patch_size=16, num_blocks=12, embed_dim=768, block_type='serial')
    return _create_hmixer('hmixer_serial_b16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_serial_b32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/32 224x224, serial (vanilla Mixer, (N, D) LayerNorm). """
    model_args = dict(patch_size=32, num_blocks=12, embed_dim=768, block_type='serial')
    return _create_hmixer('hmixer_serial_b32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_serial_s4_32(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/4 32x32 (CIFAR), serial (vanilla Mixer, (N, D) LayerNorm). """
    model_args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=512, block_type='serial')
    return _create_hmixer('hmixer_serial_s4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_parallel_s16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/16 224x224, parallel (token and channel MLPs from one shared LayerNorm). """
    model_args = dict(patch_size=16, num_blocks=8, embed_dim=512, block_type='parallel')
    return _create_hmixer('hmixer_parallel_s16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_parallel_s32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/32 224x224, parallel (token and channel MLPs from one shared LayerNorm). """
    model_args = dict(patch_size=32, num_blocks=8, embed_dim=512, block_type='parallel')
    return _create_hmixer('hmixer_parallel_s32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_parallel_b16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/16 224x224, parallel (token and channel MLPs from one shared LayerNorm). """
    model_args = dict(patch_size=16, num_blocks=12, embed_dim=768, block_type='parallel')
    return _create_hmixer('hmixer_parallel_b16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_parallel_b32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/32 224x224, parallel (token and channel MLPs from one shared LayerNorm). """
    model_args = dict(patch_size=32, num_blocks=12, embed_dim=768, block_type='parallel')
    return _create_hmixer('hmixer_parallel_b32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_parallel_s4_32(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/4 32x32 (CIFAR), parallel (token and channel MLPs from one shared LayerNorm). """
    model_args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=512, block_type='parallel')
    return _create_hmixer('hmixer_parallel_s4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symmetric_s16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/16 224x224, parallel with symmetric MLPs W^T act(W z). """
    model_args = dict(patch_size=16, num_blocks=8, embed_dim=512, block_type='symmetric')
    return _create_hmixer('hmixer_symmetric_s16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symmetric_s32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/32 224x224, parallel with symmetric MLPs W^T act(W z). """
    model_args = dict(patch_size=32, num_blocks=8, embed_dim=512, block_type='symmetric')
    return _create_hmixer('hmixer_symmetric_s32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symmetric_b16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/16 224x224, parallel with symmetric MLPs W^T act(W z). """
    model_args = dict(patch_size=16, num_blocks=12, embed_dim=768, block_type='symmetric')
    return _create_hmixer('hmixer_symmetric_b16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symmetric_b32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/32 224x224, parallel with symmetric MLPs W^T act(W z). """
    model_args = dict(patch_size=32, num_blocks=12, embed_dim=768, block_type='symmetric')
    return _create_hmixer('hmixer_symmetric_b32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symmetric_s4_32(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/4 32x32 (CIFAR), parallel with symmetric MLPs W^T act(W z). """
    model_args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=512, block_type='symmetric')
    return _create_hmixer('hmixer_symmetric_s4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symbreak_s16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/16 224x224, parallel with symmetry-breaking MLPs W1^T act(W1 z) + W2 act(W1 z). """
    model_args = dict(patch_size=16, num_blocks=8, embed_dim=512, block_type='symbreak')
    return _create_hmixer('hmixer_symbreak_s16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symbreak_s32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/32 224x224, parallel with symmetry-breaking MLPs W1^T act(W1 z) + W2 act(W1 z). """
    model_args = dict(patch_size=32, num_blocks=8, embed_dim=512, block_type='symbreak')
    return _create_hmixer('hmixer_symbreak_s32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symbreak_b16_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/16 224x224, parallel with symmetry-breaking MLPs W1^T act(W1 z) + W2 act(W1 z). """
    model_args = dict(patch_size=16, num_blocks=12, embed_dim=768, block_type='symbreak')
    return _create_hmixer('hmixer_symbreak_b16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symbreak_b32_224(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-B/32 224x224, parallel with symmetry-breaking MLPs W1^T act(W1 z) + W2 act(W1 z). """
    model_args = dict(patch_size=32, num_blocks=12, embed_dim=768, block_type='symbreak')
    return _create_hmixer('hmixer_symbreak_b32_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hmixer_symbreak_s4_32(pretrained=False, **kwargs) -> HamMixer:
    """ HAM-Mixer-S/4 32x32 (CIFAR), parallel with symmetry-breaking MLPs W1^T act(W1 z) + W2 act(W1 z). """
    model_args = dict(img_size=32, patch_size=4, num_blocks=8, embed_dim=512, block_type='symbreak')
    return _create_hmixer('hmixer_symbreak_s4_32', pretrained=pretrained, **dict(model_args, **kwargs))
