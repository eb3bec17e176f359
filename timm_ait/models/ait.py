""" Associative Transformer (AiT)

A PyTorch implementation of `Associative Transformer` - https://arxiv.org/abs/2309.12862
(Sun, Ochiai, Wu, Lin, Kanai), on timm's VisionTransformer: each block keeps timm's
pre-norm self-attention and replaces the MLP with a Global Workspace Layer (GWL), see
``timm_ait.layers.gwl``.

Architecture choices, as in the authors' models (they give the paper's parameter counts):
patch embedding ``LN(p*p*C) -> Linear -> LN(D)``; no class token; attention heads of 64 without
qkv bias; the head flattens all N tokens, ``LN(N*D) -> Linear(N*D, classes)`` (``global_pool=
'flatten'``, which fixes the image size). Unlike the authors' code we add timm's learned position
embedding (their forward adds none; ``pos_embed='none'`` reproduces that).

Defaults taken from what the authors trained (github.com/yuweisunn/associative-transformer):

- LayerNorm eps: the blocks' pre-norms are PyTorch's default ``nn.LayerNorm`` there, eps 1e-5
  (timm's ViT uses 1e-6): ``norm_layer`` defaults to timm's LayerNorm with eps 1e-5, pass
  another ``norm_layer`` for other values. The write's LayerNorm ``LN_m`` uses eps 1e-6
  (``gwl_write_norm_eps``). The patch-embedding norms, the GWL's norm after fc2 and the head's
  ``LN(N*D)`` use 1e-5 in both codes.
- Write dropout 0 (``gwl_write_drop``). Their write module has Dropout(0.1) after the output
  projection, but their training script calls ``net.eval()`` for the test pass after the first
  epoch and never ``net.train()`` again, so their models trained all but the first epoch without it. ``gwl_write_drop=0.1`` gives their module as built.
- Memory row normalisation after each write is off (the paper's equations; the README's choice);
  ``memory_l2norm=True`` is their code's write. Either way the memory starts from raw N(0, 1).

The authors' checkpoints load as they are: ``checkpoint_filter_fn`` renames their keys and reorders
the write's output projection (``convert_authors_checkpoint``), so ``pretrained_cfg_overlay=
dict(file=...)`` or ``load_state_dict`` through it works. With ``memory_l2norm=True`` a converted model's
training forward computes their training forward (tests/test_ait.py, batch 16 of AiT-Small, where the top-k
keeps 512 of 1,024 patches): logits and written memory to about 1e-6 in float32, and in float64 also the
balance loss (float32 rounding can flip a top-k choice between two near-equal scores, which moves one
patch's load count). Their eval forward also writes the memory, so its output depends on the batch;
ours follows the paper (eval never writes), so evaluating a converted checkpoint does not reproduce
their script's test numbers exactly.

Parameters with 10 classes at 32x32, patch 4 (paper: 15.8M / 45.9M / 91.0M): ait_small 15.72M,
ait_medium 45.82M, ait_base 90.95M. The paper's counts include modules the authors' code builds
but never calls (a 58,368-parameter conv stem, a class token and a 65-slot position embedding)
and the memory, which here is a buffer (1,024 values a layer), not a parameter.
"""
import re
from functools import partial
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm, Mlp, get_device_dtype, global_pool_nlc, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from timm.models.vision_transformer import Block, VisionTransformer

import timm

from ..checkpoint import check_state_dict, source_checkpoint
from ..constants import CIFAR_MEAN, CIFAR_STD
from ..hub import explain_download_errors, hf_hub_id
from ..layers import GWL_ARGS, GlobalWorkspaceLayer, LinearPatchEmbed
from ..layers import balance_loss as _balance_loss
from ..layers import reset_memory as _reset_memory
from ..layers._args import to_bool, to_int

__all__ = ['AssociativeTransformer', 'AiTBlock', 'ABLATIONS', 'checkpoint_filter_fn', 'convert_authors_checkpoint',
           'upgrade_model_kwargs']

# The paper's Table 2, as keyword arguments of the model. 'reset_memory' is a training-time
# ablation: the model only records it, the training task re-initialises the memory each epoch.
ABLATIONS = {
    'reset_memory': {},
    'no_hopfield': dict(hopfield=False),
    'no_memory': dict(gwl=False),
    'no_bottleneck': dict(bottleneck='none'),
    'no_self_attn': dict(self_attn=False),
    'no_feed_forward': dict(feed_forward=False),
}
# the model's names of two GWL arguments (the rest keep the GWL's own names)
_GWL_ALIASES = {'gwl_write_drop': 'write_drop', 'gwl_write_norm_eps': 'write_norm_eps'}


class AiTBlock(Block):
    """timm's pre-norm ``Block``, with the self-attention optional (the 'w/o SA' ablation)."""

    def __init__(self, *args, self_attn: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        if not self_attn:
            self.norm1 = self.attn = self.ls1 = self.drop_path1 = None

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if self.attn is not None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AssociativeTransformer(VisionTransformer):
    """AiT: a ViT whose blocks use the Global Workspace Layer in place of the MLP.

    Every argument of timm's ``VisionTransformer`` is accepted; the defaults differ where the
    AiT models differ (see the module docstring). AiT's own arguments:

    Args:
        gwl: False builds the ViT twin with the same dimensions (plain timm ``Mlp``).
        num_slots, slot_dim, gwl_heads, bottleneck, cap_bottleneck, smoothing, memory_init,
        memory_l2norm, memory_decorrelation, beta, hopfield_steps, hopfield, feed_forward, gwl_write_drop (its
        ``write_drop``), gwl_write_norm_eps (its ``write_norm_eps``): see ``GlobalWorkspaceLayer``;
        ``bottleneck='none'`` is the dense ablation.
        self_attn: False removes the blocks' self-attention (ablation).
        balance_loss_coef: weight of the GWL balance loss that a training forward adds to the backward of
            whatever loss is computed from the output (the paper's lambda); 0 turns it off.
        ablation: one name of :data:`ABLATIONS` (the paper's Table 2), applied over the above.
        global_pool: timm's options plus 'flatten' (the authors' head over all tokens).
    """

    def __init__(
            self,
            img_size=32,
            patch_size=4,
            num_classes: int = 10,
            global_pool: str = 'flatten',
            embed_dim: int = 768,
            depth: int = 2,
            num_heads: int = 12,
            qkv_bias: bool = False,
            class_token: bool = False,
            embed_layer=LinearPatchEmbed,
            gwl: bool = True,
            self_attn: bool = True,
            ablation: Optional[str] = None,
            **kwargs,
    ):
        # the GWL's arguments (num_slots, bottleneck, beta, ...) are the GWL's: its signature is their one source
        gwl_kwargs = {name: kwargs.pop(name) for name in GWL_ARGS if name in kwargs}
        gwl_kwargs.update({name: kwargs.pop(alias) for alias, name in _GWL_ALIASES.items() if alias in kwargs})
        if gwl_kwargs.get('bottleneck', 0) is None:
            raise ValueError("bottleneck=None is ambiguous: timm.create_model drops a None argument (the default "
                             "top-k), while configs of earlier timm-ait versions record the dense ablation as None; "
                             "pass bottleneck='none' for the dense ablation (e.g. create_model('hf-hub:...', "
                             "pretrained=True, bottleneck='none')) or an integer k")
        if ablation is not None:
            if ablation not in ABLATIONS:
                raise ValueError(f'unknown ablation {ablation!r}; expected one of {sorted(ABLATIONS)}')
            overrides = dict(ABLATIONS[ablation])
            gwl = overrides.pop('gwl', gwl)
            self_attn = overrides.pop('self_attn', self_attn)
            gwl_kwargs.update(overrides)
        gwl, self_attn = to_bool('gwl', gwl), to_bool('self_attn', self_attn)
        qkv_bias, class_token = to_bool('qkv_bias', qkv_bias), to_bool('class_token', class_token)
        embed_dim, depth, num_heads = to_int('embed_dim', embed_dim), to_int('depth', depth), to_int('num_heads', num_heads)
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim {embed_dim} is not divisible by num_heads {num_heads}')
        for size in (patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,)):
            to_int('patch_size', size, what='an integer, or a pair of them')
        if gwl:  # a bad GWL setting fails when the first block is built, naming the setting
            mlp_layer = partial(GlobalWorkspaceLayer, **gwl_kwargs)
        else:
            mlp_layer = kwargs.pop('mlp_layer', Mlp)
        kwargs.setdefault('norm_layer', partial(LayerNorm, eps=1e-5))  # the authors' nn.LayerNorm default
        if global_pool == 'flatten':
            # the authors' head: no final LN(D), an LN over the flattened tokens instead
            kwargs.setdefault('final_norm', False)
            if num_classes == 0:
                # that LN belongs to the classifier: built without one, the model returns its tokens
                # (B, N, D), as timm's ViT with global_pool='' (reset_classifier(0) keeps the LN)
                global_pool = ''
        flatten = global_pool == 'flatten'
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=num_classes,
            global_pool='' if flatten else global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            class_token=class_token,
            embed_layer=embed_layer,
            mlp_layer=mlp_layer,
            block_fn=partial(AiTBlock, self_attn=self_attn),
            **kwargs,
        )
        self.has_gwl = gwl
        self.num_suffix_tokens = 0  # tokens after the patches (the question-answering model has one)
        self.memory_reset_each_epoch = ablation == 'reset_memory'
        # feature level 0: the tokens entering the first block (see forward_intermediates)
        self.feature_info = [dict(self.feature_info[0], module='norm_pre')] + self.feature_info
        if flatten:
            dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
            self.global_pool = 'flatten'
            num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
            self.head_hidden_size = num_tokens * embed_dim
            self.fc_norm = nn.LayerNorm(self.head_hidden_size, **dd)
            self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
            if kwargs.get('weight_init', '') != 'skip':
                self.init_weights(needs_reset=False)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if self.global_pool == 'flatten' and isinstance(self.head, nn.Linear):
            # timm's std 0.02 over N*D inputs would start with logits of std 0.02*sqrt(N*D) (about 4 at
            # CIFAR size); scale it so they start as a ViT's pooled head does, 0.02*sqrt(D)
            trunc_normal_(self.head.weight, std=.02 * (self.embed_dim / self.head_hidden_size) ** 0.5)

    @torch.jit.ignore
    def balance_loss(self) -> Optional[torch.Tensor]:
        """Balance loss of the last training forward, summed over heads and layers, detached (None in eval)."""
        return _balance_loss(self)

    @torch.jit.ignore
    def settings(self) -> Dict[str, Any]:
        """What the model computes with beyond its weights' shapes: per block, self-attention and GWL settings."""
        return {f'blocks.{i}': dict(self_attn=blk.attn is not None, **(
            blk.mlp.settings() if isinstance(blk.mlp, GlobalWorkspaceLayer) else dict(gwl=False)))
            for i, blk in enumerate(self.blocks)}

    @torch.jit.ignore
    def check_checkpoint_arch(self, checkpoint: Dict[str, Any], what: str = 'checkpoint') -> None:
        """Refuse a training checkpoint whose run built the model with other settings than this one's.

        A beta, a k or an ablation changes what the model computes but no weight's shape, so such weights
        would load silently into another function. The run's model is rebuilt, without weights, from the
        checkpoint's ``arch`` and ``args.model_kwargs`` and the two models' settings compared.
        """
        arch, args = checkpoint.get('arch'), checkpoint.get('args')
        args = vars(args) if hasattr(args, '__dict__') else (args if isinstance(args, dict) else None)
        if not isinstance(arch, str) or args is None or not timm.is_model(arch):
            return  # not a training checkpoint of this project's: nothing says how it was built
        run_kwargs = upgrade_model_kwargs(args.get('model_kwargs') or {})
        with torch.device('meta'):
            trained = timm.create_model(arch, **run_kwargs)
        if not isinstance(trained, AssociativeTransformer):
            raise ValueError(f'{what} holds a {arch!r} ({type(trained).__name__}), not an {type(self).__name__}')
        ours, theirs = self.settings(), trained.settings()
        if ours != theirs:
            diffs = sorted({f'{k}={theirs[b].get(k)!r} (this model: {ours[b].get(k)!r})'
                            for b in ours.keys() & theirs.keys() for k in ours[b].keys() | theirs[b].keys()
                            if ours[b].get(k) != theirs[b].get(k)})
            raise ValueError(f'{what} was trained as {arch!r} with {_kwargs_text(run_kwargs)}: '
                             f'{", ".join(diffs) or "another depth"}. The weights fit either model but compute '
                             f'another function: build the model with the run\'s --model-kwargs')

    @torch.jit.ignore
    def reset_memory(self) -> None:
        """Re-initialise the memory of every GWL."""
        _reset_memory(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre',
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))],
        )

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """Run at another image size, as timm's ViT: the position embedding is resampled to the new patch grid.

        The flatten head's per-token weights (its LayerNorm's and the classifier's) are resampled like it,
        the classifier's scaled by old / new token count so that its sum over tokens keeps its size. The
        patch size is fixed (the patch LayerNorm is sized for it).
        """
        if patch_size is not None and to_2tuple(patch_size) != self.patch_embed.patch_size:
            raise ValueError(f'{type(self).__name__} cannot change its patch size {self.patch_embed.patch_size} '
                             f'(got {patch_size}): its patch LayerNorm is sized for it')
        old_grid = self.patch_embed.grid_size
        super().set_input_size(img_size=img_size)
        if self.global_pool == 'flatten' and self.patch_embed.grid_size != old_grid:
            self._resample_flatten_head(old_grid)

    @torch.no_grad()
    def _resample_flatten_head(self, old_grid: Tuple[int, int]) -> None:
        D, P = self.embed_dim, self.num_prefix_tokens
        # tokens other than prefix and patches (the question token of the relational model) come last
        num_tokens = self.head_hidden_size // D
        Q = num_tokens - P - old_grid[0] * old_grid[1]
        new_grid = self.patch_embed.grid_size
        new_tokens = P + new_grid[0] * new_grid[1] + Q

        def resample(v: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            # (..., T * D) -> (..., T' * D), each leading index resampled over the patch grid like a pos embed
            lead = v.shape[:-1]
            v = v.reshape(-1, num_tokens, D).transpose(0, 1)  # T, L, D
            grid = v[P:num_tokens - Q].reshape(1, -1, v.shape[1] * D)
            grid = resample_abs_pos_embed(grid, new_size=new_grid, old_size=old_grid, num_prefix_tokens=0)
            grid = grid.reshape(-1, v.shape[1], D) * scale
            v = torch.cat([v[:P], grid, v[num_tokens - Q:]]).transpose(0, 1)
            return v.reshape(*lead, new_tokens * D)

        def replace(module: nn.Module, name: str, scale: float = 1.0) -> None:
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(resample(old, scale), requires_grad=old.requires_grad))

        if isinstance(self.fc_norm, nn.LayerNorm):
            for name in ('weight', 'bias'):
                if getattr(self.fc_norm, name) is not None:
                    replace(self.fc_norm, name)
            self.fc_norm.normalized_shape = (new_tokens * D,)
        if isinstance(self.head, nn.Linear):
            replace(self.head, 'weight', (num_tokens - P - Q) / (new_tokens - P - Q))
            self.head.in_features = new_tokens * D
        self.head_hidden_size = new_tokens * D

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if self.global_pool != 'flatten':
            if global_pool == 'flatten':
                raise ValueError("cannot switch to global_pool='flatten' after construction; "
                                 "create the model with it")
            return super().reset_classifier(num_classes, global_pool)
        if global_pool not in (None, 'flatten', ''):
            raise ValueError(f"a model built with global_pool='flatten' can only reset to 'flatten' or '' "
                             f"(no pooling), got {global_pool!r}")
        self.num_classes = num_classes
        if global_pool == '':
            self.global_pool = ''
            self.fc_norm = nn.Identity()
            self.head_hidden_size = self.embed_dim
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.head_hidden_size, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == 'flatten':
            return x.flatten(1)
        # VisionTransformer.pool, written out: TorchScript has no super()
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens:]
            return self.attn_pool(x)
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens,
                               reduce_include_prefix=self.pool_include_prefix)

    def _feature_levels(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]],
            norm: bool,
            stop_early: bool,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the blocks on the embedded tokens ``x``; keep the feature levels ``indices`` asks for.

        Level 0 is ``x`` itself, level i the output of block i - 1. Returns the last tokens computed
        and the levels taken.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        levels = [self.norm(x) if norm else x] if 0 in take_indices else []
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i + 1 in take_indices:
                levels.append(self.norm(x) if norm else x)
        return x, levels

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's ViT ``forward_intermediates`` with one more feature level, first: the embedded tokens.

        Level 0 is the input of the first block (patch and position embedding, ``norm_pre``), level i
        the output of block i - 1, so that ``feature_info`` has depth + 1 levels and the 2-block AiTs
        have the three that timm's feature API takes by default (``features_only`` takes the last 3).
        ``indices``: the last n levels if an int, all if None, else these levels.
        """
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return self._intermediates(tokens, indices, return_prefix_tokens, norm, stop_early, output_fmt,
                                   intermediates_only)

    def _intermediates(
            self,
            tokens: torch.Tensor,
            indices: Optional[Union[int, List[int]]],
            return_prefix_tokens: bool,
            norm: bool,
            stop_early: bool,
            output_fmt: str,
            intermediates_only: bool,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The body of ``forward_intermediates`` from the embedded tokens (prefix, patches, suffix).

        The intermediates hold the patch tokens (as a grid for 'NCHW'); with ``return_prefix_tokens`` each
        comes with its other tokens, the prefix tokens then the ``num_suffix_tokens`` after the patches
        (the question token of the question-answering model), (B, prefix + suffix, D).
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        B = tokens.shape[0]
        x, intermediates = self._feature_levels(tokens, indices, norm, stop_early)
        P, S = self.num_prefix_tokens, self.num_suffix_tokens
        others = [torch.cat([y[:, :P], y[:, y.shape[1] - S:]], dim=1) for y in intermediates]
        intermediates = [y[:, P:y.shape[1] - S] for y in intermediates]
        if output_fmt == 'NCHW':
            H, W = self.patch_embed.grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens and P + S:
            intermediates = list(zip(intermediates, others))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last feature level ``indices`` takes (levels as in forward_intermediates)."""
        take_indices, max_index = feature_take_indices(len(self.blocks) + 1, indices)
        self.blocks = self.blocks[:max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices


# The authors' checkpoints (github.com/yuweisunn/associative-transformer: vit_hn.py with ait.py's
# ModularNN as each block's feed-forward) in this module's names. Their GWL is
# fc1 -> GELU -> fc2 -> norm, memoryupdate (memory, mha = the bottleneck write), fc3 (the up-projection
# of the read); their Hopfield layer is static and has no weights.
_AUTHORS_KEYS = (
    (r'^to_patch_embedding\.1\.', 'patch_embed.norm_in.'),
    (r'^to_patch_embedding\.2\.', 'patch_embed.proj.'),
    (r'^to_patch_embedding\.3\.', 'patch_embed.norm.'),
    (r'^transformer\.layers\.(\d+)\.0\.norm\.', r'blocks.\1.norm1.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.', r'blocks.\1.attn.qkv.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.', r'blocks.\1.attn.proj.'),
    (r'^transformer\.layers\.(\d+)\.1\.norm\.', r'blocks.\1.norm2.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.(fc1|fc2|norm)\.', r'blocks.\1.mlp.\2.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.fc3\.', r'blocks.\1.mlp.read.up.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.memory$', r'blocks.\1.mlp.memory.memory'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.mha\.w_qs\.', r'blocks.\1.mlp.write_attn.q.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.mha\.w_ks\.', r'blocks.\1.mlp.write_attn.k.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.mha\.w_vs\.', r'blocks.\1.mlp.write_attn.v.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.mha\.fc\.', r'blocks.\1.mlp.write_attn.proj.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.mha\.layer_norm\.', r'blocks.\1.mlp.write_norm.'),
    (r'^mlp_head\.0\.', 'fc_norm.'),
    (r'^mlp_head\.1\.', 'head.'),
)
# built by their code but never used in its forward: the conv stem, class token, position
# embedding, and the EWMA factor kept as a buffer (0.9, the ``smoothing`` argument here)
_AUTHORS_UNUSED = re.compile(r'^(to_patch_embedding_cnn\.|cls_token$|pos_embedding$|.*\.memoryupdate\.beta$)')


_AUTHORS_WRITE_PROJ = re.compile(r'^(transformer\.layers\.\d+\.1\.fn\.memoryupdate)\.mha\.fc\.weight$')
_AUTHORS_SMOOTHING = re.compile(r'^transformer\.layers\.(\d+)\.1\.fn\.memoryupdate\.beta$')


def _heads_concatenated(weight: torch.Tensor, prefix: str, state_dict: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Their write's output projection with its inputs in our head order.

    Their MHA.py stacks the per-head outputs as (slots, heads, head_dim) and transposes them to
    (slots, head_dim, heads) before ``fc``, so its input index is ``d * H + h``; ours concatenates
    the heads, ``h * head_dim + d``. Their head size is the slot size m (d_k = d_v = memory_dim).
    """
    memory = state_dict.get(f'{prefix}.memory')
    if memory is None:
        raise ValueError(f'authors\' checkpoint: {prefix}.mha.fc.weight without {prefix}.memory')
    head_dim = memory.shape[1]
    if weight.ndim != 2 or weight.shape[1] % head_dim:
        raise ValueError(f'authors\' checkpoint: {prefix}.mha.fc.weight has shape {tuple(weight.shape)}, '
                         f'expected (m, heads * m) with slot size m = {head_dim}')
    heads = weight.shape[1] // head_dim
    return weight.reshape(weight.shape[0], head_dim, heads).transpose(1, 2).reshape(weight.shape)


def convert_authors_checkpoint(state_dict: Dict[str, torch.Tensor], model: AssociativeTransformer) -> Dict[str, torch.Tensor]:
    """The authors' AiT state dict in this model's names and layout.

    Keys are renamed; the write's output projection gets its inputs in our head order (see
    ``_heads_concatenated``); their EWMA factor, a buffer there, must equal the model's ``smoothing``.
    Their forward adds no position embedding, so a model with one gets zeros: the same function.
    Their memory rows are unit-normalised after each write; build the model with
    ``memory_l2norm=True`` to keep training it their way (eval reads the stored memory either way).
    """
    out = {}
    for key, value in state_dict.items():
        found = _AUTHORS_SMOOTHING.match(key)
        if found:
            layer = int(found.group(1))
            memory = getattr(model.blocks[layer].mlp, 'memory', None) if layer < len(model.blocks) else None
            if memory is not None and abs(float(value) - memory.smoothing) > 1e-6:
                raise ValueError(f'{key} = {float(value):g}: the checkpoint was trained with EWMA smoothing '
                                 f'{float(value):g}, the model has smoothing={memory.smoothing:g}')
        if _AUTHORS_UNUSED.match(key):
            continue
        found = _AUTHORS_WRITE_PROJ.match(key)
        if found:
            value = _heads_concatenated(value, found.group(1), state_dict)
        for pattern, replacement in _AUTHORS_KEYS:
            new_key, found = re.subn(pattern, replacement, key)
            if found:
                key = new_key
                break
        out[key] = value
    if getattr(model, 'pos_embed', None) is not None and 'pos_embed' not in out:
        out['pos_embed'] = torch.zeros_like(model.pos_embed)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AssociativeTransformer) -> Dict[str, torch.Tensor]:
    """Unwrap a training checkpoint, convert the authors' names, and check it against ``model``.

    Accepts a bare state dict or a timm training checkpoint (``state_dict`` / ``model`` key,
    ``module.`` prefixes from DDP), and the authors' checkpoints (``convert_authors_checkpoint``).
    Raises a ValueError naming every missing, unexpected or mis-shaped key, so a checkpoint of
    another variant never loads silently or half-way. The classifier's shape is left to timm, which
    resets it when ``num_classes`` differs.
    """
    source = source_checkpoint(state_dict, model)  # a damaged training checkpoint is refused
    if source is not None:
        model.check_checkpoint_arch(source, 'the checkpoint')
    for key in ('state_dict', 'model'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    if any(k.startswith(('to_patch_embedding.', 'transformer.layers.')) for k in state_dict):
        state_dict = convert_authors_checkpoint(state_dict, model)
    if model.num_classes == 0:
        # a model built without classes (features, as timm's num_classes=0) has no classifier, and a flatten
        # head's LayerNorm belongs to that classifier: load the rest, as timm does for its ViTs
        own = model.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(('head.', 'fc_norm.'))}
    check_state_dict(state_dict, model, ignore=('head.weight', 'head.bias'))
    return state_dict


def upgrade_model_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """A saved run's model keyword arguments as this version reads them: runs recorded the dense
    ablation as ``bottleneck=None``, which is now written ``'none'``."""
    kwargs = dict(kwargs)
    if 'bottleneck' in kwargs and kwargs['bottleneck'] is None:
        kwargs['bottleneck'] = 'none'
    return kwargs


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'the default settings'


def _create_ait(variant: str, pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    # features_only: the last 3 feature levels (depth + 1 of them, see forward_intermediates)
    out_indices = kwargs.pop('out_indices', min(3, kwargs.get('depth', 2) + 1))
    with explain_download_errors(variant, kwargs):
        return build_model_with_cfg(
            AssociativeTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 10,
        'input_size': (3, 32, 32),
        'pool_size': None,
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': CIFAR_MEAN,
        'std': CIFAR_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2309.12862',
        'paper_name': 'Associative Transformer',
        **kwargs,
    }


def _cifar_cfgs(name: str, weights_of: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
    weights_of = weights_of or name
    return {
        f'{name}.cifar10': _cfg(hf_hub_id=hf_hub_id(weights_of, 'cifar10')),
        f'{name}.cifar100': _cfg(hf_hub_id=hf_hub_id(weights_of, 'cifar100'), num_classes=100),
    }


def _triangle_cfg(name: str) -> Dict[str, Dict[str, Any]]:
    return {f'{name}.triangle': _cfg(
        hf_hub_id=hf_hub_id(name, 'triangle'), num_classes=2, input_size=(3, 64, 64),
        mean=(0., 0., 0.), std=(1., 1., 1.))}


def _pet_cfg(name: str) -> Dict[str, Dict[str, Any]]:
    return {f'{name}.pet': _cfg(
        hf_hub_id=hf_hub_id(name, 'pet'), num_classes=37, input_size=(3, 224, 224),
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, crop_pct=1.0)}


default_cfgs = generate_default_cfgs({
    **_cifar_cfgs('ait_small_patch4_32'),
    **_cifar_cfgs('ait_medium_patch4_32'),
    **_cifar_cfgs('ait_base_patch4_32'),
    **_triangle_cfg('ait_small_patch32_64'),
    **_triangle_cfg('ait_medium_patch32_64'),
    **_triangle_cfg('ait_base_patch32_64'),
    **_pet_cfg('ait_small_patch16_224'),
    **_pet_cfg('ait_medium_patch16_224'),
    **_pet_cfg('ait_base_patch16_224'),
    # the short names are the CIFAR variants and share their weights
    **_cifar_cfgs('ait_small', 'ait_small_patch4_32'),
    **_cifar_cfgs('ait_medium', 'ait_medium_patch4_32'),
    **_cifar_cfgs('ait_base', 'ait_base_patch4_32'),
})

_SIZES = dict(
    small=dict(embed_dim=768, depth=2, num_heads=12),
    medium=dict(embed_dim=768, depth=6, num_heads=12),
    base=dict(embed_dim=768, depth=12, num_heads=12),
)
# per dataset: image and patch size, bottleneck k and memory slots (paper Table 7);
# num_classes comes from the pretrained cfg of the tag asked for, as in timm
_CIFAR = dict(img_size=32, patch_size=4, bottleneck=512, num_slots=32)
_TRIANGLE = dict(img_size=64, patch_size=32, bottleneck=64, num_slots=32)
_PET = dict(img_size=224, patch_size=16, bottleneck=512, num_slots=128)


def _ait(variant: str, size: str, setting: dict, pretrained: bool, **kwargs) -> AssociativeTransformer:
    return _create_ait(variant, pretrained=pretrained, **{**_SIZES[size], **setting, **kwargs})


@register_model
def ait_small_patch4_32(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Small (2 blocks), 32x32 images, patch 4: CIFAR settings (k=512, 32 slots)."""
    return _ait('ait_small_patch4_32', 'small', _CIFAR, pretrained, **kwargs)


@register_model
def ait_medium_patch4_32(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Medium (6 blocks), 32x32 images, patch 4: CIFAR settings (k=512, 32 slots)."""
    return _ait('ait_medium_patch4_32', 'medium', _CIFAR, pretrained, **kwargs)


@register_model
def ait_base_patch4_32(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Base (12 blocks), 32x32 images, patch 4: CIFAR settings (k=512, 32 slots)."""
    return _ait('ait_base_patch4_32', 'base', _CIFAR, pretrained, **kwargs)


@register_model
def ait_small_patch32_64(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Small, 64x64 images, patch 32: Triangle settings (k=64, 32 slots)."""
    return _ait('ait_small_patch32_64', 'small', _TRIANGLE, pretrained, **kwargs)


@register_model
def ait_medium_patch32_64(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Medium, 64x64 images, patch 32: Triangle settings (k=64, 32 slots)."""
    return _ait('ait_medium_patch32_64', 'medium', _TRIANGLE, pretrained, **kwargs)


@register_model
def ait_base_patch32_64(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Base, 64x64 images, patch 32: Triangle settings (k=64, 32 slots)."""
    return _ait('ait_base_patch32_64', 'base', _TRIANGLE, pretrained, **kwargs)


@register_model
def ait_small_patch16_224(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Small, 224x224 images, patch 16: Oxford Pet settings (k=512, 128 slots)."""
    return _ait('ait_small_patch16_224', 'small', _PET, pretrained, **kwargs)


@register_model
def ait_medium_patch16_224(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Medium, 224x224 images, patch 16: Oxford Pet settings (k=512, 128 slots)."""
    return _ait('ait_medium_patch16_224', 'medium', _PET, pretrained, **kwargs)


@register_model
def ait_base_patch16_224(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Base, 224x224 images, patch 16: Oxford Pet settings (k=512, 128 slots)."""
    return _ait('ait_base_patch16_224', 'base', _PET, pretrained, **kwargs)


@register_model
def ait_small(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Small with CIFAR settings; the same model as ``ait_small_patch4_32``."""
    return _ait('ait_small', 'small', _CIFAR, pretrained, **kwargs)


@register_model
def ait_medium(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Medium with CIFAR settings; the same model as ``ait_medium_patch4_32``."""
    return _ait('ait_medium', 'medium', _CIFAR, pretrained, **kwargs)


@register_model
def ait_base(pretrained: bool = False, **kwargs) -> AssociativeTransformer:
    """AiT-Base with CIFAR settings; the same model as ``ait_base_patch4_32``."""
    return _ait('ait_base', 'base', _CIFAR, pretrained, **kwargs)
