"""The balance loss as a term of the model's own backward, whatever loss the trainer computes.

A training forward of a GWL returns its output through :class:`AddBalanceTerm`: the identity in the
forward (outputs bit for bit), and in the backward it also sends ``coef * scale`` into the balance
loss's graph (Megatron-LM's ``MoEAuxLossAutoScaler`` does the same for the MoE auxiliary loss). So the
backward of any loss computed from the output adds ``coef * balance`` once per training forward: two
forwards in one backward count once each, a checkpointed block's recomputation adds nothing (its graph
is not the one backpropagated), and a forward never backpropagated leaves nothing behind.

``scale`` is the factor the trainer's backward puts on the loss beyond the loss itself: 1 by default,
right for float32, bfloat16 autocast and DDP (which averages the term with the gradients). A trainer that
scales (a float16 gradient scaler multiplies by S and later divides by S) or splits its loss (gradient
accumulation divided by k) must say so with ``timm_ait.set_balance_loss_scale``; the model cannot read that
factor from the gradient it receives. Undeclared, the two cases that Python can see without a host sync
are refused with :data:`FLOAT16_MESSAGE` (at the forward) and :data:`ACCUMULATION_MESSAGE` (at the second
backward with no parameter update since the first). The second check runs in eager mode only: a compiled
backward runs no Python, so a compiled model must be given its scale when the trainer accumulates.
"""
from typing import Optional, Union

import torch

__all__ = ['ACCUMULATION_MESSAGE', 'AddBalanceTerm', 'DEFAULT_BALANCE_LOSS_COEF', 'FLOAT16_MESSAGE',
           'check_balance_loss_coef', 'check_balance_loss_scale']

DEFAULT_BALANCE_LOSS_COEF = 1e-2  # lambda of the paper

_REMEDY = (
    'In your own loop, declare the factor your backward puts on the loss before each forward, with '
    'timm_ait.set_balance_loss_scale(model, scale) ({example}); or build the model with balance_loss_coef=0 '
    '(--model-kwargs balance_loss_coef=0) to train by the task loss alone.')
FLOAT16_MESSAGE = (
    'a training forward under float16 autocast with balance_loss_coef={coef}: the model adds its balance term '
    'to the backward itself, and a float16 gradient scaler (timm train.py --amp on CUDA) multiplies only the '
    "trainer's loss, so unscaling would divide the term away. Use bfloat16 autocast (timm train.py: "
    '--amp-dtype bfloat16). ' + _REMEDY.format(
        example='scaler.scale(torch.ones((), device=device)) with a GradScaler, 1.0 without one'))
ACCUMULATION_MESSAGE = (
    'two backwards carried the balance term of balance_loss_coef={coef} while the parameters did not change '
    'between them: gradient accumulation (timm train.py --grad-accum-steps > 1), a skipped optimizer step or a '
    "second backward of one forward. The model cannot tell how the trainer scales each micro-batch's loss "
    '(timm train.py divides it by --grad-accum-steps), so its term would count once per micro-batch. Use '
    '--grad-accum-steps 1 with a larger --batch-size. ' + _REMEDY.format(
        example='1 / k when each of k micro-batch losses is divided by k, 1.0 when they are summed'))


def check_balance_loss_coef(coef) -> float:
    """``coef`` as a float; a ValueError unless it is a real number >= 0."""
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
        raise ValueError(f'balance_loss_coef must be a number >= 0 (0 turns the balance term off), got {coef!r}')
    return float(coef)


class AddBalanceTerm(torch.autograd.Function):
    """``y = x``; the backward passes ``dy`` to ``x`` and ``grad_scale`` to ``balance``.

    ``grad_scale`` is a float or a 0-dim tensor (a declared scale kept on the device needs no host sync).
    ``on_backward``, if given, is called in the backward (eager only: the accumulation check).
    """

    @staticmethod
    def forward(ctx, x, balance, grad_scale, on_backward=None):
        ctx.on_backward = on_backward
        ctx.grad_is_tensor = isinstance(grad_scale, torch.Tensor)
        if ctx.grad_is_tensor:
            ctx.save_for_backward(grad_scale)
        else:
            ctx.grad_scale = grad_scale
        return x

    @staticmethod
    def backward(ctx, grad_x):
        if ctx.on_backward is not None:
            ctx.on_backward()
        if ctx.grad_is_tensor:
            grad_balance = ctx.saved_tensors[0].to(torch.float32)
        else:
            grad_balance = torch.full((), ctx.grad_scale, dtype=torch.float32, device=grad_x.device)
        return grad_x, grad_balance, None, None


def check_balance_loss_scale(scale: Optional[Union[float, torch.Tensor]]) -> None:
    """A ValueError unless ``scale`` is None, a number > 0 or a 0-dim floating tensor."""
    if scale is None:
        return
    if isinstance(scale, torch.Tensor):
        if scale.ndim != 0 or not scale.is_floating_point():
            raise ValueError(f'the balance loss scale must be a float or a 0-dim floating tensor, '
                             f'got a {scale.dtype} tensor of shape {tuple(scale.shape)}')
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f'the balance loss scale must be a number > 0 or a 0-dim tensor, got {scale!r}')
