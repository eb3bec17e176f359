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

    ``observe(values, batch)`` once per forward (``values[0]``: the loss), then ``step(fn, batch,
    values)`` for the update: ``fn`` runs the optimizer step (clipping, a GradScaler, ...). ``reduce``:
    a function that makes the skip decision the same on every rank (in place, on the device) under
    distributed training. ``check_grads=False`` leaves the gradients to a GradScaler, which skips
    overflowed ones itself (a scaled fp16 gradient overflows without the training diverging).

    How a step is skipped without a host read: the parameters are copied before it; a non-finite step
    has its gradients zeroed (so it computes finite values), and after it every parameter is
    ``lerp``-ed to its copy with weight 1 (skip) or 0 (keep), exact both ways (but for a -0.0 weight,
    which may come back +0.0): no value of a non-finite step reaches the weights. The optimizer's
    state is not put back (a third of the cost): a skipped step leaves it as a step on zero gradients
    does (Adam's moments decayed once), and the loop stops at its next read, so it is never used again.
    The guard costs a copy and a lerp of the parameters and two passes over the gradients a step.
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
        self._params_seen, self._saved = [], []

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

    def _copies(self, params: list) -> list:
        """Buffers for the parameters' values before a step (kept while the parameters are the same)."""
        if len(params) != len(self._params_seen) or any(a is not b for a, b in zip(params, self._params_seen)):
            self._params_seen, self._saved = params, [p.detach().clone() for p in params]
        return self._saved

    def step(self, step_fn: Callable[[], None], batch: int, values: torch.Tensor) -> None:
        """Run ``step_fn`` (the optimizer update) and undo it if it was not finite."""
        params = self._params()
        grads = [p.grad for p in params if p.grad is not None]
        if self.check_grads and grads:
            grads_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
            self._record(grads_bad & ~self._bad, batch, values)
            self._bad |= grads_bad
        if self.reduce is not None:
            self.reduce(self._bad)
        skip = self._bad.to(torch.float32)
        if self.check_grads and grads:  # a skipped step computes on zeros, not on NaN or inf
            for g in grads:
                torch.nan_to_num_(g, 0.0, 0.0, 0.0)
            torch._foreach_mul_(grads, 1.0 - skip)
        saved = self._copies(params)
        with torch.no_grad():
            torch._foreach_copy_(saved, params)
        step_fn()
        with torch.no_grad():
            weights = {dtype: skip.to(dtype) for dtype in {p.dtype for p in params}}
            torch._foreach_lerp_(params, saved, [weights[p.dtype] for p in params])
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
