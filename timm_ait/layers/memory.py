"""Explicit memory of low-rank priors (AiT section 3.2).

The memory ``M`` (slots x slot_dim) is state, not a trained parameter: a persistent buffer
that a training forward writes with an exponentially weighted moving average and that is
frozen in eval.
"""
import math
from typing import Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ['ExplicitMemory', 'MEMORY_INITS', 'decorrelation_step', 'is_recomputing', 'mean_abs_slot_cosine',
           'mean_slot_cosine', 'memory_by_layer', 'memory_participation_rank', 'memory_slot_similarity',
           'skipped_memory_writes']

MEMORY_INITS = ('gaussian', 'uniform', 'identity')

def is_recomputing() -> bool:
    """True while autograd's backward is running this forward again (gradient checkpointing).

    Such a recomputation must read the memory as it was before the step's write and must not
    write again, or the EWMA would be applied twice. A normal forward never runs inside a
    backward; compiled graphs recompute without re-running Python, so they never need this.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _training_process_group() -> Optional['dist.ProcessGroup']:
    """The process group of the DistributedDataParallel whose forward is running, or None.

    DDP marks the module whose forward it runs (``_active_ddp_module``, set in its ``_inside_ddp_forward``):
    only then is the forward one step of the distributed training of one model. A model run on one rank
    outside DDP (an analysis, a sweep, an ensemble) keeps its own memory and waits for no other rank.
    """
    ddp = getattr(DistributedDataParallel, '_active_ddp_module', None)
    return None if ddp is None else ddp.process_group


def _distributed_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the ranks of the DDP training this forward is part of; identity outside one."""
    group = _training_process_group()
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x / dist.get_world_size(group)


def decorrelation_step(memory: torch.Tensor, strength: float) -> torch.Tensor:
    """The change one step of orthogonal iteration makes to ``memory`` (S, m): for each row M_i, with unit rows
    ``u_i = M_i / |M_i|`` and cosines ``c_ij = u_i . u_j``, ``-strength |M_i| (I - u_i u_i^T) sum_{j != i} c_ij u_j``.

    That is a descent step on the squared cosines between slots along each row's sphere, so to first order the
    rows keep their lengths and only turn apart. The j = i term is along u_i, which the projection removes, so
    the sum runs over all j. A zero row stays zero. Computed in float32 or wider, outside autocast (it is
    tiny: S x S).
    """
    with torch.autocast(device_type=memory.device.type, enabled=False):
        m = memory.to(torch.promote_types(memory.dtype, torch.float32))
        norms = m.norm(dim=-1, keepdim=True)
        unit = m / norms.clamp_min(1e-12)
        push = (unit @ unit.t()) @ unit
        tangent = push - (push * unit).sum(-1, keepdim=True) * unit
        return (-strength * norms * tangent).to(memory.dtype)


class ExplicitMemory(nn.Module):
    """A bank of ``num_slots`` low-rank priors of size ``slot_dim``, updated by EWMA.

    Args:
        num_slots: number of priors S.
        slot_dim: size m of each prior.
        init: 'gaussian' (N(0, 1), the paper's default), 'uniform' (Graves et al. 2014:
            U(-b, b) with b = 1 / sqrt(S + m)) or 'identity' (ones on the diagonal).
        smoothing: weight of the old memory in the EWMA, ``M <- s * M + (1 - s) * M_hat``.
        l2_normalize: also scale each row of the written memory to unit length, as the
            authors' code does (their paper's equations do not). Off by default. The initial
            memory is not normalised either way (the authors' starts from raw N(0, 1)).
        decorrelation: strength of one :func:`decorrelation_step` taken after every write, which turns
            the slots apart (not in the paper; 0, the default, leaves the write exactly the paper's).
            With frozen weights the EWMA write drives every slot to one direction (or a +-v pair):
            all slots receive the same mean of the patches, and the slot-specific rest is repeated
            through one shared map. This step counters both.
    """

    def __init__(
            self,
            num_slots: int = 32,
            slot_dim: int = 32,
            init: str = 'gaussian',
            smoothing: float = 0.9,
            l2_normalize: bool = False,
            decorrelation: float = 0.0,
    ):
        super().__init__()
        if num_slots < 1 or slot_dim < 1:
            raise ValueError(f'memory needs num_slots >= 1 and slot_dim >= 1, got {num_slots} and {slot_dim}')
        if init not in MEMORY_INITS:
            raise ValueError(f'unknown memory_init {init!r}; expected one of {MEMORY_INITS}')
        if not 0.0 <= smoothing <= 1.0:
            raise ValueError(f'memory smoothing must be in [0, 1], got {smoothing}')
        # a string from a YAML config ('1e-2' is one) or a NaN fails here, not at the first write
        if isinstance(decorrelation, bool) or not isinstance(decorrelation, (int, float)) \
                or not 0.0 <= decorrelation <= 1.0:
            raise ValueError(f'memory decorrelation must be in [0, 1] (a number), got {decorrelation!r}')
        self.num_slots = num_slots
        self.slot_dim = slot_dim
        self.init = init
        self.smoothing = smoothing
        self.l2_normalize = l2_normalize
        self.decorrelation = float(decorrelation)
        self.register_buffer('memory', torch.empty(num_slots, slot_dim))
        # how many writes were skipped as non-finite; not saved, read outside the graph (skipped_memory_writes)
        self.register_buffer('skipped_writes', torch.zeros((), dtype=torch.long), persistent=False)
        self._before_write = None  # the memory a checkpointed recomputation must start from
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Re-initialise the priors (the paper's 'reset memory' ablation calls this each epoch)."""
        m = self.memory
        if self.init == 'gaussian':
            m.normal_(0.0, 1.0)
        elif self.init == 'uniform':
            bound = 1.0 / math.sqrt(self.num_slots + self.slot_dim)
            m.uniform_(-bound, bound)
        else:
            m.zero_()
            m.fill_diagonal_(1.0)
        # no row normalisation here even with l2_normalize: the authors' memory starts from raw
        # N(0, 1) and is normalised only after each write
        self._before_write = None

    def init_weights(self) -> None:
        # called by timm's ViT weight init (named_apply) in place of reset_parameters
        self.reset()

    def read(self) -> torch.Tensor:
        """The memory a forward should start from (a copy, so the write cannot alias it)."""
        if is_recomputing() and self._before_write is not None:
            return self._before_write
        return self.memory.clone()

    def write(self, candidate: torch.Tensor, current: torch.Tensor, empty: bool = False) -> torch.Tensor:
        """EWMA-write ``candidate`` (M_hat) over ``current`` (M) and store the result.

        Returns the new memory with its gradient to ``candidate``; the stored buffer is its
        detached value. In a forward under DistributedDataParallel the new memory is averaged over
        the ranks of its process group, so every rank stores (and reads) the same memory even if the
        ranks started from different ones (a per-rank reset, say); the gradient is the local one.

        A write with any non-finite value (a NaN or inf input, an overflow) is skipped whole: the
        memory stays as it was and the step reads it unchanged. The check runs on the rank average,
        which is non-finite on every rank as soon as one rank's write is, so all ranks skip together
        and keep the same finite memory. It is a ``torch.where`` in the graph (no Python branch on a
        value, so torch.compile captures it); each skip counts in :attr:`skipped_writes`, which
        :func:`skipped_memory_writes` reads outside the graph. ``empty``: the batch had no patches,
        so there is nothing to write (a rank with one passes its memory unchanged to the average).

        With ``decorrelation`` the step follows the rank average, so every rank takes the same step, on
        an empty batch too (another rank may have written). Its change carries no gradient (the
        gradient is the EWMA's), and with ``l2_normalize`` the rows are unit-normalised again after it.
        """
        if empty:
            new = current
        else:
            new = self.smoothing * current + (1.0 - self.smoothing) * candidate
            if self.l2_normalize:
                new = nn.functional.normalize(new, dim=-1)
        mean = _distributed_mean(new)
        if mean is not new:
            # forward: exactly the rank average (x - x is exactly 0), backward: the local gradient;
            # `new + (mean - new).detach()` would round differently on every rank
            new = mean + (new - new.detach())
        if self.decorrelation:
            new = new + decorrelation_step(new.detach(), self.decorrelation)
            if self.l2_normalize:
                new = nn.functional.normalize(new, dim=-1)
        finite = torch.isfinite(new).all()
        new = torch.where(finite, new, current.to(new.dtype))
        if not is_recomputing():
            self._before_write = current.detach()
            self.memory.copy_(new.detach())
            self.skipped_writes.add_((~finite).long())
        return new

    def slot_similarity(self) -> float:
        """:func:`mean_slot_cosine` of this memory."""
        return mean_slot_cosine(self.memory)

    def extra_repr(self) -> str:
        return (f'num_slots={self.num_slots}, slot_dim={self.slot_dim}, init={self.init!r}, '
                f'smoothing={self.smoothing}, l2_normalize={self.l2_normalize}, decorrelation={self.decorrelation}')


def skipped_memory_writes(model: nn.Module) -> int:
    """How many memory writes of ``model`` were skipped as non-finite since it was built (all layers).

    Reads a counter the forward keeps in the graph; call it outside (it synchronises with the device).
    """
    counts = [m.skipped_writes for m in model.modules() if isinstance(m, ExplicitMemory)]
    return int(torch.stack(counts).sum().item()) if counts else 0


@torch.no_grad()
def mean_slot_cosine(memory: torch.Tensor) -> float:
    """Mean cosine similarity of the distinct pairs of rows (priors) of ``memory`` (S, m): about 0 for the
    random initial memory, 1 when every slot holds the same direction (the memory has collapsed to one
    prior, and the Hopfield read returns the same attractor for every patch). 0 for a single slot."""
    num_slots = memory.shape[0]
    if num_slots < 2:
        return 0.0
    unit = nn.functional.normalize(memory.float(), dim=-1)
    cosines = unit @ unit.T
    return float(cosines.sum() - cosines.diagonal().sum()) / (num_slots * (num_slots - 1))


@torch.no_grad()
def mean_abs_slot_cosine(memory: torch.Tensor) -> float:
    """Mean absolute cosine of the distinct pairs of rows of ``memory`` (S, m): 1 when every slot lies on one
    line, including a memory split into +v and -v slots, whose mean cosine (:func:`mean_slot_cosine`) is about
    0. For independent random directions in m dimensions it is E|u_1| = Gamma(m/2) / (sqrt(pi)
    Gamma((m+1)/2)), about sqrt(2 / (pi m)). A zero row counts as cosine 0. 0 for a single slot."""
    num_slots = memory.shape[0]
    if num_slots < 2:
        return 0.0
    unit = nn.functional.normalize(memory.float(), dim=-1)
    cosines = (unit @ unit.T).abs()
    return float(cosines.sum() - cosines.diagonal().sum()) / (num_slots * (num_slots - 1))


@torch.no_grad()
def memory_participation_rank(memory: torch.Tensor) -> float:
    """Participation ratio of the singular values s of ``memory`` (S, m): ``(sum s^2)^2 / sum s^4``.

    How many directions hold the memory's energy: k for k orthogonal rows of equal length, exactly 1 for any
    memory of rank one (one prior, or slots split into +v and -v), and about S m / (S + m + 1) for a raw
    N(0, 1) memory (16 of 32 for 32 slots of 32). Unlike the entropy effective rank it needs no SVD:
    ``sum s^2 = |M|_F^2`` and ``sum s^4 = |M^T M|_F^2``; weighting by s^4, it counts a dominant direction
    as one even when many small ones remain. 0 for a zero memory.
    """
    m = memory.double()
    energy = m.pow(2).sum()
    if energy == 0:
        return 0.0
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return float(energy ** 2 / gram.pow(2).sum())


def memory_by_layer(model: nn.Module, measure: Callable[[torch.Tensor], float] = memory_participation_rank
                    ) -> Dict[str, float]:
    """``measure`` of the stored memory of every :class:`ExplicitMemory` in ``model``, by module name (in
    model order, e.g. ``'blocks.0.mlp.memory'``); empty without a memory. ``measure`` is one of
    :func:`memory_participation_rank`, :func:`mean_abs_slot_cosine`, :func:`mean_slot_cosine`."""
    return {name: measure(m.memory) for name, m in model.named_modules() if isinstance(m, ExplicitMemory)}


def memory_slot_similarity(model: nn.Module) -> Optional[float]:
    """:meth:`ExplicitMemory.slot_similarity` averaged over the layers of ``model``; None without a memory.

    The EWMA write pulls the priors together (every slot's candidate is a softmax average of the same
    patches), so training logs this to show how far they have collapsed.
    """
    values = [m.slot_similarity() for m in model.modules() if isinstance(m, ExplicitMemory)]
    return sum(values) / len(values) if values else None
