"""Time two speed-ups considered for the GWL's training step and not taken (docs/benchmarks.md, "Targets not met").

1. Top-k by blocks: keep the k blocks of ``--block`` scores with the largest maxima, then the top-k of their
   entries. Each of the k largest scores lies in one of those blocks (a block left out has k blocks above its
   maximum), so the kept set is the same; checked here on the timed scores before timing.
2. ``foreach=True`` for AdamW on the CPU, for an AiT and its twin.

    python tools/gwl_candidates.py                       # the Sort-of-CLEVR write at width 256
    python tools/gwl_candidates.py --pool 640 --k 64     # any pool and k
"""
import argparse
import time

import torch


def plain_topk(scores_t: torch.Tensor, k: int):
    """As the GWL does it: the (T, H*S) scores transposed to (H*S, T), then one top-k a row."""
    return scores_t.t().contiguous().topk(k, dim=-1, sorted=False)


def blocked_topk(scores_t: torch.Tensor, k: int, block: int):
    """The same set from the (T, H*S) layout, by blocks of ``block`` patches (T a multiple of it)."""
    T, HS = scores_t.shape
    maxima = scores_t.view(T // block, block, HS).amax(1).t()                       # HS, T / block
    _, blocks = maxima.topk(k, dim=-1, sorted=False)
    candidates = (blocks.unsqueeze(-1) * block + torch.arange(block)).reshape(HS, k * block)
    values, pick = scores_t.t().gather(-1, candidates).topk(k, dim=-1, sorted=False)
    return values, candidates.gather(-1, pick)


def best_ms(fn, rounds: int = 5, repeats: int = 100) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--pool', type=int, default=64 * 27, help='patches T in the pool (batch x tokens)')
    parser.add_argument('--rows', type=int, default=8 * 32, help='heads x slots')
    parser.add_argument('--k', type=int, default=32)
    parser.add_argument('--block', type=int, default=8)
    parser.add_argument('--model', default='ait_small_w256_patch15_75', help='for the AdamW timing')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    if args.pool % args.block:
        parser.error(f'--pool {args.pool} is not a multiple of --block {args.block}')
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    scores_t = torch.randn(args.pool, args.rows)
    _, want = plain_topk(scores_t, args.k)
    _, got = blocked_topk(scores_t, args.k, args.block)
    if not torch.equal(want.sort(-1).values, got.sort(-1).values):
        raise SystemExit('blocked top-k kept another set of patches')
    plain = best_ms(lambda: plain_topk(scores_t, args.k))
    blocked = best_ms(lambda: blocked_topk(scores_t, args.k, args.block))
    print(f'top-k of {args.k} over {args.pool} patches, {args.rows} rows: plain {plain:.2f} ms, '
          f'by blocks of {args.block} {blocked:.2f} ms')

    import timm
    import timm_ait  # noqa: F401  registers the models
    from timm.optim import create_optimizer_v2
    for gwl in (True, False):
        model = timm.create_model(args.model, gwl=gwl)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        ms = {}
        for foreach in (False, True):
            opt = create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=1e-4, foreach=foreach)
            ms[foreach] = best_ms(opt.step, repeats=20)
        print(f'AdamW step, {args.model} gwl={gwl}: foreach=False {ms[False]:.2f} ms, foreach=True {ms[True]:.2f} ms')


if __name__ == '__main__':
    main()
