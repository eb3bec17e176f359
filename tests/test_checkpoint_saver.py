"""DigestCheckpointSaver killed at every step of a save, then resumed: no checkpoint file is missing and
the best epoch's weights are in model_best.pth.tar, as the metrics say."""
import os

import pytest
import torch
from torch import nn

from timm_ait.checkpoint import DigestCheckpointSaver, read_checkpoint
from timm_ait.train.run_dir import latest_epoch

# eval top-1 of each epoch; epoch 2 is the best, epoch 3 is not
METRICS = [50.0, 60.0, 70.0, 65.0]
FILE_CALLS = ('replace', 'rename', 'link', 'unlink', 'remove')


class Killed(BaseException):
    """The process dies here (a BaseException, so no `except Exception` of the code under test sees it)."""


def save_epoch(folder, epoch, saver_state=None):
    """One epoch's save of a one-weight model whose weight is the epoch; a fresh saver, as after a resume
    when ``saver_state`` is given (the 'saver' entry of the checkpoint resumed from)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(epoch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = DigestCheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(folder),
                                  recovery_dir=str(folder), max_history=2)
    if saver_state is not None:
        saver.load_state_dict(saver_state)
    return saver


def run_epochs(folder, epochs, state=None):
    for epoch in epochs:
        saver = save_epoch(folder, epoch, state)
        saver.save_checkpoint(epoch, METRICS[epoch])
        state = read_checkpoint(os.path.join(folder, 'last.pth.tar'))['saver']
    return state


def epoch_of(path):
    return int(read_checkpoint(str(path))['state_dict']['weight'].item())


class KillAt:
    """Counts the file operations of a save and raises Killed at the ``at``-th (None: never)."""

    def __init__(self, monkeypatch, at=None):
        self.count, self.at = 0, at
        for name in FILE_CALLS:
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))

    def wrap(self, call):
        def counted(*args, **kwargs):
            if self.count == self.at:
                raise Killed
            self.count += 1
            return call(*args, **kwargs)
        return counted


def file_operations_of_a_save(folder):
    folder.mkdir()
    state = run_epochs(folder, [0, 1])
    with pytest.MonkeyPatch.context() as m:
        counter = KillAt(m)
        save_epoch(folder, 2, state).save_checkpoint(2, METRICS[2])
    return counter.count


def test_a_save_killed_at_any_step_loses_neither_last_nor_the_best_epoch(tmp_path):
    steps = file_operations_of_a_save(tmp_path / 'count')
    assert steps >= 3
    for at in range(steps):
        folder = tmp_path / f'kill{at}'
        folder.mkdir()
        state = run_epochs(folder, [0, 1])
        with pytest.MonkeyPatch.context() as m:
            KillAt(m, at)
            with pytest.raises(Killed):
                save_epoch(folder, 2, state).save_checkpoint(2, METRICS[2])
        # the resume reads last.pth.tar: it must be there, complete (the digest is checked)
        last = read_checkpoint(str(folder / 'last.pth.tar'))
        resumed = last['epoch']
        assert resumed in (1, 2), at
        if resumed == 2:  # epoch 2 is done and the best: its weights are in model_best, not in last only
            assert epoch_of(folder / 'model_best.pth.tar') == 2, at
        # no checkpoint is newer than it, so the resume may write there (train.py refuses otherwise)
        assert latest_epoch(str(folder)) == resumed, at
        # once the resume has loaded the saver state, the best epoch is in model_best.pth.tar: epoch 2
        # if last.pth.tar is epoch 2; if it is epoch 1, the resume trains epoch 2 again, and
        # model_best.pth.tar is epoch 1, or epoch 2 if the kill came after it was written
        save_epoch(folder, resumed, last['saver'])
        assert epoch_of(folder / 'model_best.pth.tar') in ((2,) if resumed == 2 else (1, 2)), at
        # the run goes on (a killed epoch 2 is trained again) and ends as an uninterrupted one
        run_epochs(folder, range(resumed + 1, 4), last['saver'])
        assert epoch_of(folder / 'model_best.pth.tar') == 2 and epoch_of(folder / 'last.pth.tar') == 3, at
        kept = sorted(f for f in os.listdir(folder) if f.startswith('checkpoint-'))
        assert kept == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar'], (at, kept)
        assert all(epoch_of(folder / f) == int(f.split('-')[1].split('.')[0]) for f in kept)


def test_an_uninterrupted_run_keeps_timms_files(tmp_path):
    run_epochs(tmp_path, range(4))
    assert sorted(os.listdir(tmp_path)) == ['checkpoint-2.pth.tar', 'checkpoint-3.pth.tar', 'last.pth.tar',
                                            'model_best.pth.tar']
    assert epoch_of(tmp_path / 'model_best.pth.tar') == 2


def test_a_resume_repairs_the_best_file_a_kill_in_timms_order_left_older(tmp_path):
    state = run_epochs(tmp_path, [0, 1, 2])
    # timm's order writes model_best last: a kill just before leaves the previous best there
    (tmp_path / 'model_best.pth.tar').unlink()
    (tmp_path / 'model_best.pth.tar').write_bytes((tmp_path / 'checkpoint-1.pth.tar').read_bytes())
    save_epoch(tmp_path, 2, state)
    assert epoch_of(tmp_path / 'model_best.pth.tar') == 2


def test_a_full_disk_during_a_save_names_the_file(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full)
    with pytest.raises(OSError, match=r"cannot write checkpoint '.*\.pth\.tar'.*No space left on device") as error:
        save_epoch(tmp_path, 0).save_checkpoint(0, METRICS[0])
    assert error.value.errno == errno.ENOSPC
