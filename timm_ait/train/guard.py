"""Training steps that never read the device: non-finite updates skipped on the device, metrics kept there.

A GradScaler skips an update whose gradients are not finite, but decides it on the host (a read of
its found-inf flag every step). :class:`FiniteUpdates` decides on the device: it saves the parameters
and the optimizer state before the step and puts them back with ``torch.where`` after it when the
loss or the gradients were not finite, so such a value never reaches the weights and the host does
not wait. The skips are counted on the device, and :class:`StepMeters` keeps the summed losses there;
the training loop reads both at its log interval, in one transfer.
"""
from typing import Callable, Optional, Sequence

import torch

__all__ = ['FiniteUpdates', 'StepMeters']


class FiniteUpdates:
    """The optimizer's updates, each made only if the losses since the previous one and the gradients
    are finite.

    ``observe(values, batch)`` once per forward (``values[0]``: the loss), then ``step(fn, batch)`` for
    the update: ``fn`` runs the optimizer step (clipping, a GradScaler, ...). ``reduce``: a function
    that makes the skip decision the same on every rank (a MAX all-reduce of a flag) under
    distributed training. ``check_grads=False`` leaves the gradients to a GradScaler, which skips
    overflowed ones itself (a scaled fp16 gradient overflows without the training diverging).

    The state restored is every tensor of the optimizer's state on the parameters' devices. A state
    tensor kept on the host (Adam's step count, unless ``capturable``) is left as the step made it:
    restoring it would need a read of the device's decision, and the loop stops at its next read.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, check_grads: bool = True,
                 reduce: Optional[Callable[[torch.Tensor], None]] = None):
        self.optimizer = optimizer
        self.check_grads = check_grads
        self.reduce = reduce
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._bad = torch.zeros((), dtype=torch.bool, device=device)
        # the first skipped step: [batch number (1-based, 0: none yet), loss, task loss, balance, aux]
        self.first = torch.zeros(5, dtype=torch.float64, device=device)

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group['params']]

    def _record(self, bad: torch.Tensor, batch: int, values: torch.Tensor) -> None:
        record = torch.cat([torch.full((1,), float(batch + 1), dtype=torch.float64, device=values.device),
                            values.detach().to(torch.float64)])
        torch.where((self.first[0] == 0) & bad, record, self.first, out=self.first)

    def observe(self, values: torch.Tensor, batch: int) -> None:
        """Note a forward's losses (``values[0]`` is the loss the update follows)."""
        bad = ~torch.isfinite(values[0])
        self._bad |= bad
        self._record(bad, batch, values)

    def step(self, step_fn: Callable[[], None], batch: int, values: torch.Tensor) -> None:
        """Run ``step_fn`` (the optimizer update) and undo it if it was not finite."""
        params = self._params()
        if self.check_grads:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                norms = torch.stack(torch._foreach_norm(grads, float('inf')))
                grads_bad = ~torch.isfinite(norms).all()
                self._record(grads_bad & ~self._bad, batch, values)
                self._bad |= grads_bad
        if self.reduce is not None:
            self.reduce(self._bad)
        device = self._bad.device
        tensors = params + [v for p in params for v in self.optimizer.state.get(p, {}).values()
                            if isinstance(v, torch.Tensor) and v.device == device]
        saved = [t.detach().clone() for t in tensors]
        step_fn()
        # state the step created (its first) has nothing to go back to; it is reset with the rest
        # when the run stops at the next read
        with torch.no_grad():
            for t, before in zip(tensors, saved):
                t.copy_(torch.where(self._bad, before, t))
        self.skipped += self._bad
        self._bad.zero_()


class StepMeters:
    """Sums of per-item losses over the steps of an epoch, kept on the device.

    ``update(values, n)`` adds ``values * n`` (as timm's AverageMeter does with ``val * n``), in
    float64 where the device has it, so that the averages are the meters' to the last bit.
    """

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = list(names)
        dtype = torch.float32 if device.type == 'mps' else torch.float64
        self.sums = torch.zeros(len(self.names), dtype=dtype, device=device)
        self.last = torch.zeros(len(self.names), dtype=dtype, device=device)
        self.count = 0

    def update(self, values: torch.Tensor, n: int) -> None:
        self.last = values.detach().to(self.sums.dtype)
        self.sums += self.last * n
        self.count += n

    def read(self, *extra: torch.Tensor, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """``(last, avg, extras)``: the last step's values and the averages as dicts of floats, and
        ``extra`` tensors' values, in one transfer from the device. ``reduce`` averages the losses over
        ranks first."""
        losses = torch.cat([self.last, self.sums])
        if reduce is not None:
            losses = reduce(losses)
        flat = torch.cat([losses.to(torch.float64)] + [t.reshape(-1).to(torch.float64) for t in extra]).tolist()
        k = len(self.names)
        last = dict(zip(self.names, flat[:k]))
        avg = {name: s / max(self.count, 1) for name, s in zip(self.names, flat[k:2 * k])}
        rest, i = [], 2 * k
        for t in extra:
            rest.append(flat[i:i + t.numel()])
            i += t.numel()
        return last, avg, rest
