"""The Global Workspace Layer: AiT's replacement for a transformer block's MLP."""
import inspect
from typing import Any, Dict, Optional, Type, Union

import torch
from torch import nn
from timm.layers._fx import register_notrace_module

from ._args import to_bool, to_bottleneck, to_int
from .balance_term import (
    ACCUMULATION_MESSAGE, DEFAULT_BALANCE_LOSS_COEF, FLOAT16_MESSAGE, AddBalanceTerm, check_balance_loss_coef,
    check_balance_loss_scale,
)
from .bottleneck import BottleneckAttention, balance_loss_from_gates
from .hopfield import CrossAttentionRetrieval, HopfieldRetrieval
from .memory import ExplicitMemory

__all__ = ['GlobalWorkspaceLayer', 'GWL_ARGS', 'balance_loss', 'reset_memory', 'set_balance_loss_scale']


@register_notrace_module  # FX: a leaf, as the training write stores state (memory, balance loss value)
class GlobalWorkspaceLayer(nn.Module):
    """Feed-forward, then write to and read from an explicit memory of low-rank priors.

    For x of shape (B, N, D):

    1. ``h = LN_g(fc2(act(fc1(x))))``.
    2. Training only: the B*N patches of ``h`` compete through a top-k bottleneck for the
       attention of the memory priors; ``M_new = s M + (1 - s) LN_m(O + M)`` is stored and
       the balance loss of the gates is kept, detached, in :attr:`balance_loss` for logging.
       Eval writes nothing and sets it to None, so an eval output depends on its own sample only.
    3. Always: each patch takes one continuous-Hopfield step towards the up-projected
       priors, ``out = h + xi'``.
    4. Training only: ``out`` carries the balance term (``timm_ait.layers.balance_term``): the
       backward of any loss computed from it also adds ``balance_loss_coef * balance loss``.

    The constructor takes timm's ``Mlp`` arguments first, so it can be passed to timm's
    ``Block`` / ``VisionTransformer`` as ``mlp_layer``.

    Args:
        in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop: as
            timm's Mlp (``norm_layer`` there is a norm inside the MLP; it is not used here).
        num_slots: memory slots S. slot_dim: prior size m.
        gwl_heads: heads of the bottleneck attention (head size m).
        bottleneck: top-k per slot and head; ``'none'`` (or None) for dense attention.
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
        balance_loss_coef: weight of the balance loss the layer adds to the backward (the paper's
            lambda, 1e-2); 0 turns it off, so training sees the task loss alone.
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
            bottleneck: Union[int, str, None] = 512,
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
            balance_loss_coef: float = DEFAULT_BALANCE_LOSS_COEF,
            device=None,
            dtype=None,
    ):
        super().__init__()
        # flags and sizes may come as strings from --model-kwargs or configs: parsed or refused here
        num_slots, slot_dim = to_int('num_slots', num_slots), to_int('slot_dim', slot_dim)
        gwl_heads, hopfield_steps = to_int('gwl_heads', gwl_heads), to_int('hopfield_steps', hopfield_steps)
        bottleneck = None if bottleneck is None else to_bottleneck(bottleneck)
        cap_bottleneck, memory_l2norm = to_bool('cap_bottleneck', cap_bottleneck), to_bool('memory_l2norm', memory_l2norm)
        hopfield, feed_forward = to_bool('hopfield', hopfield), to_bool('feed_forward', feed_forward)
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
        self.balance_loss_coef = check_balance_loss_coef(balance_loss_coef)
        # the factor the trainer puts on its loss, if it declared one (set_balance_loss_scale)
        self.balance_loss_scale: Optional[Union[float, torch.Tensor]] = None
        self.balance_loss: Optional[torch.Tensor] = None
        self._term_backward = None  # (backward id, parameter versions) of the last backward of the term
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @torch.jit.unused
    def settings(self) -> Dict[str, Any]:
        """What this layer computes with, beyond its weights' shapes (checked when a checkpoint loads)."""
        read = self.read
        return dict(
            bottleneck=self.write_attn.bottleneck, cap_bottleneck=self.write_attn.cap_bottleneck,
            smoothing=self.memory.smoothing, memory_init=self.memory.init, memory_l2norm=self.memory.l2_normalize,
            memory_decorrelation=self.memory.decorrelation,
            hopfield=isinstance(read, HopfieldRetrieval), beta=getattr(read, 'beta', None),
            hopfield_steps=getattr(read, 'steps', None), feed_forward=isinstance(self.fc1, nn.Linear),
            write_drop=self.write_drop.p, write_norm_eps=self.write_norm.eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.jit.is_scripting():
            self._check_trainer_scaling(x)
        h = self.norm(self.fc2(self.drop1(self.act(self.fc1(x)))))
        balance: Optional[torch.Tensor] = None
        if self.training and not torch.jit.is_scripting():
            memory = self.memory.read()
            # squash: the patches of all samples compete together for the bottleneck
            patches = h.reshape(-1, h.shape[-1])
            out, gates = self.write_attn(memory, patches)
            candidate = self.write_norm(self.write_drop(out) + memory.to(out.dtype))
            memory = self.memory.write(candidate, memory, empty=patches.shape[0] == 0)
            balance = balance_loss_from_gates(gates)
            self.balance_loss = balance.detach()  # with its graph it would keep it alive and block deepcopy
        else:
            if self.training:
                raise RuntimeError('a TorchScript GlobalWorkspaceLayer runs in eval only: the memory write of '
                                   'training needs eager mode, FX or torch.compile')
            memory = self.memory.memory
            self.balance_loss = None
        y = self.drop2(self.read(h, memory, residual=h))  # h + the read, summed by the read
        if balance is not None and not torch.jit.is_scripting():
            y = self._add_balance_term(y, balance)
        return y

    def _adds_term(self) -> bool:
        return self.balance_loss_coef != 0 and torch.is_grad_enabled()

    @torch.jit.unused
    def _check_trainer_scaling(self, x: torch.Tensor) -> None:
        """Refuse float16 autocast (a gradient scaler's setting) unless the trainer declared its loss scale."""
        if not self._adds_term() or self.balance_loss_scale is not None:
            return
        device = x.device.type  # autocast exists for some device types only (not 'meta')
        if (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
                and torch.get_autocast_dtype(device) == torch.float16):
            raise RuntimeError(FLOAT16_MESSAGE.format(coef=self.balance_loss_coef))

    @torch.jit.unused
    def _add_balance_term(self, y: torch.Tensor, balance: torch.Tensor) -> torch.Tensor:
        if not self._adds_term():
            return y
        scale = self.balance_loss_scale
        grad_scale = self.balance_loss_coef if scale is None else self.balance_loss_coef * scale
        # the accumulation check reads parameter versions in Python: eager only (a compiled backward runs none)
        check = None if scale is not None or torch.compiler.is_compiling() else self._term_backward_check
        return AddBalanceTerm.apply(y, balance, grad_scale, check)

    def _term_backward_check(self) -> None:
        """Refuse a second backward of the term with no parameter update since the first (accumulation)."""
        task = torch._C._current_graph_task_id()
        versions = tuple(p._version for p in self.parameters())
        last, self._term_backward = self._term_backward, (task, versions)
        if last is not None and last[0] != task and last[1] == versions:
            raise RuntimeError(ACCUMULATION_MESSAGE.format(coef=self.balance_loss_coef))


# the GWL's own keyword arguments (the rest are timm's Mlp's): the one list a model forwards to it
GWL_ARGS = tuple(name for name in inspect.signature(GlobalWorkspaceLayer).parameters if name not in (
    'in_features', 'hidden_features', 'out_features', 'act_layer', 'norm_layer', 'bias', 'drop', 'device', 'dtype'))


def _gwls(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, GlobalWorkspaceLayer))


def balance_loss(model: nn.Module) -> Optional[torch.Tensor]:
    """Balance loss of the model's last training forward, summed over heads and layers, detached.

    For logging: the layers already add ``balance_loss_coef`` times it to the backward. None when
    the model has no GWL or its last forward was in eval mode.
    """
    losses = [m.balance_loss for m in _gwls(model) if m.balance_loss is not None]
    return torch.stack(losses).sum() if losses else None


def reset_memory(model: nn.Module) -> None:
    """Re-initialise every GWL's memory (the paper's 'reset memory every epoch' ablation)."""
    for m in _gwls(model):
        m.memory.reset()


def set_balance_loss_scale(model: nn.Module, scale: Optional[Union[float, torch.Tensor]]) -> None:
    """Declare the factor the trainer's backward puts on each forward's loss, for every GWL of ``model``.

    The balance term's gradient is then ``balance_loss_coef * scale`` and the float16 and accumulation
    refusals are off (the trainer has said how it scales). ``1 / k`` for k accumulated micro-batches whose
    losses are divided by k; with a GradScaler ``scaler.scale(torch.ones((), device=device)) / k`` (a 0-dim
    tensor on the device: no host sync), declared again before each step since the scaler's scale changes.
    None returns to the default: scale 1, with the refusals.
    """
    check_balance_loss_scale(scale)
    layers = list(_gwls(model))
    if not layers:
        raise ValueError(f'{type(model).__name__} has no GlobalWorkspaceLayer: it has no balance term to scale')
    for m in layers:
        m.balance_loss_scale = scale
