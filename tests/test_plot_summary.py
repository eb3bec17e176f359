"""tools/plot_summary.py draws summary.csv files (fixtures from real train.py runs) into a PNG."""
import csv
import struct
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
from tools import plot_summary  # noqa: E402

FIXTURES = REPO / 'tests' / 'fixtures'
WITH_TIME = FIXTURES / 'summary_with_train_time.csv'  # train.py with its train_time_s column
WITHOUT_TIME = FIXTURES / 'ait_tiny_patch32_64.triangle' / 'summary.csv'  # written before that column


def csv_column(path, name):
    with open(path, newline='') as f:
        return [float(row[name]) for row in csv.DictReader(f)]


def png_size(path):
    """(width, height) from the IHDR chunk, which follows the 8-byte PNG signature."""
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG file'
    assert data[12:16] == b'IHDR'
    return struct.unpack('>II', data[16:24])


def test_draws_a_png_of_both_panels(tmp_path):
    out = tmp_path / 'curves.png'
    plot_summary.main([str(WITH_TIME), str(WITHOUT_TIME), '--labels', 'timed', 'untimed',
                       '--reference', '99.47', 'paper', '--dpi', '50', '-o', str(out)])
    width, height = png_size(out)
    assert (width, height) == (11 * 50, int(4.2 * 50))  # the figure size at the requested dpi


def test_time_axis_is_the_cumulative_training_time_in_minutes():
    summaries = [('timed', plot_summary.read_summary(str(WITH_TIME))),
                 ('untimed', plot_summary.read_summary(str(WITHOUT_TIME)))]
    fig = plot_summary.plot_summaries(summaries, references=[(99.47, 'paper')])
    ax_time, ax_epoch = fig.axes
    seconds = csv_column(WITH_TIME, 'train_time_s')
    minutes = [sum(seconds[:i + 1]) / 60 for i in range(len(seconds))]
    # only the run with a time column is in the time panel (the other has no train_time_s)
    [timed] = [line for line in ax_time.lines if line.get_label() == 'timed']
    assert [line.get_label() for line in ax_time.lines if not line.get_label().startswith('_')] == ['timed']
    assert list(timed.get_xdata()) == pytest.approx(minutes)
    assert list(timed.get_ydata()) == csv_column(WITH_TIME, 'eval_top1')
    for label, path in (('timed', WITH_TIME), ('untimed', WITHOUT_TIME)):
        [line] = [line for line in ax_epoch.lines if line.get_label() == label]
        assert list(line.get_xdata()) == [e + 1 for e in csv_column(path, 'epoch')]
        assert list(line.get_ydata()) == csv_column(path, 'eval_top1')


def test_several_metrics_get_one_line_each(tmp_path):
    fig = plot_summary.plot_summaries([('run', plot_summary.read_summary(str(WITH_TIME)))],
                                      metrics=('eval_top1', 'eval_top5'))
    labels = [line.get_label() for line in fig.axes[1].lines]
    assert labels == ['run, test top-1 (%)', 'run, test top-5 (%)']


@pytest.mark.parametrize('args,message', [
    (['missing.csv'], "summary file 'missing.csv' does not exist"),
    ([str(WITH_TIME), '--metrics', 'eval_relational_top1'], "has no column 'eval_relational_top1'"),
    ([str(WITH_TIME), str(WITHOUT_TIME), '--labels', 'one'], '1 labels for 2 summary files'),
])
def test_bad_requests_are_clear_errors(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot_summary.main([*args, '-o', str(tmp_path / 'x.png')])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / 'x.png').exists()
