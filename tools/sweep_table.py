#!/usr/bin/env python3
"""The table of a seed sweep of tools/run_evidence.py: each arm's final accuracy, updates to a target
accuracy, memory rank (and the epoch it first fell below 1.5: a collapse) and the memory-swap probe, as mean
and 95% confidence interval over its seeds, and each arm's difference from a reference arm (Welch's
interval) in each compared accuracy.
With ``--paired`` the difference is taken seed by seed instead (the seed also draws the generated data and
its order, so two arms of one seed see the same images), over the seeds both arms have, with Student's
interval.

    python tools/sweep_table.py --group triangle_tiny --reference paper --target 75
    python tools/sweep_table.py --group sort_of_clevr --reference ait --compare top1 relational_top1 non_relational_top1
    python tools/sweep_table.py --group sort_of_clevr --reference ait --compare relational_top1 --paired
    python tools/sweep_table.py --group sort_of_clevr --reference ait --arms ait decorrelation vit  # no ablations
    python tools/sweep_table.py --group triangle_tiny --reference paper \
        --plot docs/results/triangle_tiny-sweep.png --plot-metrics eval_top1 train_memory_rank_blocks0

Reads docs/results/<group>-<arm>-seed<N>/ (summary.csv and validate.json, as run_evidence.py writes them);
prints a markdown table and writes it, with one row per run, to docs/results/<group>.csv. ``--plot`` also
draws each summary.csv column of ``--plot-metrics`` against the epoch, one panel each: the mean over an arm's
seeds as a line, their range as a band (an arm without the column, the ViT twin's memory rank, is left out of
that panel). Against the epoch, not the training time: a run's time counts whatever else the machine ran.
"""
import argparse
import csv
import glob
import json
import math
import os
import re
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

# two-sided 95% quantiles of Student's t by degrees of freedom (larger: the normal's 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: float) -> float:
    if df >= 30:
        return 1.96 if df > 120 else 2.0
    return _T95[max(k for k in _T95 if k <= max(1, int(df)))]


def half_width(values: List[float]) -> float:
    """Half the width of Student's 95% interval of the mean of two or more values."""
    return t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def mean_ci(values: List[float]) -> str:
    """Mean and 95% interval of the values that are numbers; a NaN is an event that never came (a target not
    reached, a memory that never collapsed), counted in the n as "n=2 of 3", or "never (of 3)" for all."""
    events = [v for v in values if not math.isnan(v)]
    of = '' if len(events) == len(values) else f' of {len(values)}'
    if not values:
        return 'n/a'
    if not events:
        return f'never (of {len(values)})'
    m = statistics.mean(events)
    if len(events) < 2:
        return f'{m:.2f} (n=1{of})'
    return f'{m:.2f} +- {half_width(events):.2f} (n={len(events)}{of})'


def welch(a: List[float], b: List[float]) -> str:
    """Mean of a - b with Welch's 95% interval."""
    if len(a) < 2 or len(b) < 2:
        return 'n/a'
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    if va + vb == 0:
        return f'{diff:+.2f} +- 0.00'
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return f'{diff:+.2f} +- {t95(df) * math.sqrt(va + vb):.2f}'


def paired(a: Dict[int, float], b: Dict[int, float]) -> str:
    """Mean over the seeds both have of a[seed] - b[seed], with Student's 95% interval."""
    differences = [a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())]
    if len(differences) < 2:
        return f'n/a (n={len(differences)})'
    return f'{statistics.mean(differences):+.2f} +- {half_width(differences):.2f} (n={len(differences)})'


# a participation rank below this: the memory's slots lie about on one line (1 exactly, S for S orthogonal slots)
COLLAPSED_RANK = 1.5


def read_run(folder: str, target: float, compare: Sequence[str] = ('top1',)) -> Optional[Dict[str, float]]:
    summary, results = os.path.join(folder, 'summary.csv'), os.path.join(folder, 'validate.json')
    if not (os.path.isfile(summary) and os.path.isfile(results)):
        return None
    with open(summary, newline='') as f:
        rows = list(csv.DictReader(f))
    with open(results) as f:
        validation = json.load(f)
    reached = [int(r['epoch']) + 1 for r in rows if float(r['eval_top1']) >= target]
    last = rows[-1]
    numbers = sorted(k for k, v in validation.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    missing = [key for key in compare if key not in numbers]
    if missing:
        raise SystemExit(f'error: {results} has no accuracy {", ".join(missing)} (its numbers: {", ".join(numbers)})')
    run = dict(epochs_to_target=float(reached[0]) if reached else float('nan'))
    # every accuracy the run has (by kind of question too), not only those compared: the table and the
    # per-run csv keep one layout whatever --compare asks
    accuracies = [k for k in numbers if k.endswith('top1') and '_memory_' not in k]  # a swap's figures: below
    run.update({key: float(validation[key]) for key in (*accuracies, *compare)})
    for key, value in last.items():
        if key.startswith(('train_memory_rank_', 'train_memory_abs_cos_')) and value:
            run[key[len('train_'):]] = float(value)
        if key.startswith('train_memory_rank_') and value:
            # when the layer's memory collapsed: the first epoch (from 1) that ended with its rank that low
            collapsed = [int(r['epoch']) + 1 for r in rows if r[key] and float(r[key]) < COLLAPSED_RANK]
            layer = key[len('train_memory_rank_'):]
            run[f'epochs_to_collapse_{layer}'] = float(collapsed[0]) if collapsed else float('nan')
    for key, value in validation.items():
        if key.endswith('_memory_top1'):
            run[f'{key[:-len("_memory_top1")]}_swap_drop'] = validation['top1'] - value
    return run


def read_curves(folder: str) -> Dict[str, List[float]]:
    """The numeric columns of a run's summary.csv, by epoch."""
    with open(os.path.join(folder, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    columns: Dict[str, List[float]] = {}
    for name in rows[0] if rows else ():
        try:
            columns[name] = [float(row[name]) for row in rows]
        except (TypeError, ValueError):
            continue  # empty in some epochs: not a curve
    return columns


def by_epoch(curves: Sequence[Dict[str, List[float]]], metric: str) -> List[Tuple[int, float, float, float]]:
    """(epoch, mean, min, max) of ``metric`` over the runs that reached each epoch, in epoch order."""
    values: Dict[int, List[float]] = {}
    for columns in curves:
        for epoch, value in zip(columns['epoch'], columns[metric]):
            values.setdefault(int(epoch), []).append(value)
    return [(epoch, statistics.mean(v), min(v), max(v)) for epoch, v in sorted(values.items())]


def plot_sweep(curves: Dict[str, List[Dict[str, List[float]]]], metrics: Sequence[str]):
    """A figure of each metric against the epoch, a panel each: an arm's mean over its runs and their range."""
    from matplotlib.figure import Figure  # a figure of its own, outside pyplot's state: files only
    known = {name for runs in curves.values() for columns in runs for name in columns}
    missing = [m for m in metrics if m not in known]
    if missing:
        raise SystemExit(f'error: no run\'s summary.csv has {", ".join(missing)}; they have {", ".join(sorted(known))}')
    fig = Figure(figsize=(4.6 * len(metrics), 3.8), layout='constrained')
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for colour, (arm, runs) in enumerate(sorted(curves.items())):
            having = [columns for columns in runs if metric in columns]
            if having:
                rows = by_epoch(having, metric)
                epochs = [epoch + 1 for epoch, *_ in rows]  # counted from 1: the value after that epoch
                runs = f'{len(having)} run{"s" if len(having) > 1 else ""}'
                ax.plot(epochs, [r[1] for r in rows], color=f'C{colour}', label=f'{arm} ({runs})')
                ax.fill_between(epochs, [r[2] for r in rows], [r[3] for r in rows], color=f'C{colour}',
                                alpha=0.2, linewidth=0)
        ax.set_xlabel('epoch')
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize='small')
    return fig


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--group', required=True, help='the runs docs/results/<group>-<arm>-seed<N>')
    parser.add_argument('--reference', required=True, help='the arm the others are compared with')
    parser.add_argument('--arms', nargs='+', metavar='ARM',
                        help='only these arms in the table and the plot (the per-run csv keeps every run)')
    parser.add_argument('--target', type=float, default=75.0, help='eval top-1 whose first epoch is reported')
    parser.add_argument('--compare', nargs='+', default=['top1'], metavar='KEY',
                        help="validate.json accuracies compared with the reference arm's (default: top1)")
    parser.add_argument('--paired', action='store_true',
                        help='differences seed by seed over the seeds both arms have (default: Welch, all seeds)')
    parser.add_argument('--results-dir', default=os.path.join('docs', 'results'))
    parser.add_argument('--plot', metavar='PNG', help='also draw --plot-metrics against the epoch into this file')
    parser.add_argument('--plot-metrics', nargs='+', default=['eval_top1'], metavar='COLUMN',
                        help='summary.csv columns for --plot, one panel each (default: eval_top1)')
    args = parser.parse_args(argv)
    if args.arms and args.reference not in args.arms:
        parser.error(f'--reference {args.reference} is not among --arms {" ".join(args.arms)}')
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        parser.error(f'--plot {args.plot}: its folder does not exist')
    runs: Dict[str, Dict[int, Dict[str, float]]] = {}  # every run of the group: the per-run csv holds them all
    curves: Dict[str, List[Dict[str, List[float]]]] = {}
    for folder in sorted(glob.glob(os.path.join(args.results_dir, f'{args.group}-*-seed*'))):
        found = re.fullmatch(rf'{re.escape(args.group)}-(.+)-seed(\d+)', os.path.basename(folder))
        shown = found is not None and (not args.arms or found.group(1) in args.arms)
        run = read_run(folder, args.target, args.compare if shown else ()) if found else None
        if run is not None:
            runs.setdefault(found.group(1), {})[int(found.group(2))] = run
            if shown:
                curves.setdefault(found.group(1), []).append(read_curves(folder))
    absent = [arm for arm in args.arms or () if arm not in runs]
    if absent:
        raise SystemExit(f'error: no finished run of arm {", ".join(absent)} under {args.results_dir}/{args.group}-*')
    if args.reference not in runs:
        raise SystemExit(f'error: no finished run of arm {args.reference!r} under {args.results_dir}/{args.group}-*')
    shown_runs = {arm: seeds for arm, seeds in runs.items() if not args.arms or arm in args.arms}
    keys = sorted({k for arm in shown_runs.values() for run in arm.values() for k in run})
    differences = ' | '.join(f'{key} - {args.reference}{" (paired)" if args.paired else ""}' for key in args.compare)
    lines = [f'| arm | seeds | {" | ".join(keys)} | {differences} |',
             '|' + '---|' * (len(keys) + 2 + len(args.compare))]
    reference = runs[args.reference]
    for arm, seeds in sorted(shown_runs.items()):
        cells = [mean_ci([r[k] for r in seeds.values() if k in r]) for k in keys]
        versus = ['' if arm == args.reference else
                  paired({s: r[key] for s, r in seeds.items()}, {s: r[key] for s, r in reference.items()})
                  if args.paired else welch([r[key] for r in seeds.values()], [r[key] for r in reference.values()])
                  for key in args.compare]
        lines.append(f'| {arm} | {",".join(map(str, sorted(seeds)))} | {" | ".join(cells)} | {" | ".join(versus)} |')
    table = '\n'.join(lines)
    figure = plot_sweep(curves, args.plot_metrics) if args.plot else None  # a column no run has: refused here
    every_key = sorted({k for arm in runs.values() for run in arm.values() for k in run})
    with open(os.path.join(args.results_dir, f'{args.group}.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['arm', 'seed', *every_key])
        for arm, seeds in sorted(runs.items()):
            for seed, run in sorted(seeds.items()):
                writer.writerow([arm, seed, *[run.get(k, '') for k in every_key]])
    if figure is not None:
        figure.savefig(args.plot, dpi=110)
    print(table)
    return table


if __name__ == '__main__':
    main()
