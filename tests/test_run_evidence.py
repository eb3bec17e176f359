"""tools/run_evidence.py: its configs, resuming a stopped run, and one run end to end at tiny size."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
from timm_ait import train
from tools import run_evidence

TINY = ['--model-kwargs', 'embed_dim=32', 'num_heads=2', 'num_slots=6', 'slot_dim=8', 'gwl_heads=2',
        'bottleneck=16', 'patch_size=16', '--train-num-samples', '64', '--val-num-samples', '40', '--epochs', '2',
        '-b', '16', '--warmup-epochs', '0', '--log-interval', '100']


def config(run):
    return run_evidence.read_config(run)


def test_every_run_has_a_config_train_py_accepts():
    assert len({r.name for r in run_evidence.RUNS}) == len(run_evidence.RUNS)
    for run in run_evidence.RUNS:
        args = train.parse_args(['-c', str(REPO / run_evidence.CONFIGS / run.config), '--seed', str(run.seed)])
        train.check_args(args)
        assert args.amp is False and args.workers == 0  # the CPU recipe: fp32, loading in the main process
        assert run.group in run_evidence.GROUPS


def test_compared_runs_share_one_recipe():
    """AiT and its ViT twin, and the ablations, differ only in the model's keyword arguments."""
    runs = {r.name: r for r in run_evidence.RUNS}

    def recipe(name):
        return {k: v for k, v in config(runs[name]).items() if k != 'model_kwargs'}

    assert recipe('triangle-ait') == recipe('triangle-vit')
    assert config(runs['triangle-vit'])['model_kwargs'] == {'gwl': False}
    for other in ('sort_of_clevr-vit-seed0', 'sort_of_clevr-no_bottleneck-seed0', 'sort_of_clevr-no_hopfield-seed0'):
        assert recipe(other) == recipe('sort_of_clevr-ait-seed0'), other
    assert config(runs['sort_of_clevr-no_hopfield-seed0'])['model_kwargs'] == {'ablation': 'no_hopfield'}
    assert {runs[n].seed for n in ('sort_of_clevr-ait-seed0', 'sort_of_clevr-ait-seed1')} == {0, 1}


def fake_run_folder(tmp_path, last_epoch, epochs=3):
    folder = tmp_path / 'out' / 'triangle-ait'
    folder.mkdir(parents=True)
    (folder / 'args.yaml').write_text(yaml.safe_dump({'epochs': epochs, 'cooldown_epochs': 0}))
    torch.save({'epoch': last_epoch, 'state_dict': {}}, folder / 'last.pth.tar')
    return folder


def test_a_stopped_run_is_resumed_from_its_last_checkpoint(tmp_path, monkeypatch):
    folder = fake_run_folder(tmp_path, last_epoch=0)
    commands = []
    monkeypatch.setattr(run_evidence, 'execute', lambda command, env, dry_run: commands.append(command))
    args = run_evidence.parse_args(['--runs', 'triangle-ait', '--output', str(tmp_path / 'out')])
    # the fake train.py does nothing, so the run is still at epoch 1 of 3 afterwards: an error
    with pytest.raises(RuntimeError, match='train.py ended at epoch 1 of 3'):
        run_evidence.train_run(run_evidence.RUNS[0], args, {})
    [command] = commands
    assert command[command.index('--resume') + 1] == str(folder / 'last.pth.tar')
    assert command[command.index('--seed') + 1] == '0'
    [part] = json.loads((folder / 'parts.json').read_text())
    assert part['first_epoch'] == 1 and part['epochs_done'] == 1 and part['ended']


def test_a_finished_run_is_not_trained_again(tmp_path, monkeypatch):
    fake_run_folder(tmp_path, last_epoch=2)
    monkeypatch.setattr(run_evidence, 'execute', lambda *a: pytest.fail('nothing should run'))
    args = run_evidence.parse_args(['--output', str(tmp_path / 'out')])
    assert run_evidence.train_run(run_evidence.RUNS[0], args, {}) is True


def test_unknown_run_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        run_evidence.parse_args(['--runs', 'triangle'])
    assert "unknown run 'triangle'" in capsys.readouterr().err


def test_one_run_end_to_end(tmp_path):
    """Train, validate, the Hub card, the results folder and the plot; a second call trains nothing."""
    out, results = tmp_path / 'out', tmp_path / 'results'
    argv = ['--runs', 'triangle-ait', '--output', str(out), '--data-dir', str(tmp_path / 'data'),
            '--results-dir', str(results), '--train-args', *TINY]
    run_evidence.main(argv)
    run_results = results / 'triangle-ait'
    summary = (run_results / 'summary.csv').read_text().splitlines()
    assert len(summary) == 3 and 'train_time_s' in summary[0]
    validation = json.loads((run_results / 'validate.json').read_text())
    # validate.py at batch size 1 on the final weights gives the last epoch's evaluation (batch 16)
    final_top1 = float(dict(zip(summary[0].split(','), summary[-1].split(',')))['eval_top1'])
    assert validation['batch_size'] == 1 and validation['num_samples'] == 40 and validation['seed'] == 0
    assert validation['top1'] == pytest.approx(final_top1, abs=1e-3)
    record = json.loads((run_results / 'run.json').read_text())
    assert record['seed'] == 0 and record['epochs'] == 2 and record['train_time_s'] > 0
    assert record['environment'] == run_evidence.CPU_TRAINING_ENV
    assert len(record['parts']) == 1 and record['parts'][0]['epochs_done'] == 2
    assert (results / 'triangle.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    card = (out / 'hub' / 'triangle-ait' / 'README.md').read_text()
    assert f"{validation['top1']:.2f}%" in card

    validated = (run_results / 'validate.json').stat().st_mtime
    run_evidence.main(argv)
    assert len(json.loads((out / 'triangle-ait' / 'parts.json').read_text())) == 1
    assert (out / 'triangle-ait' / 'validate.json').stat().st_mtime <= validated  # not validated again


def test_a_group_plot_draws_every_finished_run_of_the_group(tmp_path, monkeypatch):
    """Finishing triangle-vit in a later call than triangle-ait redraws triangle.png with both curves."""
    for name in ('triangle-ait', 'triangle-vit'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'summary.csv').write_text('epoch,eval_top1\n0,50.0\n')
    commands = []
    monkeypatch.setattr(run_evidence, 'execute', lambda command, env, dry_run: commands.append(command))
    args = run_evidence.parse_args(['--runs', 'triangle-vit', '--results-dir', str(tmp_path)])
    run_evidence.plot_group('triangle', args)
    [command] = commands
    assert [c for c in command if c.endswith('summary.csv')] == [
        str(tmp_path / 'triangle-ait' / 'summary.csv'), str(tmp_path / 'triangle-vit' / 'summary.csv')]
    labels = command[command.index('--labels') + 1:command.index('--metrics')]
    assert labels == [r.label for r in run_evidence.RUNS if r.group == 'triangle']
    assert command[command.index('-o') + 1] == str(tmp_path / 'triangle.png')


def test_a_finished_run_is_drawn_before_the_next_run_starts(monkeypatch):
    """Stopping the second run of a call (Ctrl-C) leaves the first one's group plot drawn."""
    events = []
    monkeypatch.setattr(run_evidence, 'publish_results', lambda run, args, env: events.append(('publish', run.name)))
    monkeypatch.setattr(run_evidence, 'plot_group', lambda group, args: events.append(('plot', group)))

    def train_run(run, args, env):
        if run.name == 'sort_of_clevr-vit-seed0':
            raise KeyboardInterrupt
        return True

    monkeypatch.setattr(run_evidence, 'train_run', train_run)
    with pytest.raises(SystemExit, match='sort_of_clevr-vit-seed0: stopped at epoch 0 of'):
        run_evidence.main(['--runs', 'sort_of_clevr-ait-seed0', 'sort_of_clevr-vit-seed0'])
    assert events == [('publish', 'sort_of_clevr-ait-seed0'), ('plot', 'sort_of_clevr')]


def test_sigterm_stops_a_background_run_and_records_the_part(tmp_path):
    """`pkill -TERM -f run_evidence.py` (SIGINT is ignored in the background): train.py stops, the part has an end."""
    import os
    import signal
    import subprocess
    import time
    pid_file = tmp_path / 'train.pid'
    fake_python = tmp_path / 'python'
    fake_python.write_text(f'#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n')
    fake_python.chmod(0o755)
    out = tmp_path / 'out'
    proc = subprocess.Popen([sys.executable, str(REPO / 'tools' / 'run_evidence.py'), '--runs', 'triangle-ait',
                             '--python', str(fake_python), '--output', str(out),
                             '--results-dir', str(tmp_path / 'res')],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as under nohup ... &
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.time() < deadline and proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        train_pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0].decode()
        assert proc.returncode != 0
        assert 'triangle-ait: stopped at epoch 0 of' in output and 'Traceback' not in output, output
        [part] = json.loads((out / 'triangle-ait' / 'parts.json').read_text())
        assert part['ended'] and part['epochs_done'] == 0
        with pytest.raises(ProcessLookupError):  # the fake train.py was killed and reaped
            os.kill(train_pid, 0)
    finally:
        proc.kill()
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize('body, says', [
    ('kill -TERM $$', 'train.py died with SIGTERM); the same command resumes it'),  # `pkill -TERM -f train.py`
    ('exit 3', 'train.py failed with exit status 3 (its output is above)'),
])
def test_a_stopped_or_failed_train_py_ends_in_one_line_not_a_traceback(tmp_path, body, says):
    import subprocess
    fake_python = tmp_path / 'python'
    fake_python.write_text(f'#!/bin/sh\n{body}\n')
    fake_python.chmod(0o755)
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'run_evidence.py'), '--runs', 'triangle-ait',
                           '--python', str(fake_python), '--output', str(tmp_path / 'out'),
                           '--results-dir', str(tmp_path / 'res')],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith('== triangle-ait: stopped at epoch 0 of ') and says in last_line, proc.stderr
    assert 'Traceback' not in proc.stderr
    [part] = json.loads((tmp_path / 'out' / 'triangle-ait' / 'parts.json').read_text())
    assert part['ended'] and part['epochs_done'] == 0
