"""Evaluation and mixed precision, shared by training and validation."""
import json
import os
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
from torch import nn

__all__ = ['to_device', 'amp_context', 'evaluate', 'metric_names', 'report_results']

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


def metric_names(relational: bool = False) -> list:
    """The names of the metrics :func:`evaluate` returns (``relational``: with its relational argument)."""
    return ['loss', 'top1', 'top5'] + (['relational_top1', 'non_relational_top1'] if relational else [])


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
