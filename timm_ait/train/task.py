"""timm training task for AiT: cross-entropy plus the bottleneck attention balance loss, plus any
model's own ``aux_loss()`` (the hmixer ``lcoeff`` penalty)."""
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn
from timm.task import ClassificationTask

from ..layers import balance_loss

__all__ = ['AiTClassificationTask', 'DEFAULT_BALANCE_LOSS_COEF', 'aux_loss']

DEFAULT_BALANCE_LOSS_COEF = 1e-2  # lambda of the paper


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of ``aux_loss()`` over the modules of ``model`` (wrappers included) that define one: loss
    terms a model adds to its training loss, already weighted, e.g. ``HamMixer``'s ``lcoeff`` penalty.
    None when no module has one to add."""
    losses = [m.aux_loss() for m in model.modules() if callable(getattr(m, 'aux_loss', None))]
    losses = [loss for loss in losses if loss is not None]
    return torch.stack(losses).sum() if losses else None


class AiTClassificationTask(ClassificationTask):
    """``loss = criterion(model(x), y) + coef * balance_loss + aux_loss``, the balance loss summed over
    heads and layers of the last training forward, ``aux_loss`` that of :func:`aux_loss` (training only,
    as the authors of the hmixer penalty add it). For models with neither this is timm's ClassificationTask.

    The input may be a tensor or a tuple of tensors (e.g. images and questions), passed to the model
    as positional arguments. The result holds 'loss', 'output', 'task_loss', 'balance_loss' and 'aux_loss'.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            balance_loss_coef: float = DEFAULT_BALANCE_LOSS_COEF,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)
        self.balance_loss_coef = balance_loss_coef

    def forward(self, input, target) -> Dict[str, torch.Tensor]:
        inputs = input if isinstance(input, (tuple, list)) else (input,)
        output = self.trainable_module(*inputs)
        task_loss = self.criterion(output, target)
        balance = balance_loss(self.trainable_module) if self.training else None
        if balance is None:
            balance = task_loss.new_zeros(())
        aux = aux_loss(self.trainable_module) if self.training else None
        if aux is None:
            aux = task_loss.new_zeros(())
        return {
            'loss': task_loss + self.balance_loss_coef * balance + aux,
            'output': output,
            'task_loss': task_loss,
            'balance_loss': balance.detach(),
            'aux_loss': aux.detach(),
        }
