""" Question-conditioned Associative Transformer, for relational reasoning (Sort-of-CLEVR)

The AiT paper's section 4.7: "we embedded the question using a learnable linear projection, with
layer normalization applied before and after the embedding. Then, the question embedding was
concatenated to the image patch embeddings as the input to AiT." Here that is one extra token,

    q = LN(D)(Linear(question_dim, D)(LN(question_dim)(question)))
    tokens = [prefix tokens] + [patches + pos_embed] + [q]

appended after the patches have their position embedding, and run through the blocks of
:class:`~timm_ait.models.ait.AssociativeTransformer` (this class subclasses it: blocks, GWL,
ablations, ViT twin with ``gwl=False``, balance loss and memory API are the parent's). With the
default 'flatten' head the classifier sees all N + 1 tokens: ``LN((N+1)*D) -> Linear``.

Choices:

* The question token has no separate learned position / type embedding. The bias of its last
  LayerNorm is already a learned vector added to this token only, so ``q + t`` would only
  re-parametrise that bias (and, like it, be free of weight decay in timm's optimiser factory,
  which exempts 1-D parameters). The authors' code adds no position embedding at all.
* The question token is appended after ``pos_drop`` and ``patch_drop``: dropout-on-embedding and
  patch dropout act on image patches only and never remove the question.
* The token sits last, so the patch tokens keep the indices they have in the image-only AiT and
  ``forward_intermediates`` can reshape them to a grid like timm's ViT.
* The question enters the GWL's bottleneck like any patch: the squashed pool of a batch is
  B * (N + 1) tokens (64 * 226 = 14,464 for the paper's setting; the paper's Appendix C quotes
  the 14.4k image patches).
* ``question_dim`` is a model argument (default 11: 6 colours, 2 kinds, 3 subtypes): timm's
  ``PretrainedCfg`` takes no arbitrary fields, so the cfg only names it in ``notes``.

Inputs are ``forward(images, questions)``: images (B, 3, 75, 75) in [0, 1] (mean 0, std 1 in
the cfg), questions (B, question_dim) floating point; the logits index the answers
``SORT_OF_CLEVR_ANSWERS``.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._manipulate import checkpoint_seq

from ..constants import SORT_OF_CLEVR_ANSWERS, SORT_OF_CLEVR_QUESTION_DIM
from ..hub import explain_download_errors, hf_hub_id
from ..layers.patch_embed import shape_str
from .ait import _SIZES, AssociativeTransformer, _cfg, checkpoint_filter_fn

__all__ = ['RelationalAssociativeTransformer', 'QuestionEmbed', 'SORT_OF_CLEVR_QUESTION_DIM',
           'SORT_OF_CLEVR_ANSWERS', 'check_questions']



@torch.fx.wrap
def check_questions(questions: torch.Tensor, question_dim: int, batch_size: int) -> torch.Tensor:
    """``questions`` itself if it is a (batch_size, question_dim) float tensor, else an error naming both.

    Like ``check_images``: an FX leaf that TorchScript compiles, returning its input so graphs keep it.
    """
    expected = f'(B, {question_dim})'
    if not isinstance(questions, torch.Tensor):
        raise TypeError(f'expected questions as a floating point tensor of shape {expected}, '
                        f'got {type(questions).__name__}')
    if not questions.is_floating_point():
        # TorchScript prints a dtype as its enum number
        dtype = 'a dtype that is not floating point' if torch.jit.is_scripting() else f'dtype {questions.dtype}'
        raise TypeError(f'expected floating point questions (one-hot float vectors) of shape {expected}, '
                        f'got {dtype}; convert them with .float()')
    if questions.ndim != 2 or questions.shape[1] != question_dim:
        raise ValueError(f'expected questions of shape {expected} (batch, question_dim), '
                         f'got {shape_str(questions.shape)}')
    if questions.shape[0] != batch_size:
        raise ValueError(f'got {batch_size} images but {questions.shape[0]} questions; '
                         'expected one question per image')
    return questions


class QuestionEmbed(nn.Module):
    """``LN(question_dim) -> Linear(question_dim, D) -> LN(D)``: a question vector as one token."""

    def __init__(self, question_dim: int, embed_dim: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.question_dim = question_dim
        self.norm_in = nn.LayerNorm(question_dim, **dd)
        self.proj = nn.Linear(question_dim, embed_dim, bias=bias, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.norm_in(q)))


class RelationalAssociativeTransformer(AssociativeTransformer):
    """AiT (or its ViT twin) that answers a question about an image: ``forward(images, questions)``.

    Takes every argument of :class:`AssociativeTransformer` (the variant functions set the
    Sort-of-CLEVR ones: 75x75 images, patch 5, bottleneck 256, 32 slots, 10 classes), plus:

    Args:
        question_dim: size of the question vectors (11 for Sort-of-CLEVR's one-hot questions).
    """

    def __init__(self, *args, question_dim: int = SORT_OF_CLEVR_QUESTION_DIM, **kwargs):
        if question_dim < 1:
            raise ValueError(f'question_dim must be >= 1, got {question_dim}')
        weight_init = kwargs.pop('weight_init', '')
        # the parent builds its head for N tokens; build everything first, initialise once below
        super().__init__(*args, weight_init='skip', **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        self.question_dim = question_dim
        self.num_question_tokens = self.num_suffix_tokens = 1
        self.question_embed = QuestionEmbed(question_dim, self.embed_dim, **dd)
        if self.global_pool == 'flatten':
            num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches + self.num_question_tokens
            self.head_hidden_size = num_tokens * self.embed_dim
            self.fc_norm = nn.LayerNorm(self.head_hidden_size, **dd)
            self.head = (nn.Linear(self.head_hidden_size, self.num_classes, **dd)
                         if self.num_classes > 0 else nn.Identity())
        if weight_init != 'skip':
            self.weight_init_mode = weight_init
            self.init_weights(needs_reset=False)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        matcher = super().group_matcher(coarse)
        matcher['stem'] = r'^cls_token|reg_token|pos_embed|patch_embed|question_embed|norm_pre'
        return matcher

    def embed_question(self, questions: torch.Tensor) -> torch.Tensor:
        """The question token, (B, 1, D)."""
        weight = self.question_embed.proj.weight
        return self.question_embed(questions.to(weight.dtype)).unsqueeze(1)

    def _embed(self, x: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """Tokens before the blocks: ``[prefix] + [patches + pos_embed] + [question]``."""
        x = self.patch_embed(x)  # checks the images
        questions = check_questions(questions, self.question_dim, x.shape[0])
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        q = self.embed_question(questions)
        x = torch.cat([x, q.to(x.dtype)], dim=1)
        return self.norm_pre(x)

    def forward_features(self, x: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """Token features (B, prefix + N + 1, D), the question token last."""
        x = self._embed(x, questions)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, questions: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, num_classes) for images (B, C, H, W) and questions (B, question_dim)."""
        return self.forward_head(self.forward_features(x, questions))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            questions: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The parent's ``forward_intermediates`` with the questions as second input: the same levels,
        and with ``return_prefix_tokens`` each level's prefix tokens then its question token."""
        return self._intermediates(self._embed(x, questions), indices, return_prefix_tokens, norm, stop_early,
                                   output_fmt, intermediates_only)

    def get_intermediate_layers(
            self,
            x: torch.Tensor,
            questions: torch.Tensor,
            n: Union[int, List[int], Tuple[int]] = 1,
            reshape: bool = False,
            return_prefix_tokens: bool = False,
            norm: bool = False,
    ) -> List[torch.Tensor]:
        return self.forward_intermediates(
            x, questions, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
            output_fmt='NCHW' if reshape else 'NLC', intermediates_only=True)


def _create_relational(variant: str, pretrained: bool = False, **kwargs) -> RelationalAssociativeTransformer:
    if kwargs.get('features_only'):
        raise ValueError(f'{variant} takes (images, questions): features_only is not supported; '
                         'use model.forward_intermediates(images, questions) instead')
    with explain_download_errors(variant, kwargs):
        return build_model_with_cfg(
            RelationalAssociativeTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=checkpoint_filter_fn,
            **kwargs,
        )


def _sort_of_clevr_cfg(name: str) -> Dict[str, Dict[str, Any]]:
    return {f'{name}.sort_of_clevr': _cfg(
        hf_hub_id=hf_hub_id(name, 'sort_of_clevr'), num_classes=len(SORT_OF_CLEVR_ANSWERS),
        input_size=(3, 75, 75), mean=(0., 0., 0.), std=(1., 1., 1.), label_names=SORT_OF_CLEVR_ANSWERS,
        notes=(f'forward(images, questions): questions are float one-hot vectors of size '
               f'{SORT_OF_CLEVR_QUESTION_DIM} (model argument question_dim)',))}


default_cfgs = generate_default_cfgs({
    **_sort_of_clevr_cfg('ait_small_patch5_75'),
    **_sort_of_clevr_cfg('ait_base_patch5_75'),
})

# paper Table 7 and Appendix C: 75x75, patch 5 (225 patches), k = 256, 32 slots
_SORT_OF_CLEVR = dict(img_size=75, patch_size=5, bottleneck=256, num_slots=32)


def _ait_relational(variant: str, size: str, pretrained: bool, **kwargs) -> RelationalAssociativeTransformer:
    return _create_relational(variant, pretrained=pretrained, **{**_SIZES[size], **_SORT_OF_CLEVR, **kwargs})


@register_model
def ait_small_patch5_75(pretrained: bool = False, **kwargs) -> RelationalAssociativeTransformer:
    """AiT-Small with a question token, 75x75 images, patch 5: Sort-of-CLEVR (k=256, 32 slots)."""
    return _ait_relational('ait_small_patch5_75', 'small', pretrained, **kwargs)


@register_model
def ait_base_patch5_75(pretrained: bool = False, **kwargs) -> RelationalAssociativeTransformer:
    """AiT-Base with a question token, 75x75 images, patch 5: Sort-of-CLEVR (k=256, 32 slots)."""
    return _ait_relational('ait_base_patch5_75', 'base', pretrained, **kwargs)


# CPU scale: the paper-size model (226 tokens of width 768) is too slow to train on a CPU (docs/results.md).
# This one keeps its two blocks, 32 slots of 32 and 8 GWL heads, narrowed to width 256 (4 heads of 64, as
# the authors' heads) with 15-pixel patches (25 patches + the question: an object of 11 px spans at most
# four). k = 32 keeps the paper's share of the pool (256 of 64 x 226, 1.8%; here 32 of 64 x 26, 1.9%).
default_cfgs.update(generate_default_cfgs({**_sort_of_clevr_cfg('ait_small_w256_patch15_75')}))


@register_model
def ait_small_w256_patch15_75(pretrained: bool = False, **kwargs) -> RelationalAssociativeTransformer:
    """CPU-scale AiT-Small for Sort-of-CLEVR: width 256, 4 heads, patch 15, k=32, 32 slots (2.16M; ViT twin 1.84M)."""
    model_args = dict(img_size=75, patch_size=15, embed_dim=256, depth=2, num_heads=4, bottleneck=32, num_slots=32)
    return _create_relational('ait_small_w256_patch15_75', pretrained=pretrained, **dict(model_args, **kwargs))
