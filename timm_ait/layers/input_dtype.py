"""A clear error for an input dtype the model cannot run, before torch's own mixed-dtype errors."""
import torch
from torch import fx

__all__ = ['check_input_dtype']

# what torch.autocast casts on its way into the model's fp32 (or other) weights
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


def check_input_dtype(x: torch.Tensor, weight_dtype: torch.dtype, what: str = 'images') -> None:
    """Raise a TypeError unless ``x`` can run in a model whose parameters are ``weight_dtype``.

    That is: the same dtype, or, under ``torch.autocast`` for the input's device, float16, bfloat16
    or float32 (autocast casts those; it does not cast float64 or integers). Call it behind
    ``if not torch.jit.is_scripting()``; it does nothing while torch.fx traces (the input is a proxy then)
    and adds no graph break under torch.compile (dtypes and the autocast state are static there).
    """
    if isinstance(x, fx.Proxy) or x.dtype == weight_dtype:
        return
    if x.dtype in _AUTOCAST_CASTS and torch.is_autocast_enabled(x.device.type):
        return
    hint = (f'convert them with x.float() (and normalise them as the model\'s pretrained_cfg mean/std say)'
            if not x.is_floating_point() else f'convert them with x.to({weight_dtype}) or run under torch.autocast'
            if x.dtype in _AUTOCAST_CASTS else f'convert them with x.to({weight_dtype})')
    raise TypeError(f'expected {what} of dtype {weight_dtype} (the model\'s parameters), or float16/bfloat16 '
                    f'under torch.autocast; got {x.dtype}: {hint}')
