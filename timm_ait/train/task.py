"""timm training task: cross-entropy plus any model's own ``aux_loss()`` (the hmixer ``lcoeff`` penalty),
with the AiT balance loss reported for logging (an AiT adds its balance term to the backward itself)."""
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn
from timm.task import ClassificationTask

from ..layers import DEFAULT_BALANCE_LOSS_COEF, GlobalWorkspaceLayer, balance_loss

__all__ = ['AiTClassificationTask', 'DEFAULT_BALANCE_LOSS_COEF', 'aux_loss']


def aux_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Sum of ``aux_loss()`` over the modules of ``model`` (wrappers included) that define one: loss
    terms a model adds to its training loss, already weighted, e.g. ``HamMixer``'s ``lcoeff`` penalty.
    None when no module has one to add."""
    losses = [m.aux_loss() for m in model.modules() if callable(getattr(m, 'aux_loss', None))]
    losses = [loss for loss in losses if loss is not None]
    return torch.stack(losses).sum() if losses else None


class AiTClassificationTask(ClassificationTask):
    """``loss = criterion(model(x), y) + aux_loss``, ``aux_loss`` that of :func:`aux_loss` (training only, as
    the authors of the hmixer penalty add it). A GWL's balance term is not added here: the model adds
    ``balance_loss_coef * balance`` to the backward of any loss computed from its output; the balance loss
    (summed over heads and layers of the last training forward) is in the result for logging. For models
    with neither this is timm's ClassificationTask. 'loss' is the objective (the balance term included, as a
    detached number: its gradient comes from the model).

    The input may be a tensor or a tuple of tensors (e.g. images and questions), passed to the model
    as positional arguments. The result holds 'loss', 'output', 'task_loss', 'balance_loss' and 'aux_loss'.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs,
                         device=device, dtype=dtype, verbose=verbose)

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
        # the objective the backward follows, for the log: the model's balance term is a detached number here
        term = [m.balance_loss_coef * m.balance_loss for m in self.trainable_module.modules()
                if isinstance(m, GlobalWorkspaceLayer) and m.balance_loss is not None] if self.training else []
        return {
            'loss': task_loss + aux + (torch.stack(term).sum() if term else 0.0),
            'output': output,
            'task_loss': task_loss,
            'balance_loss': balance.detach(),
            'aux_loss': aux.detach(),
        }
