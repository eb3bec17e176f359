"""Top-k bottleneck cross-attention from the memory priors to the patch pool (AiT 3.3).

Each prior (query) may attend to at most ``k`` patches of the whole squashed batch; the
softmax runs over the kept scores only. All heads are computed at once.

Cost, for T = B*N patches of width D, H heads of size d and S slots: the scores need one
(H*S x D) @ (D x T) product, done as ``(Q Wk^T) s^T`` so that the keys of all T patches are
never materialised. The values are only needed at the selected patches, so the output is a
gate-weighted sum of the input rows, projected per head afterwards: the value projection of
all T patches is never done. The sum is a gather of the k kept rows per slot and head
(``embedding_bag``) when few patches are kept, and one product with the dense (H*S x T) gate
matrix when many are (see ``DENSE_POOLING_MIN_SHARE``). When few are kept the scores' gradient is
also taken at the kept scores only (``_KeptScores``): the other T - k have none.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['BottleneckAttention', 'BottleneckGates', 'balance_loss_from_gates', 'cv_squared']

# Work with dense (H*S x T) products when each slot keeps at least this share k/T of the patches:
# the pooling of the kept patches and the scores' backward. A gather does k/T of a product's
# multiply-adds but runs several times slower per multiply-add; the two break even near k/T = 1/12
# on the CPU (docs/benchmarks.md has the measurements).
DENSE_POOLING_MIN_SHARE = 1 / 12


def _gathers(kept: int, num_patches: int) -> bool:
    """True when k kept patches of T are few enough that gathering them beats the dense products."""
    return kept < DENSE_POOLING_MIN_SHARE * num_patches


@dataclass
class BottleneckGates:
    """Which patches each (head, slot) kept and with what weight.

    ``indices`` and ``weights`` have shape (H, S, k) for the top-k bottleneck; for the dense
    ablation ``indices`` is None and ``weights`` is the full (H, S, T) softmax.
    """
    weights: torch.Tensor
    indices: Optional[torch.Tensor]
    num_patches: int

    def dense(self) -> torch.Tensor:
        """The (H, S, T) gate matrix G, zero where a patch was not selected."""
        if self.indices is None:
            return self.weights
        H, S, _ = self.weights.shape
        g = self.weights.new_zeros(H, S, self.num_patches)
        return g.scatter(-1, self.indices, self.weights)


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation over the last dim, ``Var(x) / (mean(x)^2 + eps)``."""
    x = x.float()
    if x.shape[-1] <= 1:  # one value (or none, an empty batch) does not vary
        return x.new_zeros(x.shape[:-1])
    return x.var(dim=-1) / (x.mean(dim=-1) ** 2 + eps)


def balance_loss_from_gates(gates: BottleneckGates, eps: float = 1e-10) -> torch.Tensor:
    """Bottleneck attention balance loss summed over heads (AiT eq. 4-6).

    Per head, over patch positions j: ``importance_j = sum_i G[i, j]`` and
    ``load_j = #{i : G[i, j] > 0}``; the loss is ``cv2(importance) + cv2(load)``.
    """
    if gates.indices is None:
        importance = gates.weights.sum(1)
        load = (gates.weights > 0).sum(1)
    else:
        H = gates.weights.shape[0]
        idx = gates.indices.reshape(H, -1)
        importance = gates.weights.new_zeros(H, gates.num_patches, dtype=torch.float32)
        importance = importance.scatter_add(-1, idx, gates.weights.reshape(H, -1).float())
        # a kept patch counts as loaded even if its softmax weight underflows to zero
        load = torch.zeros_like(importance).scatter_add_(-1, idx, torch.ones_like(importance[:, :1]).expand_as(idx))
    return (cv_squared(importance, eps) + cv_squared(load, eps)).sum()


def _by_patch(indices: torch.Tensor, num_patches: int):
    """The flattened (head-slot, j) entries of ``indices`` (HS, k) ordered by patch: their rows (head-slots)
    and positions in that order, and where each patch's entries start (a patch kept by none has none)."""
    flat = indices.reshape(-1)
    sorted_patches, order = flat.sort()
    starts = torch.searchsorted(sorted_patches, torch.arange(num_patches, device=flat.device))
    return torch.div(order, indices.shape[-1], rounding_mode='floor'), order, starts


class _KeptScores(torch.autograd.Function):
    """The kept scores ``A[r, j] = patches[idx[r, j]] . q_k[r]`` for rows r = (head, slot), given their values.

    Forward: ``values`` as they are (the top-k of the full score product: the same numbers). Backward, with
    ``dA`` (HS, k): ``d q_k[r] = sum_j dA[r, j] patches[idx[r, j]]`` and ``d patches[t] = sum of dA[r, j]
    q_k[r] over the entries with idx[r, j] = t``, both weighted sums of rows (``embedding_bag``): k/T of the
    multiply-adds of the dense product's backward, which would multiply mostly zeros.
    """

    @staticmethod
    def forward(ctx, patches, q_k, values, indices):
        ctx.save_for_backward(patches, q_k, indices)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        patches, q_k, indices = ctx.saved_tensors
        HS, k = q_k.shape[0], indices.shape[-1]
        indices = indices.reshape(HS, k)
        grad = grad.reshape(HS, k).to(patches.dtype)
        grad_patches = grad_q_k = None
        if ctx.needs_input_grad[1]:
            grad_q_k = F.embedding_bag(indices, patches, mode='sum', per_sample_weights=grad).to(q_k.dtype)
        if ctx.needs_input_grad[0]:
            rows, order, starts = _by_patch(indices, patches.shape[0])
            grad_patches = F.embedding_bag(rows, q_k.to(patches.dtype), starts, mode='sum',
                                           per_sample_weights=grad.reshape(-1)[order])
        return grad_patches, grad_q_k, None, None


class BottleneckAttention(nn.Module):
    """Multi-head cross-attention, memory priors as queries over a pool of patches, top-k.

    Args:
        dim: width D of the patches (keys and values come from them).
        slot_dim: width m of a memory slot (queries come from it, the output has it).
        num_heads: heads H.
        head_dim: size d of a head; m by default, as in the paper.
        bottleneck: k, the number of patches each slot keeps per head; None for the dense
            ablation (softmax over every patch).
        cap_bottleneck: if the pool holds fewer than k patches, keep them all (the paper's
            behaviour). If False, such a pool is an error.
        qkv_bias: bias in the query, key and value projections (the authors use none).
    """

    def __init__(
            self,
            dim: int,
            slot_dim: int = 32,
            num_heads: int = 8,
            head_dim: Optional[int] = None,
            bottleneck: Optional[int] = 512,
            cap_bottleneck: bool = True,
            qkv_bias: bool = False,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f'bottleneck attention needs num_heads >= 1, got {num_heads}')
        if bottleneck is not None and bottleneck < 1:
            raise ValueError(f'bottleneck size k must be >= 1 (or None for dense attention), got {bottleneck}')
        head_dim = head_dim or slot_dim
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.bottleneck = bottleneck
        self.cap_bottleneck = cap_bottleneck
        self.scale = head_dim ** -0.5
        inner = num_heads * head_dim
        self.q = nn.Linear(slot_dim, inner, bias=qkv_bias)
        self.k = nn.Linear(dim, inner, bias=qkv_bias)
        self.v = nn.Linear(dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, slot_dim, bias=False)

    def _queries(self, memory: torch.Tensor) -> torch.Tensor:
        """The scaled queries (H, S, d) of memory (S, m)."""
        return self.q(memory).view(memory.shape[0], self.num_heads, self.head_dim).transpose(0, 1) * self.scale

    def _query_keys(self, q: torch.Tensor) -> torch.Tensor:
        """``Q Wk^T`` (H*S, D): each (head, slot) query mapped back to patch width."""
        H, S, d = q.shape
        return torch.matmul(q, self.k.weight.view(H, d, self.dim)).reshape(H * S, self.dim)

    def _key_bias_scores(self, q: torch.Tensor) -> Optional[torch.Tensor]:
        """The scores' part from the key bias, (1, H*S): the same for every patch; None without one."""
        if self.k.bias is None:
            return None
        H, S, d = q.shape
        return (q * self.k.bias.view(H, 1, d)).sum(-1).reshape(1, H * S)

    def scores(self, memory: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Scaled scores A of shape (H, S, T) for memory (S, m) and patches (T, D)."""
        q = self._queries(memory)
        scores = patches @ self._query_keys(q).t()                              # T, H*S: keys never materialised
        bias = self._key_bias_scores(q)
        if bias is not None:
            scores = scores + bias
        return scores.t().reshape(*q.shape[:2], -1)

    def select(self, scores: torch.Tensor) -> BottleneckGates:
        """The gates of (H, S, T) scores: top-k per (head, slot), softmax over the kept scores."""
        T = scores.shape[-1]
        if self.bottleneck is None:
            return BottleneckGates(scores.softmax(-1), None, T)
        self._check_pool(T)
        top, idx = scores.topk(min(self.bottleneck, T), dim=-1, sorted=False)
        return BottleneckGates(top.softmax(-1), idx, T)

    def _check_pool(self, num_patches: int) -> None:
        if self.bottleneck > num_patches and not self.cap_bottleneck:
            raise ValueError(
                f'bottleneck size k={self.bottleneck} is larger than the patch pool of {num_patches} patches '
                f'(batch x tokens) and cap_bottleneck=False; use a larger batch or a smaller k')

    def _gates(self, memory: torch.Tensor, patches: torch.Tensor) -> BottleneckGates:
        """:meth:`select` of :meth:`scores`; when few patches are kept, the top-k's gradient is computed at the
        kept scores only.

        Only k of the T scores of a (head, slot) reach the softmax, so the gradient of the others is zero;
        backpropagating through the full (H*S x T) score product spends two products of T x H*S x D on it.
        When gathering pays (:func:`_gathers`), the scores are computed without a graph, and the kept ones
        carry :class:`_KeptScores`'s gradient (k/T of that work, as two gathers). The forward values are the
        same numbers either way; the gradients differ by rounding.
        """
        H, S, T = self.num_heads, memory.shape[0], patches.shape[0]
        if self.bottleneck is None or not _gathers(min(self.bottleneck, T), T):
            return self.select(self.scores(memory, patches))
        self._check_pool(T)
        q = self._queries(memory)
        q_k = self._query_keys(q)
        bias = self._key_bias_scores(q)
        with torch.no_grad():
            scores = patches @ q_k.t()
            if bias is not None:
                scores = scores + bias
            top, idx = scores.t().reshape(H, S, T).topk(min(self.bottleneck, T), dim=-1, sorted=False)
        kept = _KeptScores.apply(patches, q_k, top, idx)
        if bias is not None:  # exactly the values above, and the bias's own gradient
            kept = kept + (bias - bias.detach()).view(H, S, 1)
        return BottleneckGates(kept.softmax(-1), idx, T)

    @torch.jit.unused  # the memory write of training; TorchScript runs the GWL in eval only
    def forward(self, memory: torch.Tensor, patches: torch.Tensor):
        """Attend from memory (S, m) to patches (T, D); returns the (S, m) output and the gates."""
        H, d = self.num_heads, self.head_dim
        S = memory.shape[0]
        gates = self._gates(memory, patches)
        T = patches.shape[0]
        if gates.indices is None or not _gathers(gates.indices.shape[-1], T):
            pooled = torch.matmul(gates.dense().to(patches.dtype), patches)     # H, S, D
        else:
            k = gates.indices.shape[-1]
            pooled = F.embedding_bag(
                gates.indices.reshape(H * S, k), patches, mode='sum',
                per_sample_weights=gates.weights.reshape(H * S, k).to(patches.dtype),
            ).view(H, S, self.dim)
        wv = self.v.weight.view(H, d, self.dim)
        out = torch.matmul(pooled, wv.transpose(1, 2))                          # H, S, d
        if self.v.bias is not None:
            # the gates of a slot sum to one, so the value bias passes through unchanged
            out = out + self.v.bias.view(H, 1, d)
        out = out.transpose(0, 1).reshape(S, H * d)
        return self.proj(out), gates

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, head_dim={self.head_dim}, bottleneck={self.bottleneck}'
