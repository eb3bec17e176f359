"""Reading the memory: continuous-Hopfield retrieval with the priors as attractors (AiT 3.4)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['HopfieldRetrieval', 'CrossAttentionRetrieval', 'hopfield_energy']


def hopfield_energy(xi: torch.Tensor, attractors: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Energy of states ``xi`` (..., D) for attractors Y (S, D), one value per state:

    ``E = -1/beta * lse(beta * Y xi) + 0.5 xi.xi + 1/beta * log S + 0.5 * max_mu |Y_mu|^2``.
    """
    S = attractors.shape[0]
    lse = torch.logsumexp(beta * xi @ attractors.t(), dim=-1)
    max_norm_sq = attractors.pow(2).sum(-1).max()
    return -lse / beta + 0.5 * (xi * xi).sum(-1) + math.log(S) / beta + 0.5 * max_norm_sq


class HopfieldRetrieval(nn.Module):
    """Continuous-Hopfield update ``xi <- softmax(beta * xi Y^T) Y`` with ``Y = M Wup + b``.

    The priors (S, m) are projected up to the patch width D to serve as attractors. Each
    patch is updated independently, so the read of one sample never depends on another.
    One step never increases :func:`hopfield_energy` (Ramsauer et al. 2021, Theorem 1).
    Returns the retrieved states; the caller adds the skip connection.
    """

    def __init__(self, dim: int, slot_dim: int = 32, beta: float = 1.0, steps: int = 1):
        super().__init__()
        if not math.isfinite(beta) or beta <= 0:  # a NaN passes `beta <= 0`
            raise ValueError(f'Hopfield inverse temperature beta must be > 0 and finite, got {beta}')
        if steps < 1:
            raise ValueError(f'Hopfield steps must be >= 1, got {steps}')
        self.beta = beta
        self.steps = steps
        self.up = nn.Linear(slot_dim, dim)

    def attractors(self, memory: torch.Tensor) -> torch.Tensor:
        return self.up(memory)

    def forward(self, xi: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        y = self.attractors(memory).to(xi.dtype)
        for _ in range(self.steps):
            # one GEMM against all S attractors for every patch of the batch
            xi = torch.softmax(self.beta * (xi @ y.t()), dim=-1) @ y
        return xi

    def extra_repr(self) -> str:
        return f'beta={self.beta}, steps={self.steps}'


class CrossAttentionRetrieval(nn.Module):
    """The paper's 'w/o Hopfield' ablation: multi-head cross-attention with the patches as
    queries and the up-projected priors as keys and values."""

    def __init__(self, dim: int, slot_dim: int = 32, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'cross-attention read: dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.up = nn.Linear(slot_dim, dim)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        y = self.up(memory).to(x.dtype)
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(y).view(-1, 2, H, D // H).permute(1, 2, 0, 3).unbind(0)   # H, S, D/H
        out = F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
