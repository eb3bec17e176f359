"""Does a model use what its memory holds? Evaluate it with every GWL's memory swapped for another.

A GWL whose read matters loses accuracy when its memory is replaced; one that learned to ignore it (or
whose memory collapsed to something any memory can stand in for) does not. The swaps:

* ``'rotated'``: ``M R`` with one random orthogonal ``R`` (m x m) per layer. The lengths of the slots and
  the cosines between them are kept (``M R R^T M^T = M M^T``), so the memory has the same rank and the
  same collapse, but the up-projection reads other content.
* ``'random_orthogonal'``: orthonormal random rows scaled to the stored rows' lengths (when S > m, the
  unit-length rows of a random S x m matrix with orthonormal columns, a frame as close to orthogonal as
  m dimensions allow).
* ``'collapsed'``: every slot the mean slot (the memory one prior would give).
* ``'other_layer'``: each GWL gets the memory of the next GWL (cyclically); needs two GWLs whose
  memories have one shape.

There is no 'shuffled' swap: permuting the slots changes nothing in eval. The Hopfield read,
``softmax(beta xi Y^T) Y`` with ``Y = M Wup + b``, is a softmax-weighted sum over the slots, and the
cross-attention read attends over them without position, so both are invariant to the slot order (up
to the rounding of the summation order). Only the training write sees slot identity.

Everything runs in eval (no memory is written), and the stored memories are put back bit for bit,
even when the evaluation raises.
"""
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from .layers import GlobalWorkspaceLayer

__all__ = ['SWAPS', 'memory_swap_accuracy', 'swapped_memories', 'memory_swapped']

SWAPS = ('rotated', 'random_orthogonal', 'collapsed', 'other_layer')


def _gwl_memories(model: nn.Module) -> List[torch.Tensor]:
    memories = [m.memory.memory for m in model.modules() if isinstance(m, GlobalWorkspaceLayer)]
    if not memories:
        raise ValueError(f'{type(model).__name__} has no GlobalWorkspaceLayer whose memory could be swapped')
    return memories


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal n x n matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _can_swap_layers(memories: Sequence[torch.Tensor]) -> bool:
    return len(memories) > 1 and len({tuple(m.shape) for m in memories}) == 1


def swapped_memories(memories: Sequence[torch.Tensor], swap: str, seed: int = 0) -> List[torch.Tensor]:
    """The memories (each S x m) that ``swap`` puts in place of ``memories``, in their order and dtypes.

    Deterministic for a given ``seed``; random draws go layer by layer in the order given.
    """
    if swap not in SWAPS:
        raise ValueError(f'unknown memory swap {swap!r}; expected one of {SWAPS}')
    if swap == 'other_layer':
        if not _can_swap_layers(memories):
            raise ValueError(f"the 'other_layer' swap needs two or more memories of one shape, got shapes "
                             f'{[tuple(m.shape) for m in memories]}')
        return [memories[(i + 1) % len(memories)].clone() for i in range(len(memories))]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for memory in memories:
        m = memory.detach().double().cpu()
        num_slots, slot_dim = m.shape
        if swap == 'rotated':
            new = m @ _orthogonal(slot_dim, generator)
        elif swap == 'random_orthogonal':
            if num_slots <= slot_dim:
                rows = _orthogonal(slot_dim, generator)[:num_slots]
            else:
                rows = nn.functional.normalize(_orthogonal(num_slots, generator)[:, :slot_dim], dim=-1)
            new = rows * m.norm(dim=-1, keepdim=True)
        else:  # collapsed
            new = m.mean(0, keepdim=True).expand(num_slots, slot_dim)
        out.append(new.to(device=memory.device, dtype=memory.dtype))
    return out


@contextmanager
def memory_swapped(model: nn.Module, swap: str, seed: int = 0) -> Iterator[nn.Module]:
    """Within the block, every GWL of ``model`` holds the memory of :func:`swapped_memories`; the stored
    memories come back bit for bit on leaving it, also on an exception. The model's train/eval mode is
    not changed here (a training forward inside the block would write the swapped memory)."""
    memories = _gwl_memories(model)
    stored = [m.clone() for m in memories]
    replacements = swapped_memories(stored, swap, seed)
    try:
        with torch.no_grad():
            for memory, new in zip(memories, replacements):
                memory.copy_(new)
        yield model
    finally:
        with torch.no_grad():
            for memory, old in zip(memories, stored):
                memory.copy_(old)


@torch.no_grad()
def _accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    correct, seen = 0, 0
    for input, target in loader:
        if isinstance(input, (tuple, list)):  # images and questions
            output = model(*(t.to(device) for t in input))
        else:
            output = model(input.to(device))
        correct += (output.argmax(-1) == target.to(device)).sum().item()
        seen += target.shape[0]
    if not seen:
        raise ValueError('the evaluation loader yielded no samples')
    return 100.0 * correct / seen


def memory_swap_accuracy(
        model: nn.Module,
        loader: Iterable,
        swaps: Optional[Sequence[str]] = None,
        seed: int = 0,
) -> Dict[str, float]:
    """Top-1 accuracy (percent) of ``model`` in eval over ``loader`` with its stored memories (``'stored'``)
    and with each swap of ``swaps`` (see the module docstring; None: every swap that applies to the model,
    'other_layer' only with two GWL memories of one shape).

    ``loader`` yields ``(input, target)`` with ``input`` a tensor or a tuple of tensors (images and
    questions); they are moved to the device of the model's parameters. The model's memories and its
    train/eval mode are the same afterwards as before.
    """
    memories = _gwl_memories(model)
    if swaps is None:
        swaps = [s for s in SWAPS if s != 'other_layer' or _can_swap_layers(memories)]
    for swap in swaps:  # refuse before any evaluation
        if swap not in SWAPS:
            raise ValueError(f'unknown memory swap {swap!r}; expected one of {SWAPS}')
        if swap == 'other_layer' and not _can_swap_layers(memories):
            raise ValueError(f"the 'other_layer' swap needs two or more GWL memories of one shape, got shapes "
                             f'{[tuple(m.shape) for m in memories]}')
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        results = {'stored': _accuracy(model, loader, device)}
        for swap in swaps:
            with memory_swapped(model, swap, seed):
                results[swap] = _accuracy(model, loader, device)
    finally:
        model.train(was_training)
    return results
