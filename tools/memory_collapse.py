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
"""
import argparse
import importlib.util
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_ait.layers import GlobalWorkspaceLayer, mean_slot_cosine  # noqa: E402


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
    args = parser.parse_args()
    runs = {'ours, EWMA (default)': ours(args, False), 'ours, EWMA + unit rows (memory_l2norm)': ours(args, True)}
    if args.authors_mha:
        runs["authors' MHA.py + MemoryUpdate"] = authors(args, args.authors_mha)
    print(f'D={args.dim}, pool={args.pool}, k={args.k}, {args.slots} slots of {args.slot_dim}, {args.heads} heads; '
          'mean cosine between slots (balance loss of the write)')
    for name, rows in runs.items():
        print(f'{name:40s} ' + '  '.join(f'{step}: {cos:.3f} ({bal:.1f})' for step, cos, bal in rows), flush=True)


if __name__ == '__main__':
    main()
