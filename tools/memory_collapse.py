#!/usr/bin/env python3
"""How fast the memory write alone pulls the slots together: the mean cosine between slots after n
training-mode writes of random patches, weights frozen at their initialisation.

    python tools/memory_collapse.py                                   # this project's GWL, both writes
    python tools/memory_collapse.py --authors-mha /path/to/their/MHA.py   # and the authors' write

The authors' write (github yuweisunn/associative-transformer) is their ``MultiHeadAttention`` from
``MHA.py`` (top-k attention of the slots over the patches, output layer, dropout, ``+ M``, LayerNorm),
then their ``MemoryUpdate`` arithmetic: ``M <- 0.9 M + 0.1 out``, rows scaled to unit length. The patches
are what a GWL writes, ``LN(fc2(GELU(fc1(x))))`` of Gaussian x. Every slot's candidate is a softmax
average of the same pool of patches, so the slots drift together whenever their top-k sets overlap;
the balance loss cannot pull them apart once their queries agree. Nothing is trained here: this
isolates the write.

    python tools/memory_collapse.py --model ait_tiny_patch32_64 --data triangle      # whole models, by layer
    python tools/memory_collapse.py --model ait_small_patch4_32 --batch 8 --model-arg bottleneck=32 --cost

With ``--model`` a whole registered model (frozen random weights, training mode, no gradient) writes
its memories from batches of Gaussian-noise or Triangle images (resized to the model's input), and
each layer's participation rank and mean |cos| between slots are printed after the given numbers
of writes, for each write variant:

* ``paper``: the paper's write (the registered models).
* ``decorrelate=ETA``: the library's ``memory_decorrelation=ETA``, one step of orthogonal iteration
  after each write.
* ``centre``: each write's increment ``M_hat - M`` centred across slots, so that no write adds a
  component common to all slots (the drift that the mean of the patches brings).
* ``polar=ETA``: each unit row moved a fraction ETA towards the same row of the polar factor of the
  unit-row memory (the nearest matrix with orthonormal rows, a tight frame when S > m), lengths kept:
  symmetric orthogonalisation, which lifts every singular value at once.

``centre`` and ``polar`` are experiments that live here only. ``--cost`` times a training-mode
forward (with autograd) of each variant, interleaved in one run, as a ratio to ``paper``.
"""
import argparse
import ast
import importlib.util
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm_ait  # noqa: F401  (registers the models)
from timm_ait.data.triangle import generate_triangles
from timm_ait.layers import (  # noqa: E402
    ExplicitMemory, GlobalWorkspaceLayer, mean_abs_slot_cosine, mean_slot_cosine, memory_participation_rank,
)


def ours(args, l2: bool):
    torch.manual_seed(args.seed)
    gwl = GlobalWorkspaceLayer(args.dim, num_slots=args.slots, slot_dim=args.slot_dim, gwl_heads=args.heads,
                               bottleneck=args.k, memory_l2norm=l2).train()
    x_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for step in range(1, args.writes + 1):
            gwl(torch.randn(1, args.pool, args.dim, generator=x_gen))
            if step in args.report:
                yield step, gwl.memory.slot_similarity(), float(gwl.balance_loss)


def authors(args, path: str):
    spec = importlib.util.spec_from_file_location('authors_mha', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(args.seed)
    mha = module.MultiHeadAttention(args.heads, args.dim, args.slot_dim, args.slot_dim).train()
    ff = nn.Sequential(nn.Linear(args.dim, 4 * args.dim), nn.GELU(), nn.Linear(4 * args.dim, args.dim),
                       nn.LayerNorm(args.dim))
    memory = torch.randn(args.slots, args.slot_dim)
    x_gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for step in range(1, args.writes + 1):
            h = ff(torch.randn(args.pool, args.dim, generator=x_gen))
            out, _, loss = mha(memory[None], h[None], h[None], args.k)
            memory = 0.9 * memory + 0.1 * out[0]
            memory = memory / memory.pow(2).sum(1, keepdim=True).sqrt()
            if step in args.report:
                # their loss already carries the coefficient 1e-2; report the balance loss itself
                yield step, mean_slot_cosine(memory), float(loss) / 1e-2


def polar_step(memory: torch.Tensor, strength: float) -> torch.Tensor:
    """The ``polar=ETA`` variant: unit rows moved ``strength`` of the way to the rows of their polar factor."""
    norms = memory.norm(dim=-1, keepdim=True)
    unit = memory / norms.clamp_min(1e-12)
    w, _, vh = torch.linalg.svd(unit, full_matrices=False)
    target = F.normalize(w @ vh, dim=-1)
    return norms * F.normalize(unit + strength * (target - unit), dim=-1) - memory


def use_variant(model: nn.Module, variant: str) -> None:
    """Give every memory of ``model`` (built with the paper's write) the write of ``variant``."""
    if variant == 'paper':
        return
    name, _, value = variant.partition('=')
    for mem in (m for m in model.modules() if isinstance(m, ExplicitMemory)):
        if name == 'decorrelate':
            mem.decorrelation = float(value)
        elif name in ('centre', 'polar'):
            mem.write = _replacement_write(mem, name, float(value or 0))
        else:
            raise ValueError(f'unknown write variant {variant!r}; expected paper, decorrelate=ETA, centre, polar=ETA')


def _replacement_write(mem: ExplicitMemory, name: str, strength: float):
    library_write = mem.write  # the paper's write (single process: the rank average is the identity)

    def write(candidate, current, empty=False):
        if name == 'centre':
            return library_write(candidate - (candidate - current).mean(0, keepdim=True), current, empty)
        new = library_write(candidate, current, empty)
        new = new + polar_step(new.detach(), strength)
        if mem.l2_normalize:
            new = F.normalize(new, dim=-1)
        mem.memory.copy_(new.detach())
        return new
    return write


def build_model(args, variant: str) -> nn.Module:
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, **args.model_args).train()
    model.requires_grad_(False)
    use_variant(model, variant)
    return model


def image_batches(args, model: nn.Module):
    """Endless batches of ``args.data`` images at the model's input size, the same stream for every variant."""
    _, height, width = model.pretrained_cfg['input_size']
    if 'img_size' in args.model_args:
        height = width = args.model_args['img_size']
    gen = torch.Generator().manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    while True:
        if args.data == 'noise':
            yield torch.randn(args.batch, 3, height, width, generator=gen)
        else:
            # the dots are 0 or 1 (the Triangle cfg has mean 0, std 1); area-resized to the model's input
            x = torch.from_numpy(generate_triangles(args.batch, rng)['images']).float().div(255)
            x = x[:, None].expand(-1, 3, -1, -1)
            yield x if x.shape[-2:] == (height, width) else F.interpolate(x, size=(height, width), mode='area')


def model_collapse(args, variant: str):
    """Yield (writes, {memory name: (participation rank, mean |cos|)}) at each of ``args.report``."""
    model = build_model(args, variant)
    memories = {n: m for n, m in model.named_modules() if isinstance(m, ExplicitMemory)}

    def measures():
        return {n: (memory_participation_rank(m.memory), mean_abs_slot_cosine(m.memory)) for n, m in memories.items()}
    if 0 in args.report:
        yield 0, measures()
    batches = image_batches(args, model)
    with torch.no_grad():
        for step in range(1, args.writes + 1):
            model(next(batches))
            if step in args.report:
                yield step, measures()


def forward_cost(args, variants, rounds: int = 7, repeats: int = 3):
    """Median time of a training-mode forward (autograd on) of each variant, as a ratio to the first."""
    models = {v: build_model(args, v) for v in variants}
    for model in models.values():
        model.requires_grad_(True)
    x = next(image_batches(args, models[variants[0]]))
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for v, model in models.items():
            model(x)  # warm
            start = time.perf_counter()
            for _ in range(repeats):
                model(x)
            times[v].append((time.perf_counter() - start) / repeats)
    base = statistics.median(times[variants[0]])
    return {v: statistics.median(t) / base for v, t in times.items()}


def _model_arg(text: str):
    key, _, value = text.partition('=')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_models(args):
    torch.set_num_threads(args.threads)
    args.model_args = dict(args.model_arg)
    print(f'{args.model} {args.model_args}, {args.data} images, batch {args.batch}, seed {args.seed}; '
          'participation rank / mean |cos| between slots, by layer, after n writes', flush=True)
    for variant in args.variants:
        for step, values in model_collapse(args, variant):
            cells = '  '.join(f'{name.replace(".mlp.memory", "")}: {rank:5.2f} / {cos:.3f}'
                              for name, (rank, cos) in values.items())
            print(f'{variant:16s} {step:5d}  {cells}', flush=True)
    if args.cost:
        ratios = forward_cost(args, args.variants, rounds=args.cost_rounds)
        print('training-mode forward time, ratio to ' + args.variants[0] + ': '
              + '  '.join(f'{v}: {r:.3f}' for v, r in ratios.items()), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dim', type=int, default=768, help='patch width D (AiT-Small: 768)')
    parser.add_argument('--pool', type=int, default=512, help='patches per write, B*N (Triangle, batch 128: 512)')
    parser.add_argument('--k', type=int, default=64, help='bottleneck size (Triangle: 64)')
    parser.add_argument('--slots', type=int, default=32)
    parser.add_argument('--slot-dim', type=int, default=32)
    parser.add_argument('--heads', type=int, default=8)
    parser.add_argument('--writes', type=int, default=300)
    parser.add_argument('--report', type=int, nargs='+', default=[1, 10, 50, 100, 200, 300])
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--authors-mha', metavar='MHA.py', help="the authors' MHA.py, to run their write too")
    parser.add_argument('--model', help='a registered model: measure its layers on images instead (see above)')
    parser.add_argument('--model-arg', type=_model_arg, action='append', default=[], metavar='KEY=VALUE',
                        help='a keyword of the model (repeatable), e.g. bottleneck=32')
    parser.add_argument('--data', choices=('noise', 'triangle'), default='noise')
    parser.add_argument('--batch', type=int, default=128)
    parser.add_argument('--variants', nargs='+', default=['paper', 'decorrelate=0.05', 'centre', 'polar=0.05'])
    parser.add_argument('--cost', action='store_true', help='also time a training-mode forward of each variant')
    parser.add_argument('--cost-rounds', type=int, default=15, help='interleaved timing rounds of --cost')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    if args.model:
        if args.report == parser.get_default('report'):
            args.report = [0, 50, 300, 1000]
        if args.writes == parser.get_default('writes'):
            args.writes = max(args.report)
        return run_models(args)
    runs = {'ours, EWMA (default)': ours(args, False), 'ours, EWMA + unit rows (memory_l2norm)': ours(args, True)}
    if args.authors_mha:
        runs["authors' MHA.py + MemoryUpdate"] = authors(args, args.authors_mha)
    print(f'D={args.dim}, pool={args.pool}, k={args.k}, {args.slots} slots of {args.slot_dim}, {args.heads} heads; '
          'mean cosine between slots (balance loss of the write)')
    for name, rows in runs.items():
        print(f'{name:40s} ' + '  '.join(f'{step}: {cos:.3f} ({bal:.1f})' for step, cos, bal in rows), flush=True)


if __name__ == '__main__':
    main()
