"""The model card (README.md) of a published model, rendered from the templates in ``timm_ait/hub_cards/``.

Every number on the card is measured or read, never typed: parameters, GMACs and activations from
the model, results from the run's ``summary.csv`` and, optionally, the JSON that ``validate.py``
writes. The card says what the model is (an AiT or one of its ablations, its ViT twin, the
question-answering AiT, or a parallelized MLP-Mixer), cites the paper of its family, and shows how
to call it.
"""
import csv
import json
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from string import Template
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from .profiling import profile_model

__all__ = ['TEMPLATE_DIR', 'read_summary', 'read_validation', 'gwl_settings', 'render_model_card']

# package data, so that an installed wheel renders cards as a source checkout does
TEMPLATE_DIR = files(__package__) / 'hub_cards'

# Hub dataset ids for the card's front matter; generated datasets have none and keep their name
HUB_DATASET_IDS = {
    'torch/cifar10': 'uoft-cs/cifar10',
    'torch/cifar100': 'uoft-cs/cifar100',
    'torch/oxford-pet': 'timm/oxford-iiit-pet',
}

_AIT = ('An Associative Transformer (AiT) {task} trained on {dataset} with timm-ait, the AiT models for `timm`. '
        '{blocks}: {write} writes into a small explicit memory, and {read} reads it back.')
# what the built blocks and layers do, so that an ablation's card does not describe the full model
_AIT_BLOCKS = {
    (True, True): "Each block keeps timm's pre-norm self-attention and replaces the MLP with a Global Workspace Layer",
    (False, True): "Each block has no self-attention (the paper's 'W/O SA' ablation), only a pre-norm Global "
                   'Workspace Layer',
    (True, False): "Each block keeps timm's pre-norm self-attention and replaces the MLP with a Global Workspace "
                   "Layer without its feed-forward network (the paper's 'W/O FF' ablation; the patches are only "
                   'layer-normalised)',
    (False, False): "Each block has no self-attention, only a pre-norm Global Workspace Layer without its "
                    "feed-forward network (the paper's 'W/O SA' and 'W/O FF' ablations; the patches are only "
                    'layer-normalised)',
}
_AIT_WRITE = {True: 'a bottleneck attention (top-k patches per slot)',
              False: 'a dense attention over all tokens (no bottleneck, the paper\'s ablation)'}
_AIT_READ = {True: 'a Hopfield network',
             False: 'a multi-head cross-attention (no Hopfield, the paper\'s ablation)'}
_RESET_MEMORY = (" In training the memory was re-initialised at the start of every epoch (the paper's 'Reset Memory' "
                 'ablation); the published memory is the one its last epoch wrote.')
_DECORRELATION = (' Its memory write is not the paper\'s: after every write the memory takes one step of orthogonal '
                  'iteration (`memory_decorrelation={strength:g}`), which keeps its priors from collapsing to one; '
                  'that has not changed accuracy measurably against the paper\'s write (Triangle, 8 seeds; '
                  'Sort-of-CLEVR, 3 seeds; the project\'s docs/results.md has the runs).')
_NO_SELF_ATTENTION = " Its blocks have no self-attention (`self_attn=False`)."
_VIT_TWIN = ('The ViT twin of an Associative Transformer (AiT) {task}, trained on {dataset} with timm-ait: the '
             'same model with timm\'s MLP in place of the Global Workspace Layer (`gwl=False`), the baseline the '
             'AiT paper compares against.')
_QUESTION = (' It answers a question about an image: the one-hot question is embedded as one extra token '
             '(`LN -> Linear -> LN`) beside the image patches.')
_MIXER = ('A {block_type} MLP-Mixer {task} from Hierarchical Associative Memory, Parallelized MLP-Mixer, and '
          'Symmetry Breaking, trained on {dataset} with timm-ait. {block_text}')
_MIXER_BLOCKS = {
    'serial': 'Its blocks are the vanilla Mixer\'s, token mixing then channel mixing, the baseline of the paper.',
    'parallel': 'Token and channel mixing run in parallel from one LayerNorm over the whole (tokens, channels) '
                'map, the wiring of one update of a hierarchical Hopfield network.',
    'symmetric': 'Token and channel mixing run in parallel, and each MLP is symmetric, `W^T act(W z)`, as the '
                 'energy of a hierarchical Hopfield network gives it.',
    'symbreak': 'Token and channel mixing run in parallel, and each MLP breaks the symmetry of the Hopfield '
                'update, `W1^T act(W1 z) + W2 act(W1 z)`.',
}

# each family's paper: a card names and cites the paper of its own model only
_AIT_PAPER = ('Associative Transformer: https://arxiv.org/abs/2309.12862', """@article{sun2023associative,
  title={Associative Transformer},
  author={Sun, Yuwei and Ochiai, Hideya and Wu, Zhirong and Lin, Stephen and Kanai, Ryota},
  journal={arXiv preprint arXiv:2309.12862},
  year={2023}
}""")
_MIXER_PAPER = ('Hierarchical Associative Memory, Parallelized MLP-Mixer, and Symmetry Breaking: '
                'https://arxiv.org/abs/2406.12220', """@article{karakida2024hierarchical,
  title={Hierarchical Associative Memory, Parallelized MLP-Mixer, and Symmetry Breaking},
  author={Karakida, Ryo and Ota, Toshihiro and Taki, Masato},
  journal={arXiv preprint arXiv:2406.12220},
  year={2024}
}""")

# accuracy columns of summary.csv (eval_ + key) and of validate.py's JSON, as the card names them
_ACCURACIES = {'top1': 'Top-1', 'relational_top1': 'Relational', 'non_relational_top1': 'Non-relational'}


def read_summary(path: str, ema: bool = False) -> Dict[str, Any]:
    """The best and the final epoch of a run, from the summary.csv the training script writes.

    Returns ``best`` and ``final``, each ``{'epoch': int, 'top1': float, ...}`` with every
    accuracy the run recorded (relational and non-relational ones for Sort-of-CLEVR), ``num_epochs``
    (the final epoch + 1: a run resumed into a new folder records only its later epochs) and ``ema``.
    The best epoch is the first with the highest eval top-1. ``ema``: the accuracies of the EMA
    weights (the ``eval_ema_*`` columns). An epoch recorded twice (a run killed after its summary row
    and before its checkpoint, then resumed) counts once, with its last row.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'run summary {path!r} does not exist')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    prefix = 'eval_ema_' if ema else 'eval_'
    if not rows or 'eval_top1' not in rows[0] or 'epoch' not in rows[0]:
        raise ValueError(f'{path!r} is not a training summary (no rows, or no epoch / eval_top1 column)')
    if f'{prefix}top1' not in rows[0]:
        raise ValueError(f'{path!r} has no accuracies of the EMA weights (no eval_ema_top1 column): the run was '
                         'trained without --model-ema, so these are not the weights it evaluated')
    columns = [key for key in _ACCURACIES if f'{prefix}{key}' in rows[0]]
    rows = list({int(row['epoch']): row for row in rows}.values())  # the last row of each epoch
    rows.sort(key=lambda row: int(row['epoch']))
    if ema:  # epochs before --model-ema was added at a resume have no EMA accuracies
        rows = [row for row in rows if row.get(f'{prefix}top1') not in (None, '')]

    def epoch(row):
        return dict(epoch=int(row['epoch']), **{key: float(row[f'{prefix}{key}']) for key in columns})

    best = max(rows, key=lambda row: float(row[f'{prefix}top1']))  # max keeps the first of equals
    return dict(best=epoch(best), final=epoch(rows[-1]), num_epochs=int(rows[-1]['epoch']) + 1, ema=ema)


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


def _results_markdown(summary: Optional[Dict[str, Any]], validation: Optional[Dict[str, Any]],
                      weights: Optional[Dict[str, Any]] = None) -> str:
    lines = []
    if weights is not None:  # the table below shows the run's best and final epochs, which may be others
        kind = 'EMA weights' if weights.get('use_ema') else 'weights'
        epoch = weights.get('epoch')
        lines += [f'The published {kind} are those of epoch {epoch} of the run.' if epoch is not None
                  else f'The checkpoint of the published {kind} does not record its epoch.', '']
    if summary:
        columns = [key for key in _ACCURACIES if key in summary['final']]
        of_ema = 'of the EMA weights ' if summary.get('ema') else ''
        lines += [
            f"Training run, {summary['num_epochs']} epochs (eval accuracy {of_ema}from the run's summary.csv):",
            '',
            '| | Epoch | ' + ' | '.join(f'{_ACCURACIES[key]} (%)' for key in columns) + ' |',
            '|---|---|' + '---|' * len(columns),
        ]
        for name in ('best', 'final'):
            row = summary[name]
            lines.append(f"| {name.title()} | {row['epoch']} | " + ' | '.join(f'{row[k]:.2f}' for k in columns) + ' |')
    if validation:
        if lines:
            lines.append('')
        scores = [f"top-1 {validation['top1']:.2f}%"]
        if 'top5' in validation:
            scores.append(f"top-5 {validation['top5']:.2f}%")
        scores += [f'{_ACCURACIES[key].lower()} {validation[key]:.2f}%'
                   for key in ('relational_top1', 'non_relational_top1') if key in validation]
        where = ', '.join(f'{k} {validation[k]}' for k in ('dataset', 'split', 'questions', 'num_samples', 'seed')
                          if k in validation)
        lines.append(f"`validate.py` on these weights: {', '.join(scores)} ({where}).")
    if not summary and not validation:
        lines.append('No results were recorded for these weights.')
    return '\n'.join(lines).strip()


def _has_self_attention(model: nn.Module) -> bool:
    blocks = getattr(model, 'blocks', None)
    return not blocks or getattr(blocks[0], 'attn', None) is not None


def _describe(model: nn.Module, dataset_title: str) -> Dict[str, str]:
    """What the model is, in words: the card's description, model type and architecture details."""
    question = getattr(model, 'question_dim', None) is not None
    task = 'visual question answering model' if question else 'image classifier'
    block_type = getattr(model, 'block_type', None)
    if block_type is not None:  # HamMixer
        description = _MIXER.format(block_type=block_type, task=task, dataset=dataset_title,
                                    block_text=_MIXER_BLOCKS[block_type])
        details = [f'- **Mixer block:** `{block_type}`']
        if getattr(model, 'n_iter', 1) > 1:
            details.append(f'- **Block iterations:** each block applied {model.n_iter} times, weights shared '
                           f'(`n_iter={model.n_iter}`)')
        if getattr(model, 'lcoeff', 0):
            details.append(f'- **W2 penalty in training:** `lcoeff={model.lcoeff:g}`')
    elif settings := gwl_settings(model):
        gwl = model.blocks[0].mlp  # gwl_settings found it
        description = _AIT.format(task=task, dataset=dataset_title,
                                  blocks=_AIT_BLOCKS[_has_self_attention(model), isinstance(gwl.fc1, nn.Linear)],
                                  write=_AIT_WRITE[gwl.write_attn.bottleneck is not None],
                                  read=_AIT_READ[hasattr(gwl.read, 'beta')])
        if getattr(model, 'memory_reset_each_epoch', False):
            description += _RESET_MEMORY
        if gwl.memory.decorrelation:
            description += _DECORRELATION.format(strength=gwl.memory.decorrelation)
        details = ['- **Global Workspace Layer:**'] + [f'  - {k}: {v}' for k, v in settings]
    else:
        description = _VIT_TWIN.format(task=task, dataset=dataset_title)
        if not _has_self_attention(model):
            description += _NO_SELF_ATTENTION
        details = ['- **Global Workspace Layer:** none (the ViT twin, `gwl=False`)']
    if question:
        description += _QUESTION
    paper, bibtex = _MIXER_PAPER if block_type is not None else _AIT_PAPER
    return dict(
        description=description,
        paper=paper,
        citation=f'```bibtex\n{bibtex}\n```',
        model_type=('Visual question answering (an image and a question in, an answer out)' if question
                    else 'Image classification / feature backbone'),
        architecture_details='\n'.join(details),
        usage_template='usage_question_answering.md' if question else 'usage_image_classification.md',
        task_tag='visual-question-answering' if question else 'image-classification',
    )


def _read_template(name: str, template_dir: Traversable) -> Template:
    path = template_dir / name
    if not path.is_file():
        raise FileNotFoundError(f'model card template {str(path)!r} not found; the templates are package data of '
                                'timm_ait (timm_ait/hub_cards/*.md), so this install of timm-ait is incomplete')
    return Template(path.read_text(encoding='utf-8'))


def render_model_card(
        model: nn.Module,
        repo_id: str,
        dataset: str,
        summary: Optional[Dict[str, Any]] = None,
        validation: Optional[Dict[str, Any]] = None,
        input_size: Optional[Tuple[int, int, int]] = None,
        template_dir: Traversable = TEMPLATE_DIR,
        weights: Optional[Dict[str, Any]] = None,
) -> str:
    """README.md of ``model`` published as ``repo_id``, trained on ``dataset`` (a training-script name).

    ``input_size`` is the (C, H, W) the weights were trained at; by default the model's pretrained cfg's.
    ``template_dir``: a folder (a path or an ``importlib.resources`` traversable) holding ``model_card.md`` and
    the usage templates; by default the ones shipped in the package.
    ``weights``: which weights these are (``epoch`` of the run, ``use_ema``), said on the card.
    """
    from .data.factory import DATASETS

    cfg = model.pretrained_cfg
    input_size = tuple(input_size or cfg['input_size'])
    dataset_title = DATASETS.get(dataset, dataset)
    about = _describe(model, dataset_title)
    cost = profile_model(model, input_size)
    values = dict(
        model_name=repo_id.split('/')[-1],
        repo_id=repo_id,
        architecture=cfg['architecture'],
        license=cfg.get('license', 'apache-2.0'),
        dataset_id=HUB_DATASET_IDS.get(dataset, dataset.split('/')[-1]),
        dataset_title=dataset_title,
        params_m=f'{sum(p.numel() for p in model.parameters()) / 1e6:.3g}',
        gmacs=f"{cost['gmacs']:.3g}",
        activations_m=f"{cost['activations_m']:.3g}",
        image_size=f'{input_size[1]} x {input_size[2]}',
        results=_results_markdown(summary, validation, weights),
        usage=_read_template(about.pop('usage_template'), template_dir).substitute(repo_id=repo_id).rstrip(),
        **about,
    )
    return _read_template('model_card.md', template_dir).substitute(values)
