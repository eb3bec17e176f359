#!/usr/bin/env python3
"""Draw accuracy against training wall-clock time and against epoch from train.py's summary.csv files.

    python tools/plot_summary.py output/train/ait/summary.csv output/train/vit/summary.csv \\
        --labels AiT-Small "ViT twin" --reference 99.47 "paper, AiT-Small" --output triangle.png

One PNG with two panels: the metric (default ``eval_top1``) against the cumulative training time in
minutes (the sum of summary.csv's ``train_time_s``, the seconds each epoch spent training, so a run
resumed in parts counts only the time spent training), and against the epoch. Several metrics
(e.g. ``--metrics eval_relational_top1 eval_non_relational_top1``) are drawn with one line style
each, several runs with one colour each. A summary.csv without ``train_time_s`` (written before
train.py recorded it) is drawn in the epoch panel only.
"""
import argparse
import csv
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TIME_COLUMN = 'train_time_s'
METRIC_NAMES = {
    'eval_top1': 'test top-1 (%)',
    'eval_top5': 'test top-5 (%)',
    'eval_relational_top1': 'relational top-1 (%)',
    'eval_non_relational_top1': 'non-relational top-1 (%)',
    'eval_loss': 'test loss',
    'train_loss': 'training loss',
}
LINE_STYLES = ('-', '--', ':', '-.')


def read_summary(path: str) -> Dict[str, List[float]]:
    """The columns of a summary.csv as lists of floats, in epoch order, with a clear error if unreadable."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'summary file {path!r} does not exist')
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'epoch' not in rows[0]:
        raise ValueError(f'{path!r} is not a train.py summary.csv: expected a header with an epoch column and '
                         f'at least one row')
    columns = {}
    for name in rows[0]:
        try:
            columns[name] = [float(row[name]) for row in rows]
        except (TypeError, ValueError):
            continue  # a column that is not numeric everywhere is not plotted
    order = sorted(range(len(rows)), key=lambda i: columns['epoch'][i])
    return {name: [values[i] for i in order] for name, values in columns.items()}


def cumulative_minutes(seconds: Sequence[float]) -> List[float]:
    total, out = 0.0, []
    for s in seconds:
        total += s
        out.append(total / 60)
    return out


def plot_summaries(
        summaries: Sequence[Tuple[str, Dict[str, List[float]]]],
        metrics: Sequence[str] = ('eval_top1',),
        references: Sequence[Tuple[float, str]] = (),
        title: Optional[str] = None,
):
    """A figure with the metrics against training minutes (left) and epoch (right).

    ``summaries``: (label, columns) pairs as :func:`read_summary` returns them.
    """
    for label, columns in summaries:
        missing = [m for m in metrics if m not in columns]
        if missing:
            raise ValueError(f'run {label!r} has no column {missing[0]!r}; its numeric columns are '
                             f'{sorted(columns)}')
    fig, (ax_time, ax_epoch) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for r, (label, columns) in enumerate(summaries):
        color = colors[r % len(colors)]
        for m, metric in enumerate(metrics):
            name = label if len(metrics) == 1 else f'{label}, {METRIC_NAMES.get(metric, metric)}'
            style = dict(color=color, linestyle=LINE_STYLES[m % len(LINE_STYLES)], marker='o', markersize=3)
            # epochs count from 0 in summary.csv; the first point is after one epoch
            ax_epoch.plot([e + 1 for e in columns['epoch']], columns[metric], label=name, **style)
            if TIME_COLUMN in columns:
                ax_time.plot(cumulative_minutes(columns[TIME_COLUMN]), columns[metric], label=name, **style)
    for value, text in references:
        for ax in (ax_time, ax_epoch):
            ax.axhline(value, color='0.4', linewidth=0.8, linestyle=':')
        # at the left, where rising curves are still low
        ax_epoch.annotate(f'{text} ({value:g})', xy=(0, value), xycoords=('axes fraction', 'data'),
                          xytext=(4, 3), textcoords='offset points', ha='left', va='bottom', fontsize=8,
                          color='0.3')
    ylabel = METRIC_NAMES.get(metrics[0], metrics[0]) if len(metrics) == 1 else 'accuracy (%)'
    ax_time.set_xlim(left=0)
    ax_time.set_xlabel('training time (minutes)')
    ax_time.set_ylabel(ylabel)
    ax_epoch.set_xlabel('epoch')
    ax_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not ax_time.lines:
        ax_time.text(0.5, 0.5, f'no {TIME_COLUMN} column in these summaries', transform=ax_time.transAxes,
                     ha='center', va='center', color='0.4')
    for ax in (ax_time, ax_epoch):
        ax.grid(True, linewidth=0.5, alpha=0.5)
    # below both panels, where it hides no curve
    handles, labels = ax_epoch.get_legend_handles_labels()
    fig.legend(handles, labels, loc='outside lower center', ncols=min(len(labels), 2 if len(metrics) > 1 else 4),
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('summaries', nargs='+', metavar='SUMMARY_CSV', help="train.py's summary.csv files")
    parser.add_argument('--labels', nargs='+', default=None,
                        help='one label per file (default: the name of the folder holding it)')
    parser.add_argument('--metrics', nargs='+', default=['eval_top1'], metavar='COLUMN',
                        help='summary.csv columns to draw, e.g. eval_relational_top1 eval_non_relational_top1')
    parser.add_argument('--reference', nargs=2, action='append', default=[], metavar=('VALUE', 'TEXT'),
                        help='a horizontal line, e.g. --reference 99.47 "paper, AiT-Small" (repeatable)')
    parser.add_argument('--title', default=None)
    parser.add_argument('-o', '--output', required=True, help='PNG file to write')
    parser.add_argument('--dpi', type=int, default=120)
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.summaries):
        parser.error(f'--labels: {len(args.labels)} labels for {len(args.summaries)} summary files')
    references = []
    for value, text in args.reference:
        try:
            references.append((float(value), text))
        except ValueError:
            parser.error(f'--reference {value!r} {text!r}: expected a number, then its text')
    args.reference = references
    return parser, args


def main(argv=None) -> str:
    parser, args = parse_args(argv)
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in args.summaries]
    try:
        summaries = [(label, read_summary(path)) for label, path in zip(labels, args.summaries)]
        fig = plot_summaries(summaries, args.metrics, args.reference, args.title)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f'{parser.prog}: error: {error}\n')
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    plt.close(fig)
    print(f'wrote {args.output}')
    return args.output


if __name__ == '__main__':
    main(sys.argv[1:])
