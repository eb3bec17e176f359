"""tools/sweep_table.py: a seed sweep's table, against sums done by hand."""
import csv
import json

from tools import sweep_table


def make_run(root, name, top1, curve, rank):
    folder = root / name
    folder.mkdir()
    with open(folder / 'summary.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['epoch', 'eval_top1', 'train_memory_rank_blocks0'])
        for epoch, value in enumerate(curve):
            writer.writerow([epoch, value, rank])
    (folder / 'validate.json').write_text(json.dumps({'top1': top1, 'collapsed_memory_top1': top1 - 1.0}))


def test_means_intervals_and_differences(tmp_path):
    for seed, (a, b) in enumerate([(90.0, 80.0), (92.0, 84.0), (94.0, 82.0)]):
        make_run(tmp_path, f'g-new-seed{seed}', a, [50, 70, 80], 4.0)
        make_run(tmp_path, f'g-old-seed{seed}', b, [50, 60, 76], 1.0)
    make_run(tmp_path, 'g-old-seed9', 81.0, [50], 1.0)
    (tmp_path / 'g-old-seed9' / 'validate.json').unlink()  # unfinished: left out
    table = sweep_table.main(['--group', 'g', '--reference', 'old', '--target', '75', '--results-dir', str(tmp_path)])
    new_row = next(line for line in table.splitlines() if line.startswith('| new'))
    # new: mean 92, sd 2, t(2) = 4.303 -> half width 4.303 * 2 / sqrt(3) = 4.97; reaches 75 at epoch 3
    assert '92.00 +- 4.97 (n=3)' in new_row and '| 0,1,2 |' in new_row and '3.00 +- 0.00 (n=3)' in new_row
    # new - old: 92 - 82 = 10; variances 4/3 + 4/3, Welch df = 4, t = 2.776: 2.776 * sqrt(8/3) = 4.53
    assert new_row.endswith('| +10.00 +- 4.53 |')
    assert '1.00 +- 0.00 (n=3)' in new_row  # the collapsed-memory swap cost one point in every run
    rows = list(csv.DictReader(open(tmp_path / 'g.csv')))
    assert [(r['arm'], r['seed']) for r in rows] == [('new', '0'), ('new', '1'), ('new', '2'),
                                                     ('old', '0'), ('old', '1'), ('old', '2')]


def test_compares_each_kind_of_question(tmp_path):
    for seed, (rel_new, rel_old) in enumerate([(60.0, 50.0), (64.0, 52.0), (62.0, 48.0)]):
        for arm, rel in (('new', rel_new), ('old', rel_old)):
            make_run(tmp_path, f'g-{arm}-seed{seed}', 75.0, [50, 70, 80], 2.0)
            results = tmp_path / f'g-{arm}-seed{seed}' / 'validate.json'
            results.write_text(json.dumps({'top1': 75.0, 'relational_top1': rel, 'non_relational_top1': 98.0}))
    table = sweep_table.main(['--group', 'g', '--reference', 'old', '--compare', 'top1', 'relational_top1',
                              'non_relational_top1', '--results-dir', str(tmp_path)])
    header, _, new_row, _ = table.splitlines()
    assert header.endswith('| top1 - old | relational_top1 - old | non_relational_top1 - old |')
    # relational: new 62 (sd 2), old 50 (sd 2): +12, Welch df 4, 2.776 * sqrt(8/3) = 4.53; the others equal
    assert new_row.endswith('| +0.00 +- 0.00 | +12.00 +- 4.53 | +0.00 +- 0.00 |')
    assert '62.00 +- 4.97 (n=3)' in new_row


def test_a_compared_accuracy_missing_from_a_run_is_named(tmp_path, capsys):
    make_run(tmp_path, 'g-old-seed0', 75.0, [50], 1.0)
    try:
        sweep_table.main(['--group', 'g', '--reference', 'old', '--compare', 'relational_top1',
                          '--results-dir', str(tmp_path)])
    except SystemExit as e:
        assert 'has no accuracy relational_top1' in str(e) and 'its numbers: collapsed_memory_top1, top1' in str(e)
    else:
        raise AssertionError('a run without relational_top1 was compared')


def test_curves_by_epoch_are_the_mean_and_range_of_the_runs_that_reached_it():
    a = {'epoch': [0.0, 1.0, 2.0], 'eval_top1': [50.0, 60.0, 70.0]}
    b = {'epoch': [1.0, 0.0], 'eval_top1': [80.0, 40.0]}  # rows in any order; stopped after two epochs
    assert sweep_table.by_epoch([a, b], 'eval_top1') == [(0, 45.0, 40.0, 50.0), (1, 70.0, 60.0, 80.0),
                                                         (2, 70.0, 70.0, 70.0)]


def test_plot_draws_each_metric_and_leaves_out_an_arm_without_it(tmp_path):
    for seed in range(2):
        make_run(tmp_path, f'g-ait-seed{seed}', 90.0, [50, 70 + seed], 3.0 + seed)
        folder = tmp_path / f'g-vit-seed{seed}'
        folder.mkdir()
        (folder / 'summary.csv').write_text('epoch,eval_top1\n0,55\n1,75\n')
        (folder / 'validate.json').write_text(json.dumps({'top1': 91.0}))
    out = tmp_path / 'sweep.png'
    sweep_table.main(['--group', 'g', '--reference', 'ait', '--results-dir', str(tmp_path), '--plot', str(out),
                      '--plot-metrics', 'eval_top1', 'train_memory_rank_blocks0'])
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    curves = {arm: [sweep_table.read_curves(str(tmp_path / f'g-{arm}-seed{s}')) for s in range(2)]
              for arm in ('ait', 'vit')}
    top1, rank = sweep_table.plot_sweep(curves, ['eval_top1', 'train_memory_rank_blocks0']).axes
    assert [line.get_label() for line in top1.lines] == ['ait (2 runs)', 'vit (2 runs)']
    assert list(top1.lines[0].get_ydata()) == [50.0, 70.5] and list(top1.lines[0].get_xdata()) == [1, 2]
    assert [line.get_label() for line in rank.lines] == ['ait (2 runs)']  # the twin has no memory
    assert list(rank.lines[0].get_ydata()) == [3.5, 3.5]


def test_plot_of_a_column_no_run_has_is_refused_naming_it(tmp_path):
    make_run(tmp_path, 'g-ait-seed0', 90.0, [50], 3.0)
    try:
        sweep_table.main(['--group', 'g', '--reference', 'ait', '--results-dir', str(tmp_path),
                          '--plot', str(tmp_path / 'x.png'), '--plot-metrics', 'eval_top5'])
    except SystemExit as e:
        assert 'has eval_top5' in str(e) and 'eval_top1' in str(e)
    else:
        raise AssertionError('a missing column was drawn')
    assert not (tmp_path / 'x.png').exists()
    assert not (tmp_path / 'g.csv').exists()  # nothing written: the command is refused whole


def test_plot_into_a_missing_folder_is_refused_before_any_work(tmp_path, capsys):
    make_run(tmp_path, 'g-ait-seed0', 90.0, [50], 3.0)
    try:
        sweep_table.main(['--group', 'g', '--reference', 'ait', '--results-dir', str(tmp_path),
                          '--plot', str(tmp_path / 'nowhere' / 'x.png')])
    except SystemExit:
        assert 'its folder does not exist' in capsys.readouterr().err
    else:
        raise AssertionError('a plot into a missing folder was accepted')
    assert not (tmp_path / 'g.csv').exists()  # refused before the table was written


def test_a_compared_key_that_is_not_a_number_is_named(tmp_path):
    make_run(tmp_path, 'g-old-seed0', 75.0, [50], 1.0)
    results = tmp_path / 'g-old-seed0' / 'validate.json'
    results.write_text(json.dumps({'top1': 75.0, 'model': 'ait_tiny_patch32_64'}))
    try:
        sweep_table.main(['--group', 'g', '--reference', 'old', '--compare', 'model', '--results-dir', str(tmp_path)])
    except SystemExit as e:
        assert 'has no accuracy model' in str(e) and 'its numbers: top1' in str(e)
    else:
        raise AssertionError('a model name was compared as an accuracy')


def test_paired_differences_are_taken_seed_by_seed_over_the_seeds_both_arms_have(tmp_path):
    for seed, (a, b) in enumerate([(90.0, 80.0), (92.0, 84.0), (94.0, 82.0)]):
        make_run(tmp_path, f'g-new-seed{seed}', a, [50, 70, 80], 4.0)
        make_run(tmp_path, f'g-old-seed{seed}', b, [50, 60, 76], 1.0)
    make_run(tmp_path, 'g-new-seed5', 10.0, [50], 4.0)  # no partner in the reference arm: not paired
    table = sweep_table.main(['--group', 'g', '--reference', 'old', '--paired', '--results-dir', str(tmp_path)])
    header, _, new_row, _ = table.splitlines()
    assert header.endswith('| top1 - old (paired) |')
    # per seed 10, 8, 12: mean 10, sd 2, t(2) = 4.303 -> 4.303 * 2 / sqrt(3) = 4.97 (by value order: 10, 10, 10)
    assert new_row.endswith('| +10.00 +- 4.97 (n=3) |')
    assert sweep_table.paired({0: 1.0}, {0: 0.0, 1: 2.0}) == 'n/a (n=1)'


def test_the_per_run_csv_holds_every_accuracy_whatever_is_compared(tmp_path):
    for seed in range(2):
        for arm in ('new', 'old'):
            make_run(tmp_path, f'g-{arm}-seed{seed}', 75.0, [50, 80], 2.0)
            (tmp_path / f'g-{arm}-seed{seed}' / 'validate.json').write_text(json.dumps(
                {'top1': 75.0, 'top5': 99.0, 'relational_top1': 50.0 + seed, 'count_top1': 30.0,
                 'rotated_memory_top1': 74.0, 'rotated_memory_count_top1': 20.0}))
    written = []
    for compare in (['top1'], ['count_top1', 'relational_top1']):
        sweep_table.main(['--group', 'g', '--reference', 'old', '--compare', *compare, '--results-dir', str(tmp_path)])
        written.append((tmp_path / 'g.csv').read_text())
    assert written[0] == written[1]  # a query that compares other keys does not rewrite the csv's layout
    header = written[0].splitlines()[0].split(',')
    # the three accuracies of the json; top5 is not a top-1 and the swapped memory's figures become one drop
    assert header == ['arm', 'seed', 'count_top1', 'epochs_to_collapse_blocks0', 'epochs_to_target',
                      'memory_rank_blocks0', 'relational_top1', 'rotated_swap_drop', 'top1']


def test_the_epoch_a_layer_collapsed_is_the_first_to_end_with_its_rank_below_one_and_a_half(tmp_path):
    ranks = {0: ([6.0, 1.49, 1.2], [9.0, 3.0, 1.0]),   # layer 0 after epoch 2, layer 1 after epoch 3
             1: ([1.8, 1.6, 1.0], [1.4, 2.0, 1.1]),    # 3, and 1 (a later rise does not undo it)
             2: ([1.5, 1.51, 1.6], [8.0, 7.0, 1.2])}   # never (1.5 is not below), and 3
    for seed, (block0, block1) in ranks.items():
        folder = tmp_path / f'g-ait-seed{seed}'
        folder.mkdir()
        rows = ['epoch,eval_top1,train_memory_rank_blocks0,train_memory_rank_blocks1']
        rows += [f'{epoch},50,{a},{b}' for epoch, (a, b) in enumerate(zip(block0, block1))]
        (folder / 'summary.csv').write_text('\n'.join(rows) + '\n')
        (folder / 'validate.json').write_text(json.dumps({'top1': 80.0}))
    old = tmp_path / 'g-old-seed0'  # a run from before the rank was logged has no such column
    old.mkdir()
    (old / 'summary.csv').write_text('epoch,eval_top1\n0,50\n')
    (old / 'validate.json').write_text(json.dumps({'top1': 80.0}))
    table = sweep_table.main(['--group', 'g', '--reference', 'ait', '--results-dir', str(tmp_path)])
    header, _, ait, old_row = table.splitlines()
    columns = header.strip('|').split(' | ')
    cell = dict(zip(columns, ait.strip('|').split(' | ')))
    # layer 0: 2 and 3 (seed 2 never collapsed: left out), mean 2.5, sd 0.707, t(1) = 12.706 -> 6.35
    assert cell['epochs_to_collapse_blocks0'] == '2.50 +- 6.35 (n=2 of 3)'
    # layer 1: 3, 1, 3: mean 2.33, sd 1.155, t(2) = 4.303 -> 2.87
    assert cell['epochs_to_collapse_blocks1'] == '2.33 +- 2.87 (n=3)'
    assert dict(zip(columns, old_row.strip('|').split(' | ')))['epochs_to_collapse_blocks0'] == 'n/a'
    assert sweep_table.mean_ci([float('nan')] * 3) == 'never (of 3)'
    assert sweep_table.mean_ci([4.0, float('nan')]) == '4.00 (n=1 of 2)'


def test_arms_limits_the_table_and_the_plot_to_those_named_and_the_csv_keeps_every_run(tmp_path, capsys,
                                                                                      monkeypatch):
    for seed in range(2):
        for arm, top1 in (('ait', 80.0), ('vit', 82.0 + seed), ('ablation', 70.0)):
            make_run(tmp_path, f'g-{arm}-seed{seed}', top1, [50, 80], 2.0)
    table = sweep_table.main(['--group', 'g', '--reference', 'ait', '--arms', 'ait', 'vit',
                              '--results-dir', str(tmp_path)])
    assert [line.split(' | ')[0] for line in table.splitlines()[2:]] == ['| ait', '| vit']
    assert {row['arm'] for row in csv.DictReader(open(tmp_path / 'g.csv'))} == {'ait', 'vit', 'ablation'}
    drawn = []
    plot = sweep_table.plot_sweep
    monkeypatch.setattr(sweep_table, 'plot_sweep', lambda curves, metrics: drawn.append(sorted(curves)) or plot(
        curves, metrics))
    figure = tmp_path / 'sweep.png'
    sweep_table.main(['--group', 'g', '--reference', 'ait', '--arms', 'ait', 'vit', '--results-dir', str(tmp_path),
                      '--plot', str(figure)])
    assert drawn == [['ait', 'vit']] and figure.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    for arms, said in ((['vit'], '--reference ait is not among --arms vit'),
                       (['ait', 'vti'], 'no finished run of arm vti')):
        try:
            sweep_table.main(['--group', 'g', '--reference', 'ait', '--arms', *arms, '--results-dir', str(tmp_path)])
        except SystemExit as e:
            assert said in str(e) + capsys.readouterr().err
        else:
            raise AssertionError(f'--arms {arms} was accepted')
