"""The Global Workspace Layer: AiT's replacement for a transformer block's MLP."""
from typing import Optional, Type

import torch
from torch import nn
from timm.layers._fx import register_notrace_module

from .bottleneck import BottleneckAttention, balance_loss_from_gates
from .hopfield import CrossAttentionRetrieval, HopfieldRetrieval
from .memory import ExplicitMemory

__all__ = ['GlobalWorkspaceLayer', 'balance_loss', 'reset_memory']


@register_notrace_module  # FX: a leaf, as the training write stores state (memory, balance loss)
class GlobalWorkspaceLayer(nn.Module):
    """Feed-forward, then write to and read from an explicit memory of low-rank priors.

    For x of shape (B, N, D):

    1. ``h = LN_g(fc2(act(fc1(x))))``.
    2. Training only: the B*N patches of ``h`` compete through a top-k bottleneck for the
       attention of the memory priors; ``M_new = s M + (1 - s) LN_m(O + M)`` is stored and
       the balance loss of the gates is kept in :attr:`balance_loss`. Eval writes nothing and
       sets it to None, so an eval output depends on its own sample only.
    3. Always: each patch takes one continuous-Hopfield step towards the up-projected
       priors, ``out = h + xi'``.

    The constructor takes timm's ``Mlp`` arguments first, so it can be passed to timm's
    ``Block`` / ``VisionTransformer`` as ``mlp_layer``.

    Args:
        in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop: as
            timm's Mlp (``norm_layer`` there is a norm inside the MLP; it is not used here).
        num_slots: memory slots S. slot_dim: prior size m.
        gwl_heads: heads of the bottleneck attention (head size m).
        bottleneck: top-k per slot and head, None for dense attention.
        cap_bottleneck: keep all patches when the pool is smaller than k (else an error).
        smoothing: EWMA weight of the old memory. memory_init: 'gaussian', 'uniform', 'identity'.
        memory_l2norm: unit-normalise memory rows after each write (the authors' code).
        memory_decorrelation: after each write, one step of orthogonal iteration of this strength
            turns the slots apart (not in the paper; 0, the default, is the paper's write). See
            ``ExplicitMemory``. With frozen weights, 0.05 keeps the priors distinct where the paper's
            write collapses them to one; with ``memory_l2norm`` it takes about 0.2 to do as well.
        write_drop: dropout on the write's output projection, before ``+ M`` and ``LN_m`` (the
            authors' module has 0.1; see ``AssociativeTransformer`` for why the default is 0).
        write_norm_eps: eps of ``LN_m``, the write's LayerNorm (1e-6, as the authors' code).
        beta: Hopfield inverse temperature. hopfield_steps: updates per forward.
        hopfield: False replaces the Hopfield read with multi-head cross-attention (ablation).
        feed_forward: False removes fc1/fc2 (ablation): ``h = LN_g(x)``.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: bool = True,
            drop: float = 0.,
            num_slots: int = 32,
            slot_dim: int = 32,
            gwl_heads: int = 8,
            bottleneck: Optional[int] = 512,
            cap_bottleneck: bool = True,
            smoothing: float = 0.9,
            memory_init: str = 'gaussian',
            memory_l2norm: bool = False,
            memory_decorrelation: float = 0.0,
            beta: float = 1.0,
            hopfield_steps: int = 1,
            hopfield: bool = True,
            feed_forward: bool = True,
            write_drop: float = 0.,
            write_norm_eps: float = 1e-6,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dim = in_features
        if out_features not in (None, dim):
            raise ValueError(f'GlobalWorkspaceLayer keeps the width: out_features must be {dim}, got {out_features}')
        hidden_features = hidden_features or 4 * dim
        if feed_forward:
            self.fc1 = nn.Linear(dim, hidden_features, bias=bias)
            self.act = act_layer()
            self.drop1 = nn.Dropout(drop)
            self.fc2 = nn.Linear(hidden_features, dim, bias=bias)
        else:
            self.fc1 = self.act = self.drop1 = self.fc2 = nn.Identity()
        self.norm = nn.LayerNorm(dim)
        self.memory = ExplicitMemory(num_slots, slot_dim, init=memory_init, smoothing=smoothing,
                                     l2_normalize=memory_l2norm, decorrelation=memory_decorrelation)
        self.write_attn = BottleneckAttention(dim, slot_dim, gwl_heads, bottleneck=bottleneck,
                                              cap_bottleneck=cap_bottleneck)
        self.write_drop = nn.Dropout(write_drop)
        self.write_norm = nn.LayerNorm(slot_dim, eps=write_norm_eps)
        if hopfield:
            self.read = HopfieldRetrieval(dim, slot_dim, beta=beta, steps=hopfield_steps)
        else:
            self.read = CrossAttentionRetrieval(dim, slot_dim, num_heads=gwl_heads)
        self.drop2 = nn.Dropout(drop)
        self.balance_loss: Optional[torch.Tensor] = None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc2(self.drop1(self.act(self.fc1(x)))))
        if self.training and not torch.jit.is_scripting():
            memory = self.memory.read()
            # squash: the patches of all samples compete together for the bottleneck
            patches = h.reshape(-1, h.shape[-1])
            out, gates = self.write_attn(memory, patches)
            candidate = self.write_norm(self.write_drop(out) + memory.to(out.dtype))
            memory = self.memory.write(candidate, memory, empty=patches.shape[0] == 0)
            self.balance_loss = balance_loss_from_gates(gates)
        else:
            if self.training:
                raise RuntimeError('a TorchScript GlobalWorkspaceLayer runs in eval only: the memory write of '
                                   'training needs eager mode, FX or torch.compile')
            memory = self.memory.memory
            self.balance_loss = None
        return self.drop2(h + self.read(h, memory))


def _gwls(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, GlobalWorkspaceLayer))


def balance_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Balance loss of the model's last training forward, summed over heads and layers.

    None when the model has no GWL or its last forward was in eval mode. Multiply by the
    coefficient (1e-2 in the paper) and add to the task loss.
    """
    losses = [m.balance_loss for m in _gwls(model) if m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


def reset_memory(model: nn.Module) -> None:
    """Re-initialise every GWL's memory (the paper's 'reset memory every epoch' ablation)."""
    for m in _gwls(model):
        m.memory.reset()
