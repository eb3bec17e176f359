"""Pieces shared by the training and validation scripts: evaluation, checkpoints, AMP."""
import argparse
import hashlib
import json
import os
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import verify_digest

__all__ = ['to_device', 'amp_context', 'evaluate', 'report_results', 'check_state_dict', 'load_training_checkpoint',
           'model_state_dict', 'state_digest', 'check_checkpoint_arch', 'MODEL_SETTINGS', 'resolve_model_settings',
           'model_build_kwargs']

AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}


def to_device(x, device: torch.device, non_blocking: bool = False):
    """Move a tensor, or a tuple/list of them (images and questions), to ``device``."""
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(t, device, non_blocking) for t in x)
    return x.to(device, non_blocking=non_blocking)


def amp_context(enabled: bool, dtype: str, device: torch.device) -> Callable[[], Any]:
    """A factory of autocast contexts (or of null contexts when AMP is off)."""
    if not enabled:
        return nullcontext
    if dtype not in AMP_DTYPES:
        raise ValueError(f'unknown --amp-dtype {dtype!r}; expected one of {sorted(AMP_DTYPES)}')
    return partial(torch.autocast, device_type=device.type, dtype=AMP_DTYPES[dtype])


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        autocast: Callable[[], Any] = nullcontext,
        relational: Optional[np.ndarray] = None,
        groups: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) of ``model`` in eval mode over ``loader``.

    ``relational`` (one bool per item, in loader order) adds top-1 over the relational and the
    non-relational items separately (Sort-of-CLEVR); ``groups`` (name -> one bool per item) adds
    ``<name>_top1`` over each group that has items. The model is in eval mode, so its memory is
    not written and a prediction does not depend on the rest of its batch.
    """
    masks = {}
    if relational is not None:
        relational = np.asarray(relational, dtype=bool)
        masks.update(relational=relational, non_relational=~relational)
    masks.update({name: np.asarray(mask, dtype=bool) for name, mask in (groups or {}).items()})
    for name, mask in masks.items():
        if mask.shape != (len(loader.dataset),):
            raise ValueError(f'group {name!r} needs one bool per item of the evaluation set '
                             f'({len(loader.dataset)}), got shape {mask.shape}')
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    loss_sum, correct1, correct5, seen = 0.0, [], 0, 0
    for input, target in loader:
        input, target = to_device(input, device), target.to(device)
        with autocast():
            output = model(*input) if isinstance(input, (tuple, list)) else model(input)
        output = output.float()
        loss_sum += criterion(output, target).item()
        top = output.topk(min(5, output.shape[-1]), dim=-1).indices
        hits = top.eq(target[:, None])
        correct1.append(hits[:, 0].cpu())
        correct5 += hits.any(-1).sum().item()
        seen += target.shape[0]
    if not seen:
        raise ValueError('the evaluation loader yielded no samples')
    correct1 = torch.cat(correct1).numpy()
    # plain floats: they are saved in checkpoints, which load with weights_only=True
    metrics = OrderedDict(loss=loss_sum / seen, top1=100.0 * float(correct1.mean()), top5=100.0 * correct5 / seen)
    for name, mask in masks.items():
        mask = mask[:seen]  # a loader that drops its last partial batch
        if mask.any():  # a set of one kind of question has no figure for the other
            metrics[f'{name}_top1'] = 100.0 * float(correct1[mask].mean())
    return metrics


def report_results(results: Dict[str, Any], results_file: str = '') -> None:
    """Print ``results`` as JSON, and write them to ``results_file`` too when one is given."""
    text = json.dumps(results, indent=2)
    print(text)
    if results_file:
        os.makedirs(os.path.dirname(os.path.abspath(results_file)), exist_ok=True)
        with open(results_file, 'w') as f:
            f.write(text + '\n')


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint written by the training script (or a bare state dict), with a clear error.

    A checkpoint that carries a digest (timm_ait.checkpoint) is refused if its contents do not match it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated file, not a torch file, unsafe contents
        raise ValueError(f'checkpoint {path!r} cannot be read: {type(e).__name__}: {e}') from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict')
    verify_digest(checkpoint, f'checkpoint {path!r}')
    return checkpoint


def model_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of a training checkpoint (plain or EMA), DDP prefixes removed."""
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if use_ema and key not in checkpoint:
        raise ValueError('the checkpoint has no EMA weights (state_dict_ema); train with --model-ema')
    state_dict = checkpoint.get(key, checkpoint.get('model', checkpoint))
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        what: str = 'checkpoint',
        ignore: Sequence[str] = (),
) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key (``ignore``: keys whose
    absence or shape is someone else's business, e.g. a classifier that timm will reset)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - set(ignore))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f'{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}'
                        for k, v in state_dict.items()
                        if k in expected and k not in ignore and v.shape != expected[k].shape)
    problems = []
    for title, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            problems.append(f'{title}: ' + ', '.join(keys[:8]) + (f', ... ({len(keys)} in all)' if len(keys) > 8 else ''))
    if problems:
        raise ValueError(f'{what} does not match {type(model).__name__}: ' + '; '.join(problems))


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (memory included), to show that ranks agree bit for bit."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_checkpoint_arch(checkpoint: Dict[str, Any], model: nn.Module, what: str = 'checkpoint') -> None:
    """Let ``model`` refuse a training checkpoint whose weights fit but whose training settings (its
    ``arch`` and ``args``) name another function, e.g. an hmixer trained with another ``n_iter``."""
    check = getattr(model, 'check_checkpoint_arch', None)
    if check is not None:
        check(checkpoint, what)


# the training arguments that decide which model a checkpoint holds (train.py's flag names)
MODEL_SETTINGS = ('model', 'model_kwargs', 'num_classes', 'img_size')


def resolve_model_settings(saved: Dict[str, Any], requested: Dict[str, Any], what: str = 'the checkpoint') -> Dict[str, Any]:
    """The model settings to rebuild a checkpoint's model with: its own, the command line's where it has none.

    ``saved``: the training arguments stored in the checkpoint (``vars(checkpoint['args'])``), empty if
    none. ``requested``: the settings the command line gave explicitly. A requested value that
    contradicts a saved one (a different model, number of classes, image size, or any
    ``--model-kwargs`` key other than the run's) is refused with a ValueError naming the setting.
    A model saved under one of the hmixer authors' entry point names (``paramixer_s16_224_ni2``) is
    rebuilt as the model and settings that reproduce it here (``hmixer_parallel_s16_224``, ``n_iter=2``).
    """
    from .models.paramixer import AUTHORS_MODELS  # models import this module

    settings = {key: saved.get(key) for key in MODEL_SETTINGS}
    settings['model_kwargs'] = dict(saved.get('model_kwargs') or {})
    if settings['model'] in AUTHORS_MODELS:
        settings['model'], their_kwargs = AUTHORS_MODELS[settings['model']]
        settings['model_kwargs'] = {**their_kwargs, **settings['model_kwargs']}
    if not saved:  # a bare state dict: the command line says what it is
        settings.update({key: value for key, value in requested.items() if value is not None})
        return settings
    for key, value in requested.items():
        if key == 'model_kwargs':
            run_kwargs = settings['model_kwargs']
            for name, v in value.items():
                if name in run_kwargs and run_kwargs[name] == v:
                    continue
                trained = (f'{name}={run_kwargs[name]!r}' if name in run_kwargs
                           else f'without {name} (its --model-kwargs: {_kwargs_text(run_kwargs)})')
                raise ValueError(f'model setting {name}: {what} was trained {"with " if name in run_kwargs else ""}'
                                 f'{trained}, but the command line asks --model-kwargs {name}={v!r}; a checkpoint '
                                 'is rebuilt with its own settings, drop it from the command line')
        elif value is not None and settings.get(key) is not None and settings[key] != value:
            flag = '--' + key.replace('_', '-')
            raise ValueError(f'model setting {key}: {what} was trained with {flag} {settings[key]!r}, but the command '
                             f'line asks {flag} {value!r}; a checkpoint is rebuilt with its own settings, drop it from '
                             'the command line')
        elif value is not None:
            settings[key] = value
    return settings


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ' '.join(f'{k}={v!r}' for k, v in kwargs.items()) or 'none'


def model_build_kwargs(settings: Dict[str, Any]) -> Dict[str, Any]:
    """``timm.create_model`` keyword arguments for model settings (see :func:`resolve_model_settings`)."""
    import timm

    kwargs = dict(settings.get('model_kwargs') or {})
    if settings.get('num_classes') is not None:
        kwargs['num_classes'] = settings['num_classes']
    cfg = timm.get_pretrained_cfg(settings['model']) if settings.get('model') else None
    if settings.get('img_size') is not None and cfg is not None and cfg.fixed_input_size:
        # a fixed-size model (the flatten head) is built for the size the data has
        kwargs['img_size'] = settings['img_size']
    return kwargs
