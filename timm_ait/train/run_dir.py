"""A run's folder: which folder, who holds it, what it already holds, and the files written beside the
checkpoints."""
import csv
import errno
import logging
import os
import re
import secrets
import socket
from datetime import datetime

import yaml
from timm.models import safe_model_name

from ..checkpoint import checkpoint_epoch

__all__ = ['CHECKPOINT_FILE', 'CLAIM_FILE', 'RunDirClaim', 'checkpoint_files', 'latest_epoch', 'new_run_name',
           'resolve_output_dir', 'check_output_dir', 'trim_summary', 'write_args']

_logger = logging.getLogger('train')

# the files of a run folder that hold a complete checkpoint (tmp.pth.tar is one being written)
CHECKPOINT_FILE = re.compile(r'^(last|model_best|checkpoint-\d+)\.pth\.tar$')


def checkpoint_files(folder: str) -> list:
    """The complete checkpoints in a run folder (not a tmp.pth.tar that a killed save left)."""
    return sorted(f for f in os.listdir(folder) if CHECKPOINT_FILE.match(f)) if os.path.isdir(folder) else []


def latest_epoch(folder: str) -> int:
    """The epoch of the newest checkpoint in a run folder: last.pth.tar's or the highest checkpoint-N."""
    epochs = [int(m.group(1)) for f in checkpoint_files(folder) if (m := re.match(r'checkpoint-(\d+)\.', f))]
    last = os.path.join(folder, 'last.pth.tar')
    epoch = checkpoint_epoch(last) if os.path.isfile(last) else None
    if epoch is not None:  # unreadable: the numbered checkpoints still say how far the run got
        epochs.append(epoch)
    return max(epochs, default=-1)


def new_run_name(*parts: str) -> str:
    """A run folder name that starts with the time (to the second, so folders sort by start) and cannot
    be another launch's of the same second: a random suffix follows the time."""
    return '-'.join([datetime.now().strftime('%Y%m%d-%H%M%S'), secrets.token_hex(3), *parts])


def resolve_output_dir(args, resume_state=None) -> str:
    """The run folder: ``--output/--experiment``, a resume's own folder, or a new name. Checked by
    :func:`check_output_dir`."""
    if args.resume and not args.experiment:
        out = os.path.dirname(os.path.abspath(args.resume))
    else:
        out = os.path.join(args.output, args.experiment or new_run_name(
            safe_model_name(args.model), args.dataset.replace('/', '_')))
    holder = RunDirClaim.holder(out)  # said before any work; RunDirClaim makes it exclusive
    if holder is not None and not RunDirClaim.is_stale(holder):
        raise FileExistsError(RunDirClaim.held_message(out, holder))
    check_output_dir(out, args, resume_state)
    return out


def check_output_dir(out: str, args, resume_state=None) -> None:
    """Refuse a run folder whose checkpoints this run would rewrite.

    A folder with checkpoints is only reused to resume its newest one: another run, or a resume of
    an older checkpoint, would rewrite them. A folder without a complete checkpoint (the first save
    was killed) holds nothing to resume, so the run starts (again) there.
    """
    existing = checkpoint_files(out)
    if not existing:
        return out
    resuming_here = args.resume and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(out)
    if not resuming_here:
        raise FileExistsError(f'{out!r} already holds checkpoints; choose another --experiment, or --resume from '
                              'one of them')
    epoch, newest = resume_state.get('epoch', -1), latest_epoch(out)
    if epoch < newest:
        raise FileExistsError(f'--resume {args.resume!r} is epoch {epoch}, but {out!r} holds checkpoints up to epoch '
                              f'{newest}: resuming it there would overwrite them; continue it in a new folder with '
                              '--experiment NAME')


# the file in a run folder that says which process writes there
CLAIM_FILE = 'run.lock'


class RunDirClaim:
    """An exclusive claim of one process on a run folder, so that two launches never write into one.

    The claim is the file ``run.lock`` in the folder, created with O_CREAT|O_EXCL (atomic, also on
    network file systems) and holding the claimer's host and pid. :meth:`release` removes it; a claim
    left by a process that died (kill -9, a power loss) on this host is taken over with a warning.
    A claim from another host cannot be checked: it is refused, naming the holder and the file.
    ``created``: whether the claim made the folder, so a run refused before any work can remove it.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, CLAIM_FILE)
        self.created = not os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        self.token = f'{socket.gethostname()} {os.getpid()} {secrets.token_hex(4)}'
        while not self._create():
            holder = self.holder(folder)
            if holder is None:
                continue  # released between the two calls: try again
            if not self.is_stale(holder):
                raise FileExistsError(self.held_message(folder, holder))
            self._take_over(holder)
        self.held = True

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, 'w') as f:
            f.write(self.token + '\n')
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, stale: str) -> None:
        # rename, not unlink: of two processes taking over one stale claim only one renames that file;
        # a process that renamed a live claim instead (made between its read and its rename) puts it back
        moved = f'{self.path}.stale-{os.getpid()}'
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        with open(moved) as f:
            found = f.read().strip()
        if found != stale:
            try:
                os.link(moved, self.path)
            except FileExistsError:  # a third process claimed it meanwhile: the next read sees that one
                pass
            finally:
                os.unlink(moved)
            return
        os.unlink(moved)
        host, pid = stale.split()[:2]
        _logger.warning(f'{self.folder!r}: taking over the claim of pid {pid} on {host}, which no longer runs '
                        f'(it was stopped without releasing {CLAIM_FILE})')

    @staticmethod
    def holder(folder: str):
        """The claim on ``folder`` ('host pid token'), or None if there is none."""
        try:
            with open(os.path.join(folder, CLAIM_FILE)) as f:
                return f.read().strip() or 'an unknown process'
        except FileNotFoundError:
            return None

    @staticmethod
    def is_stale(holder: str) -> bool:
        """Whether the claim is left by a process of this host that no longer runs."""
        parts = holder.split()
        if len(parts) < 2 or parts[0] != socket.gethostname() or not parts[1].isdigit():
            return False
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            return True
        except OSError as e:  # EPERM: it runs, as another user
            return e.errno != errno.EPERM
        return False

    @staticmethod
    def held_message(folder: str, holder: str) -> str:
        parts = holder.split()
        who = f'pid {parts[1]} on host {parts[0]}' if len(parts) >= 2 else holder
        return (f'run folder {folder!r} is in use by another run ({who}, see {os.path.join(folder, CLAIM_FILE)}); '
                'choose another --experiment, or wait for that run to end (if it is gone, delete the file)')

    def release(self, remove_empty: bool = False) -> None:
        """Remove the claim (if it is still this process's); ``remove_empty``: also the folder, if the
        claim created it and nothing else was written there (a run refused before any work)."""
        if not getattr(self, 'held', False):
            return
        self.held = False
        if self.holder(self.folder) == self.token:
            os.unlink(self.path)
        if remove_empty and self.created:
            try:
                os.rmdir(self.folder)
            except OSError:
                pass


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the summary rows of epochs from ``start_epoch`` on: no checkpoint holds their work (a run
    killed between its summary row and its checkpoint), and the run is about to redo them."""
    if not os.path.isfile(path):
        return
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    keep = [row for row in rows if int(row['epoch']) < start_epoch]
    if len(keep) == len(rows):
        return
    _logger.warning(f'{path}: dropping the rows of epochs {[r["epoch"] for r in rows if r not in keep]}, which no '
                    'checkpoint holds (an interrupted run); they are trained again')
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        if keep:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(keep)
    os.replace(tmp, path)


def write_args(args, output_dir: str) -> None:
    """args.yaml of the run, written atomically."""
    path = os.path.join(output_dir, 'args.yaml')
    with open(path + '.tmp', 'w') as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if k != 'device'}, f)
    os.replace(path + '.tmp', path)
