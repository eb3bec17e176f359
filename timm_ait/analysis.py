"""What an AiT does with its memory: the paper's Fig. 4 (each prior's bottleneck attention over
the patch positions), Fig. 8 (diversity of the selected patches) and Fig. 9 (Hopfield energy of
the patches before and after the read), with what says whether a layer's memory has collapsed:
the mean cosine between its priors and the balance loss of its gates.

:func:`analyze` runs one forward in which every Global Workspace Layer writes as in training,
on a deep copy of the model, so that the model and its memory are never changed, and returns a
:class:`LayerAnalysis` per layer. :func:`save_analysis` writes the numbers as JSON and the
figures as PNG (matplotlib, the ``analysis`` extra: ``pip install 'timm-ait[analysis]'``).
"""
import copy
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy
import torch
from torch import nn

from .layers import (
    BottleneckGates, GlobalWorkspaceLayer, HopfieldRetrieval, balance_loss_from_gates, hopfield_energy,
    mean_slot_cosine, mean_abs_slot_cosine, memory_participation_rank,
)

__all__ = [
    'GWLRecord', 'LayerAnalysis', 'record_gwl_forward', 'selection_mask', 'diversity_score',
    'slot_attention_maps', 'hopfield_energies', 'check_analysable', 'analyze', 'require_matplotlib',
    'plot_slot_attention', 'plot_energy', 'save_analysis',
]

MATPLOTLIB_MISSING = "the analysis figures need matplotlib: pip install 'timm-ait[analysis]'"


@dataclass
class GWLRecord:
    """What one GWL did in a recorded forward.

    ``gates`` are those of the memory write over the squashed batch of B*N patches; ``states``
    (B, N, D) are the patches the Hopfield read starts from and ``retrieved`` what it returns,
    with ``attractors`` (S, D) the up-projected memory it used. The last two are None for the
    'no Hopfield' ablation, whose read is a cross-attention. ``memory`` (S, m) is the memory the
    forward started from.
    """
    gates: BottleneckGates
    memory: torch.Tensor
    states: torch.Tensor
    retrieved: Optional[torch.Tensor]
    attractors: Optional[torch.Tensor]
    beta: float


def _gwl_layers(model: nn.Module) -> Dict[str, GlobalWorkspaceLayer]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GlobalWorkspaceLayer)}
    if not layers:
        raise ValueError(f'{type(model).__name__} has no Global Workspace Layer to analyse: expected an AiT '
                         '(an AssociativeTransformer built with gwl=True), got a model without one')
    return layers


def check_analysable(model: nn.Module) -> None:
    """A ValueError naming what was expected, before any work, unless ``model`` is an AiT with a GWL and a
    patch grid (what :func:`analyze` maps the selections onto)."""
    _gwl_layers(model)
    if not hasattr(getattr(model, 'patch_embed', None), 'grid_size'):
        raise ValueError(f'{type(model).__name__} has no patch_embed with a grid_size to map the selections onto: '
                         'expected a timm ViT-style AiT')


@torch.no_grad()
def record_gwl_forward(
        model: nn.Module,
        images: torch.Tensor,
        questions: Optional[torch.Tensor] = None,
) -> Dict[str, GWLRecord]:
    """Record every GWL of one forward of ``images`` in which the memory is written as in training.

    ``questions`` go to a model that answers questions about the images, ``model(images, questions)``.

    The forward runs on a deep copy of ``model``: the write changes the copy's memory only. In
    the copy, only the GWLs are switched to training, so dropout and drop-path stay off and the
    record is deterministic.
    """
    probe = copy.deepcopy(model).eval()
    layers = _gwl_layers(probe)
    seen = {name: {} for name in layers}

    def keep_gates(store, module, args, output):
        store['gates'] = output[1]

    def keep_read_inputs(store, module, args, kwargs):
        # a copy, so that whatever the layer later does to its h in place cannot change the record
        store['states'], store['memory'] = args[0].clone(), args[1]

    before = {name: gwl.memory.memory.clone() for name, gwl in layers.items()}
    for name, gwl in layers.items():
        gwl.training = True  # this module only: its children (dropouts) stay in eval
        gwl.write_attn.register_forward_hook(partial(keep_gates, seen[name]))
        gwl.read.register_forward_pre_hook(partial(keep_read_inputs, seen[name]), with_kwargs=True)
    if questions is None:
        probe(images)
    else:
        probe(images, questions)

    records = {}
    for name, gwl in layers.items():
        store = seen[name]
        hopfield = isinstance(gwl.read, HopfieldRetrieval)
        records[name] = GWLRecord(
            gates=store['gates'],
            memory=before[name],
            states=store['states'],
            retrieved=gwl.read(store['states'], store['memory']) if hopfield else None,
            attractors=gwl.read.attractors(store['memory']) if hopfield else None,
            beta=gwl.read.beta if hopfield else math.nan,
        )
    return records


def selection_mask(gates: BottleneckGates) -> torch.Tensor:
    """(H, S, T) bool: which patches each head and slot kept (all of them for dense attention)."""
    if gates.indices is None:
        return gates.weights > 0
    heads, slots, _ = gates.weights.shape
    mask = torch.zeros(heads, slots, gates.num_patches, dtype=torch.bool, device=gates.weights.device)
    return mask.scatter_(-1, gates.indices, True)


def diversity_score(gates: BottleneckGates) -> float:
    """Share of distinct patches among all the patches the slots of a layer select (Fig. 8).

    Per head (each head selects on its own scores), then averaged over heads. 1 when no two
    slots share a patch; it cannot exceed ``min(T, S*k) / (S*k)`` for a pool of T patches.
    """
    mask = selection_mask(gates)
    distinct = mask.any(dim=1).sum(-1).float()
    selected = mask.sum(dim=(1, 2)).float()
    return (distinct / selected).mean().item()


def slot_attention_maps(
        gates: BottleneckGates,
        batch_size: int,
        grid_size: Tuple[int, int],
        num_prefix_tokens: int = 0,
        num_suffix_tokens: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Each slot's bottleneck attention over the patch positions (Fig. 4).

    Returns ``attention`` (S, gh, gw): the gate weight at each position, averaged over heads and
    summed over the batch (a slot's map sums to one, prefix tokens aside); ``frequency``
    (S, gh, gw): the share of (head, sample) pairs in which the slot selected the patch at that
    position; and ``chance``: the frequency a position would have if the slot's k selections
    ignored position (k / T). Prefix tokens (class token) and suffix tokens (the question token of
    a question-answering AiT) are left out.
    """
    heads, slots, pool = gates.weights.shape[0], gates.weights.shape[1], gates.num_patches
    tokens = pool // batch_size
    grid = (slots, *grid_size)
    attention = gates.dense().float().mean(0).view(slots, batch_size, tokens).sum(1)
    frequency = selection_mask(gates).float().view(heads, slots, batch_size, tokens).mean(dim=(0, 2))
    kept = pool if gates.indices is None else gates.indices.shape[-1]
    patches = slice(num_prefix_tokens, tokens - num_suffix_tokens)
    return attention[:, patches].reshape(grid), frequency[:, patches].reshape(grid), kept / pool


def hopfield_energies(record: GWLRecord) -> Tuple[torch.Tensor, torch.Tensor]:
    """Energy (B, N) of each patch before and after the read, in float64 (Fig. 9).

    'After' is the state the read retrieves, before the layer's skip connection adds the patch
    back. One Hopfield update never increases the energy; float64 keeps rounding from blurring
    that.
    """
    if record.attractors is None:
        raise ValueError('this layer reads with cross-attention (no Hopfield ablation): it has no energy')
    attractors = record.attractors.double()
    before = hopfield_energy(record.states.double(), attractors, record.beta)
    after = hopfield_energy(record.retrieved.double(), attractors, record.beta)
    return before, after


@dataclass
class LayerAnalysis:
    """The numbers behind the figures, for one GWL."""
    name: str
    attention: torch.Tensor          # (S, gh, gw), see slot_attention_maps
    selection_frequency: torch.Tensor  # (S, gh, gw)
    chance_frequency: float
    diversity: float
    diversity_ceiling: float
    memory_slot_cosine: float  # mean cosine between the priors; 1 when the memory has collapsed to one
    memory_abs_cosine: float  # mean |cosine|: also 1 for a memory split into +v and -v
    memory_rank: float  # participation rank of the memory: 1 when every prior lies on one line
    balance_loss: float  # of the gates, as training sees it (AiT eq. 4-6)
    energy_before: Optional[torch.Tensor]  # (B, N); None without a Hopfield read
    energy_after: Optional[torch.Tensor]

    def summary(self) -> Dict:
        """JSON-ready numbers: the maps as nested lists, the energies as statistics."""
        result = dict(
            layer=self.name,
            num_slots=self.attention.shape[0],
            grid_size=list(self.attention.shape[1:]),
            diversity=self.diversity,
            diversity_ceiling=self.diversity_ceiling,
            memory_slot_cosine=self.memory_slot_cosine,
            memory_abs_cosine=self.memory_abs_cosine,
            memory_rank=self.memory_rank,
            balance_loss=self.balance_loss,
            chance_frequency=self.chance_frequency,
            attention=self.attention.tolist(),
            selection_frequency=self.selection_frequency.tolist(),
            energy=None,
        )
        if self.energy_before is not None:
            change = self.energy_after - self.energy_before
            result['energy'] = dict(
                before_mean=self.energy_before.mean().item(),
                after_mean=self.energy_after.mean().item(),
                before_range=[self.energy_before.min().item(), self.energy_before.max().item()],
                after_range=[self.energy_after.min().item(), self.energy_after.max().item()],
                mean_change=change.mean().item(),
                largest_change=change.max().item(),  # <= 0: no patch gained energy
                num_patches=change.numel(),
            )
        return result


def analyze(model: nn.Module, images: torch.Tensor, questions: Optional[torch.Tensor] = None) -> List[LayerAnalysis]:
    """Analyse every GWL of ``model`` (a timm ViT-style model with a ``patch_embed``) on ``images``.

    A question-answering AiT also takes ``questions``; its question token is left out of the maps.
    """
    check_analysable(model)
    grid_size = tuple(model.patch_embed.grid_size)
    num_prefix_tokens = getattr(model, 'num_prefix_tokens', 0)
    num_suffix_tokens = 0 if questions is None else getattr(model, 'num_question_tokens', 0)
    batch_size = images.shape[0]
    analyses = []
    for name, record in record_gwl_forward(model, images, questions).items():
        attention, frequency, chance = slot_attention_maps(
            record.gates, batch_size, grid_size, num_prefix_tokens, num_suffix_tokens)
        mask = selection_mask(record.gates)
        per_slot = mask.sum(-1).max().item()
        slots = mask.shape[1]
        energy_before, energy_after = hopfield_energies(record) if record.attractors is not None else (None, None)
        analyses.append(LayerAnalysis(
            name=name,
            attention=attention.cpu(),
            selection_frequency=frequency.cpu(),
            chance_frequency=chance,
            diversity=diversity_score(record.gates),
            diversity_ceiling=min(record.gates.num_patches, slots * per_slot) / (slots * per_slot),
            memory_slot_cosine=mean_slot_cosine(record.memory),
            memory_abs_cosine=mean_abs_slot_cosine(record.memory),
            memory_rank=memory_participation_rank(record.memory),
            balance_loss=balance_loss_from_gates(record.gates).item(),
            energy_before=None if energy_before is None else energy_before.cpu(),
            energy_after=None if energy_after is None else energy_after.cpu(),
        ))
    return analyses


# ----------------------------------------------------------------------------------- figures

def require_matplotlib():
    """matplotlib's Figure class, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(MATPLOTLIB_MISSING) from error
    return Figure


def _grid_shape(panels: int) -> Tuple[int, int]:
    cols = math.ceil(math.sqrt(panels))
    return math.ceil(panels / cols), cols


def plot_slot_attention(layer: LayerAnalysis, image: torch.Tensor, path: str) -> None:
    """One panel per slot: its attention over the image's patch grid; outlined, the positions it
    selects more often than chance. The first panel shows ``image`` (C, H, W in [0, 1])."""
    Figure = require_matplotlib()
    from matplotlib.patches import Rectangle

    slots, grid_h, grid_w = layer.attention.shape
    height, width = image.shape[-2:]
    patch_h, patch_w = height / grid_h, width / grid_w
    extent = (0, width, height, 0)
    rows, cols = _grid_shape(slots + 1)
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), extent=extent)
    axes[0].set_title('image 0', fontsize=7)
    for slot, ax in enumerate(axes[1:slots + 1]):
        ax.imshow(layer.attention[slot].numpy(), cmap='viridis', extent=extent, interpolation='nearest')
        for row, col in (layer.selection_frequency[slot] > layer.chance_frequency).nonzero().tolist():
            ax.add_patch(Rectangle((col * patch_w, row * patch_h), patch_w, patch_h,
                                   fill=False, edgecolor='red', linewidth=0.8))
        ax.set_title(f'slot {slot}', fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[slots + 1:]:
        ax.set_visible(False)
    fig.suptitle(f'{layer.name}: bottleneck attention per slot (batch sum, head mean)\n'
                 f'red: selected more often than chance ({layer.chance_frequency:.3f}); '
                 f'diversity {layer.diversity:.3f}', fontsize=8)
    fig.savefig(path, dpi=120)


def plot_energy(layers: Sequence[LayerAnalysis], path: str) -> None:
    """Per layer with a Hopfield read, histograms of the patches' energy before and after it."""
    Figure = require_matplotlib()
    layers = [layer for layer in layers if layer.energy_before is not None]
    fig = Figure(figsize=(3.2 * len(layers), 2.8))
    axes = fig.subplots(1, len(layers), squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        before, after = layer.energy_before.flatten().numpy(), layer.energy_after.flatten().numpy()
        bins = numpy.histogram_bin_edges(numpy.concatenate([before, after]), bins=40)
        ax.hist(before, bins=bins, alpha=0.6, label=f'before (mean {before.mean():.2f})')
        ax.hist(after, bins=bins, alpha=0.6, label=f'after (mean {after.mean():.2f})')
        ax.set_title(layer.name, fontsize=8)
        ax.set_xlabel('Hopfield energy', fontsize=7)
        ax.set_ylabel('patches', fontsize=7)
        ax.legend(fontsize=6)
    fig.suptitle('Patch energy before and after the Hopfield read', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@contextmanager
def _naming_failures(path: str) -> Iterator[None]:
    """An OSError while writing ``path`` names it: a write or close that fails (a full disk) does not."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, f'cannot write {path!r}: {e.strerror or e}') from e


def save_analysis(
        layers: Sequence[LayerAnalysis],
        output_dir: str,
        image: torch.Tensor,
        meta: Optional[Dict] = None,
) -> List[str]:
    """Write ``analysis.json``, one ``attention_<layer>.png`` per layer and ``energy.png``.

    ``image`` (C, H, W in [0, 1]) is drawn beside the attention maps; ``meta`` (model,
    data, ...) is stored in the JSON. Returns the paths written.
    """
    require_matplotlib()
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, 'analysis.json')
    with _naming_failures(json_path), open(json_path, 'w') as f:
        json.dump(dict(meta or {}, layers=[layer.summary() for layer in layers]), f, indent=1)
    paths = [json_path]
    for layer in layers:
        path = os.path.join(output_dir, f'attention_{layer.name}.png')
        with _naming_failures(path):
            plot_slot_attention(layer, image, path)
        paths.append(path)
    if any(layer.energy_before is not None for layer in layers):
        path = os.path.join(output_dir, 'energy.png')
        with _naming_failures(path):
            plot_energy(layers, path)
        paths.append(path)
    return paths
