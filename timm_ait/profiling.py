"""What one forward costs: FLOPs (GMACs) and activations, counted the way timm's tables count them.

timm's model cards give GMACs and "Activations (M)" as fvcore measured them: multiply-accumulates
of matrix products and convolutions, and the number of elements those ops output. Both are
counted here from the aten ops a forward dispatches, so fused kernels are seen for what they
compute: ``F.scaled_dot_product_attention`` counts its (N, N) scores and its output, as the
unfused ``q @ k^T`` and ``attn @ v`` that timm's published numbers were measured on.
"""
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ['flop_counter', 'ActivationCounter', 'example_inputs', 'profile_model']


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                  out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _inplace_addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


# Ops that torch's counter has no formula for: F.scaled_dot_product_attention on the CPU
# (without them a ViT's attention counts as zero FLOPs there) and the in-place addmm_ (a
# residual sum written into its input)
MISSING_FLOP_FORMULAS = {
    getattr(torch.ops.aten, name): formula
    for name, formula in (('_scaled_dot_product_flash_attention_for_cpu', _cpu_attention_flops),
                          ('_scaled_dot_product_flash_attention_for_cpu_backward', _cpu_attention_backward_flops),
                          ('addmm_', _inplace_addmm_flops))
    if hasattr(torch.ops.aten, name)
}


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with the formulas it lacks; use as a context manager."""
    return FlopCounterMode(display=False, custom_mapping=MISSING_FLOP_FORMULAS)


_MATMUL_OPS = {'mm', 'addmm', 'addmm_', 'bmm', 'baddbmm', 'convolution', '_convolution'}
_ATTENTION_OPS = {'_scaled_dot_product_flash_attention_for_cpu', '_scaled_dot_product_flash_attention',
                  '_scaled_dot_product_efficient_attention', '_scaled_dot_product_cudnn_attention',
                  '_scaled_dot_product_attention_math'}


class ActivationCounter(TorchDispatchMode):
    """Counts the elements output by matrix products, convolutions and attention in a forward.

    fvcore's definition, which timm's "Activations (M)" use: the outputs of the ops that carry
    the arithmetic, not those of norms, activations or additions. Attention counts its scores
    (..., Nq, Nk) and its output.
    """

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _MATMUL_OPS:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.total += first.numel()
        elif name in _ATTENTION_OPS:
            query, key = args[0], args[1]
            self.total += query.shape[:-1].numel() * key.shape[-2] + out[0].numel()
        return out


def example_inputs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> Tuple[torch.Tensor, ...]:
    """Zero inputs for one forward: images, and the question vectors of a question-answering model."""
    param = next(model.parameters(), None)
    dd = dict(device=param.device, dtype=param.dtype) if param is not None else {}
    inputs = (torch.zeros(batch_size, *input_size, **dd),)
    question_dim = getattr(model, 'question_dim', None)
    if question_dim:
        inputs += (torch.zeros(batch_size, question_dim, **dd),)
    return inputs


def profile_model(model: nn.Module, input_size: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """GMACs and activations (millions) of one image through ``model`` in eval mode.

    Eval, because that is what a published model costs, and because a training forward of an
    AiT would write its memory. ``input_size`` defaults to the model's pretrained cfg.
    """
    if input_size is None:
        input_size = model.pretrained_cfg['input_size']
    inputs = example_inputs(model, input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as flops, ActivationCounter() as activations:
            model(*inputs)
    finally:
        model.train(was_training)
    return dict(gmacs=flops.get_total_flops() / 2 / 1e9, activations_m=activations.total / 1e6)
