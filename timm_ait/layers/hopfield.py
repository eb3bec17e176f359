"""Reading the memory: continuous-Hopfield retrieval with the priors as attractors (AiT 3.4)."""
import math
from typing import Optional

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

    def forward(self, xi: torch.Tensor, memory: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The retrieved states for states ``xi`` (..., D); with ``residual`` (shaped as ``xi``), ``residual`` plus them.

        The states are read as one (patches x D) matrix: two plain matrix products against the S attractors,
        which run about twice as fast here as the same products on (B, N, D) (docs/benchmarks.md). The
        residual is summed inside the last product (``addmm``: the same numbers as the product and an add)
        except under autocast, which would compute that sum, and so the output, in the lower precision.
        """
        shape = xi.shape
        states = xi.reshape(-1, shape[-1])
        y = self.attractors(memory).to(xi.dtype)
        for step in range(self.steps):
            scores = states @ y.t()
            if self.beta != 1.0:  # a product by 1.0 changes nothing: skipped
                scores = self.beta * scores
            weights = torch.softmax(scores, dim=-1)
            if step == self.steps - 1 and residual is not None and not torch.jit.is_scripting() \
                    and self._sums_exactly(weights, residual):
                return torch.addmm(residual.reshape(-1, shape[-1]), weights, y).view(shape)
            states = weights @ y
        states = states.view(shape)
        return states if residual is None else residual + states

    @torch.jit.unused  # TorchScript takes the plain sum
    def _sums_exactly(self, weights: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether ``addmm(residual, weights, y)`` gives ``residual + weights @ y`` to the bit: in float32 and
        wider (a bfloat16 or float16 addmm rounds the sum once where the two ops round twice), not under
        autocast (which would run the addmm in the lower precision), and not while FX traces symbolically (no
        dtype to test: the graph keeps the plain sum)."""
        if isinstance(residual, torch.fx.Proxy):
            return False
        if weights.dtype != residual.dtype or weights.dtype not in (torch.float32, torch.float64):
            return False
        device = residual.device.type
        return not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))

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

    def forward(self, x: torch.Tensor, memory: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The read for x (B, N, D); with ``residual``, ``residual`` plus it (as :class:`HopfieldRetrieval`)."""
        out = self._read(x, memory)
        return out if residual is None else residual + out

    def _read(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.num_heads
        y = self.up(memory).to(x.dtype)
        q = self.q(x).view(B, N, H, D // H).transpose(1, 2)
        k, v = self.kv(y).view(-1, 2, H, D // H).permute(1, 2, 0, 3).unbind(0)   # H, S, D/H
        out = F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
        return self.proj(out.transpose(1, 2).reshape(B, N, D))
