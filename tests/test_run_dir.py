"""The run folder: one process writes into it at a time, new folders never collide, and summary.csv."""
import argparse
import logging
import os
import re
import socket
import subprocess
import sys
from datetime import datetime

import pytest

from timm_ait.train import loop, run_dir
from timm_ait.train.run_dir import CLAIM_FILE, RunDirClaim


def dead_pid():
    """The pid of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, '-c', 'pass'])
    proc.wait()
    return proc.pid


def test_a_second_claim_on_a_run_folder_is_refused_naming_the_folder_and_the_holder(tmp_path):
    folder = str(tmp_path / 'run')
    first = RunDirClaim(folder)
    with pytest.raises(FileExistsError, match=re.escape(
            f"run folder {folder!r} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, "
            f"see {os.path.join(folder, CLAIM_FILE)})")):
        RunDirClaim(folder)
    first.release()
    assert not os.path.exists(os.path.join(folder, CLAIM_FILE))
    RunDirClaim(folder).release()  # free again


def test_a_claim_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / 'run'
    folder.mkdir()
    pid = dead_pid()
    (folder / CLAIM_FILE).write_text(f'{socket.gethostname()} {pid} abcd\n')
    with caplog.at_level(logging.WARNING, logger='train'):
        claim = RunDirClaim(str(folder))
    assert f'taking over the claim of pid {pid} on {socket.gethostname()}, which no longer runs' in caplog.text
    assert (folder / CLAIM_FILE).read_text().split()[:2] == [socket.gethostname(), str(os.getpid())]
    claim.release()


def test_a_claim_from_another_host_is_refused(tmp_path):
    folder = tmp_path / 'run'
    folder.mkdir()
    (folder / CLAIM_FILE).write_text(f'elsewhere.example {dead_pid()} abcd\n')
    with pytest.raises(FileExistsError, match='in use by another run .*on host elsewhere.example'):
        RunDirClaim(str(folder))


def test_a_refused_run_leaves_no_folder_and_a_finished_one_no_claim(tmp_path):
    claim = RunDirClaim(str(tmp_path / 'new'))
    claim.release(remove_empty=True)
    assert not (tmp_path / 'new').exists()
    (tmp_path / 'kept').mkdir()
    (tmp_path / 'kept' / 'args.yaml').write_text('{}\n')
    RunDirClaim(str(tmp_path / 'kept')).release(remove_empty=True)
    assert sorted(os.listdir(tmp_path / 'kept')) == ['args.yaml']


TINY = ['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '-b', '8', '--workers', '0', '--epochs', '1',
        '--train-num-samples', '8', '--val-num-samples', '8', '--warmup-epochs', '0']


def test_a_second_launch_into_a_run_folder_in_use_is_refused_before_any_work(tmp_path):
    # what a first launch in its epoch 0 holds: the folder, its claim, no checkpoint yet
    first = RunDirClaim(str(tmp_path / 'x'))
    try:
        with pytest.raises(FileExistsError, match=re.escape(f"run folder {str(tmp_path / 'x')!r} is in use by "
                                                            f'another run (pid {os.getpid()} on host')):
            loop.main([*TINY, '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'x'])
        assert os.listdir(tmp_path / 'x') == [CLAIM_FILE] and not (tmp_path / 'data').exists()
    finally:
        first.release()
    # free again: the run goes, and releases its claim at the end
    loop.main([*TINY, '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'x'])
    assert (tmp_path / 'x' / 'last.pth.tar').is_file() and not (tmp_path / 'x' / CLAIM_FILE).exists()


def test_two_launches_in_one_second_get_two_folders(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2030, 1, 2, 3, 4, 5)

    monkeypatch.setattr(run_dir, 'datetime', Frozen)
    args = argparse.Namespace(resume='', experiment='', output=str(tmp_path), model='ait_tiny_patch32_64',
                              dataset='torch/cifar10')
    first, second = run_dir.resolve_output_dir(args), run_dir.resolve_output_dir(args)
    assert first != second
    for name in (first, second):
        assert re.fullmatch(r'20300102-030405-[0-9a-f]{6}-ait_tiny_patch32_64-torch_cifar10', os.path.basename(name))


def test_a_launch_that_loses_the_race_for_a_run_folder_is_refused(tmp_path, monkeypatch):
    # the other launch claims the folder after this one has looked at it, before it claims it
    other = []
    resolve = loop.resolve_output_dir

    def resolve_then_lose_the_race(args, resume_state=None):
        out = resolve(args, resume_state)
        other.append(RunDirClaim(out))
        return out

    monkeypatch.setattr(loop, 'resolve_output_dir', resolve_then_lose_the_race)
    try:
        with pytest.raises(FileExistsError, match='is in use by another run'):
            loop.main([*TINY, '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'x'])
        assert os.listdir(tmp_path / 'x') == [CLAIM_FILE] and not (tmp_path / 'data').exists()
    finally:
        other[0].release()


def summary_lines(path):
    with open(path, newline='') as f:
        return list(__import__('csv').reader(f))


def epoch_row(epoch, ema=False):
    row = {'epoch': epoch, 'train_loss': 0.5 + epoch, 'eval_loss': 0.25 + epoch, 'eval_top1': 50.0 + epoch}
    if ema:
        row.update(eval_ema_loss=0.125 + epoch, eval_ema_top1=60.0 + epoch)
    return {**row, 'lr': 1e-3 / (epoch + 1)}


def test_a_column_added_at_a_resume_keeps_every_value_under_its_name(tmp_path):
    path = str(tmp_path / 'summary.csv')
    for epoch in (0, 1):
        run_dir.write_summary_row(path, epoch_row(epoch))
    run_dir.trim_summary(path, 2)  # the resume, with --model-ema
    run_dir.write_summary_row(path, epoch_row(2, ema=True))
    lines = summary_lines(path)
    assert lines[0] == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_ema_loss', 'eval_ema_top1', 'lr']
    assert all(len(line) == len(lines[0]) for line in lines)
    rows = [dict(zip(lines[0], line)) for line in lines[1:]]
    for epoch, row in enumerate(rows):
        expected = {k: str(v) for k, v in epoch_row(epoch, ema=epoch == 2).items()}
        assert row == {k: expected.get(k, '') for k in lines[0]}
    # and the next interruption: the resume trims the file and goes on
    run_dir.trim_summary(path, 2)
    run_dir.write_summary_row(path, epoch_row(2, ema=True))
    assert [r[0] for r in summary_lines(path)] == ['epoch', '0', '1', '2']


@pytest.mark.parametrize('tail,said', [
    (b'\0' * 4096, '4096 zero bytes'),
    (b'2,2.5,2.2', "the incomplete last line '2,2.5,2.2'"),
    (b'2,2.5,2.2' + b'\0' * 100, "100 zero bytes and the incomplete last line '2,2.5,2.2'"),
])
def test_a_damaged_tail_of_summary_csv_is_dropped_at_the_resume(tail, said, tmp_path, caplog):
    path = tmp_path / 'summary.csv'
    for epoch in (0, 1):
        run_dir.write_summary_row(str(path), epoch_row(epoch))
    good = path.read_bytes()
    path.write_bytes(good + tail)  # what a power loss leaves
    with caplog.at_level(logging.WARNING, logger='train'):
        run_dir.trim_summary(str(path), 2)
    assert path.read_bytes() == good
    assert f'{path}: dropped {said} at its end (an interrupted write)' in caplog.text
    run_dir.write_summary_row(str(path), epoch_row(2))
    assert [r[0] for r in summary_lines(path)] == ['epoch', '0', '1', '2']


@pytest.mark.parametrize('damage,message', [
    (b'2,0.5,0.25,50.0,0.001,9,9,9\n', r"line 4 has 8 values under a header of 5 columns"),
    (b'two,0.5,0.25,50.0,0.001\n', r"line 4: epoch 'two' is not a number"),
    (b'\0\0\0' + b'2,0.5,0.25,50.0,0.001\n', r'zero bytes at byte \d+ with text after them'),
])
def test_damage_inside_summary_csv_is_refused_naming_the_file(damage, message, tmp_path):
    path = tmp_path / 'summary.csv'
    for epoch in (0, 1):
        run_dir.write_summary_row(str(path), epoch_row(epoch))
    path.write_bytes(path.read_bytes() + damage)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + '.*' + message):
        run_dir.trim_summary(str(path), 3)
    with pytest.raises(ValueError, match=message):
        run_dir.write_summary_row(str(path), epoch_row(3))
