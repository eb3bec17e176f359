"""Top-k bottleneck cross-attention from the memory priors to the patch pool (AiT 3.3).

Each prior (query) may attend to at most ``k`` patches of the whole squashed batch; the
softmax runs over the kept scores only. All heads are computed at once.

Cost, for T = B*N patches of width D, H heads of size d and S slots: the scores need one
(H*S x D) @ (D x T) product, done as ``(Q Wk^T) s^T`` so that the keys of all T patches are
never materialised. The values are only needed at the selected patches, so the output is a
gate-weighted sum of the input rows, projected per head afterwards: the value projection of
all T patches is never done. The sum is a gather of the k kept rows per slot and head
(``embedding_bag``) when few patches are kept, and one product with the dense (H*S x T) gate
matrix when many are (see ``DENSE_POOLING_MIN_SHARE``).
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['BottleneckAttention', 'BottleneckGates', 'balance_loss_from_gates', 'cv_squared']

# Pool through the dense gate matrix when each slot keeps at least this share k/T of the
# patches. The gather does k/T of the product's multiply-adds but runs several times slower
# per multiply-add, forward and backward; the two break even near k/T = 1/12 on the CPU
# (docs/benchmarks.md has the measurement).
DENSE_POOLING_MIN_SHARE = 1 / 12


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

    def scores(self, memory: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """Scaled scores A of shape (H, S, T) for memory (S, m) and patches (T, D)."""
        H, d = self.num_heads, self.head_dim
        S = memory.shape[0]
        q = self.q(memory).view(S, H, d).transpose(0, 1) * self.scale          # H, S, d
        wk = self.k.weight.view(H, d, self.dim)                                 # H, d, D
        q_k = torch.matmul(q, wk).reshape(H * S, self.dim)                      # (Q Wk^T): H*S, D
        scores = patches @ q_k.t()                                              # T, H*S
        if self.k.bias is not None:
            scores = scores + (q * self.k.bias.view(H, 1, d)).sum(-1).reshape(1, H * S)
        return scores.t().reshape(H, S, -1)

    def select(self, scores: torch.Tensor) -> BottleneckGates:
        T = scores.shape[-1]
        if self.bottleneck is None:
            return BottleneckGates(scores.softmax(-1), None, T)
        if self.bottleneck > T and not self.cap_bottleneck:
            raise ValueError(
                f'bottleneck size k={self.bottleneck} is larger than the patch pool of {T} patches '
                f'(batch x tokens) and cap_bottleneck=False; use a larger batch or a smaller k')
        top, idx = scores.topk(min(self.bottleneck, T), dim=-1, sorted=False)
        return BottleneckGates(top.softmax(-1), idx, T)

    @torch.jit.unused  # the memory write of training; TorchScript runs the GWL in eval only
    def forward(self, memory: torch.Tensor, patches: torch.Tensor):
        """Attend from memory (S, m) to patches (T, D); returns the (S, m) output and the gates."""
        H, d = self.num_heads, self.head_dim
        S = memory.shape[0]
        gates = self.select(self.scores(memory, patches))
        T = patches.shape[0]
        if gates.indices is None or gates.indices.shape[-1] >= DENSE_POOLING_MIN_SHARE * T:
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
