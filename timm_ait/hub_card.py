"""The model card (README.md) of a published model, rendered from ``hub_cards/model_card.md``.

Every number on the card is measured or read, never typed: parameters and GMACs from the model,
results from the run's ``summary.csv`` and, optionally, the JSON that ``validate.py`` writes.
"""
import csv
import json
import os
from pathlib import Path
from string import Template
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['TEMPLATE_PATH', 'count_gmacs', 'read_summary', 'read_validation', 'gwl_settings', 'render_model_card']

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / 'hub_cards' / 'model_card.md'

# Hub dataset ids for the card's front matter; generated datasets have none and keep their name
HUB_DATASET_IDS = {
    'torch/cifar10': 'uoft-cs/cifar10',
    'torch/cifar100': 'uoft-cs/cifar100',
    'torch/oxford-pet': 'timm/oxford-iiit-pet',
}


def count_gmacs(model: nn.Module, input_size: Tuple[int, ...]) -> float:
    """GMACs of one image through ``model`` in eval mode (FLOPs / 2, as timm's tables count them).

    torch's FlopCounterMode counts matrix products, convolutions and attention; norms, softmax and
    elementwise ops are not counted, as in timm's published numbers.
    """
    was_training = model.training
    model.eval()  # in training mode the forward would write the memory
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def read_summary(path: str) -> Dict[str, Any]:
    """Best and final eval top-1 of a run, from the summary.csv the training script writes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'run summary {path!r} does not exist')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'eval_top1' not in rows[0] or 'epoch' not in rows[0]:
        raise ValueError(f'{path!r} is not a training summary (no rows, or no epoch / eval_top1 column)')
    best = max(rows, key=lambda row: float(row['eval_top1']))  # first of equals: the earliest epoch
    final = rows[-1]
    return dict(
        best_top1=float(best['eval_top1']), best_epoch=int(best['epoch']),
        final_top1=float(final['eval_top1']), final_top5=float(final['eval_top5']) if 'eval_top5' in final else None,
        final_epoch=int(final['epoch']), num_epochs=len(rows))


def read_validation(path: str) -> Dict[str, Any]:
    """The JSON that ``validate.py --results-file`` writes (top1, top5, dataset, split, num_samples)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'validation results {path!r} do not exist')
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, dict) or 'top1' not in results:
        raise ValueError(f'{path!r} is not a validate.py results file (no top1)')
    return results


def gwl_settings(model: nn.Module) -> List[Tuple[str, Any]]:
    """The Global Workspace Layer's settings as built, read from the first block's modules."""
    gwl = getattr(getattr(model, 'blocks', [None])[0], 'mlp', None)
    memory, write_attn = getattr(gwl, 'memory', None), getattr(gwl, 'write_attn', None)
    if memory is None or write_attn is None:
        return []
    read = gwl.read
    return [
        ('Memory slots', memory.num_slots),
        ('Slot dim', memory.slot_dim),
        ('Heads', write_attn.num_heads),
        ('Bottleneck k', write_attn.bottleneck if write_attn.bottleneck is not None else 'none (all tokens)'),
        ('Hopfield beta', read.beta if hasattr(read, 'beta') else 'n/a (cross-attention read)'),
        ('Memory smoothing', memory.smoothing),
    ]


def _results_markdown(summary: Optional[Dict[str, Any]], validation: Optional[Dict[str, Any]]) -> str:
    lines = []
    if summary:
        lines += [
            f"Training run, {summary['num_epochs']} epochs (eval top-1 from the run's summary.csv):",
            '',
            '| | Epoch | Top-1 (%) |',
            '|---|---|---|',
            f"| Best | {summary['best_epoch']} | {summary['best_top1']:.2f} |",
            f"| Final | {summary['final_epoch']} | {summary['final_top1']:.2f} |",
        ]
    if validation:
        if lines:
            lines.append('')
        top5 = f", top-5 {validation['top5']:.2f}%" if 'top5' in validation else ''
        where = ', '.join(f'{k} {validation[k]}' for k in ('dataset', 'split', 'num_samples') if k in validation)
        lines.append(f"`validate.py` on these weights: top-1 {validation['top1']:.2f}%{top5} ({where}).")
    return '\n'.join(lines) if lines else 'No results were recorded for these weights.'


def render_model_card(
        model: nn.Module,
        repo_id: str,
        dataset: str,
        summary: Optional[Dict[str, Any]] = None,
        validation: Optional[Dict[str, Any]] = None,
        template_path: Path = TEMPLATE_PATH,
) -> str:
    """README.md of ``model`` published as ``repo_id``, trained on ``dataset`` (a training-script name)."""
    from .data.factory import DATASETS

    cfg = model.pretrained_cfg
    input_size = tuple(cfg['input_size'])
    settings = gwl_settings(model) or [('Global Workspace Layer', 'none (no GWL in this model)')]
    values = dict(
        model_name=repo_id.split('/')[-1],
        repo_id=repo_id,
        architecture=cfg['architecture'],
        license=cfg.get('license', 'apache-2.0'),
        dataset_id=HUB_DATASET_IDS.get(dataset, dataset.split('/')[-1]),
        dataset_title=DATASETS.get(dataset, dataset),
        params_m=f'{sum(p.numel() for p in model.parameters()) / 1e6:.3g}',
        gmacs=f'{count_gmacs(model, input_size):.3g}',
        image_size=f'{input_size[1]} x {input_size[2]}',
        gwl_settings='\n'.join(f'  - {name}: {value}' for name, value in settings),
        results=_results_markdown(summary, validation),
    )
    return Template(Path(template_path).read_text(encoding='utf-8')).substitute(values)
