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
           'resolve_output_dir', 'check_output_dir', 'read_summary', 'trim_summary', 'write_summary_row',
           'write_args']

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


def read_summary(path: str):
    """The header and the rows (dicts) of a run's summary.csv, its damaged tail dropped.

    What a power loss or a full disk leaves at the end of the file, zero bytes or a last line cut
    short, is dropped with a warning (the rows before it are kept; the epoch of a dropped row is
    trained again, as no checkpoint was written after it). Damage anywhere else (a row with more or
    fewer values than the header, an epoch that is not a number) is refused naming the file and
    the line. Returns ``(header, rows, dropped)``: header None for a missing or empty file;
    ``dropped`` what was cut from the tail ('' if nothing).
    """
    if not os.path.isfile(path):
        return None, [], ''
    with open(path, 'rb') as f:
        data = f.read()
    dropped = []
    if b'\0' in data:
        cut = data.index(b'\0')
        if data[cut:].strip(b'\0'):
            raise ValueError(f'{path!r} is damaged: zero bytes at byte {cut} with text after them; expected a CSV '
                             'file of one row per epoch (fix or move it to resume)')
        dropped.append(f'{len(data) - cut} zero bytes')
        data = data[:cut]
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f'{path!r} is damaged: not UTF-8 text ({e}); expected a CSV file of one row per epoch '
                         '(fix or move it to resume)') from None
    if text and not text.endswith('\n'):  # the last row was cut short
        text, _, partial = text.rpartition('\n')
        text = text + '\n' if text else ''
        dropped.append(f'the incomplete last line {partial[:60]!r}')
    lines = list(csv.reader(text.splitlines()))
    if not lines:
        return None, [], ', '.join(dropped)
    header, rows = lines[0], []
    if 'epoch' not in header:
        raise ValueError(f'{path!r} is not a training summary: its header {header[:6]} has no epoch column')
    for number, values in enumerate(lines[1:], start=2):
        if len(values) != len(header):
            raise ValueError(f'{path!r} line {number} has {len(values)} values under a header of {len(header)} '
                             'columns; expected one value per column (fix or move the file to resume)')
        row = dict(zip(header, values))
        if not row['epoch'].isdigit():
            raise ValueError(f'{path!r} line {number}: epoch {row["epoch"]!r} is not a number')
        rows.append(row)
    if dropped:
        _logger.warning(f'{path}: dropped {" and ".join(dropped)} at its end (an interrupted write); the rows '
                        f'before are kept')
    return header, rows, ', '.join(dropped)


def _write_summary(path: str, header: list, rows: list) -> None:
    """summary.csv rewritten whole, atomically (a complete old file or a complete new one)."""
    tmp = path + '.tmp'
    with open(tmp, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=header, restval='')
        writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _merged_columns(header: list, keys: list) -> list:
    """``header`` with the new ``keys`` each inserted after the key that precedes it in ``keys`` (so
    eval_ema_* columns added at a resume land after eval_*, as in a run that had them from the start)."""
    merged = list(header)
    for i, key in enumerate(keys):
        if key not in merged:
            merged.insert(merged.index(keys[i - 1]) + 1 if i else 0, key)
    return merged


def write_summary_row(path: str, row: dict) -> None:
    """Add one epoch's row to summary.csv, keeping every row under its own column names.

    A row with columns the file does not have (--model-ema added at a resume adds eval_ema_*) has the
    file rewritten with the union of the columns, the older rows empty under the new ones; a damaged
    tail is dropped first (:func:`read_summary`). The row is on disk (fsync) before the epoch's
    checkpoint is written, so a crash cannot leave a checkpoint without its row.
    """
    header, rows, dropped = read_summary(path)
    keys = list(row)
    if header is not None and not dropped and set(keys) <= set(header):
        with open(path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=header, restval='').writerow(row)
            f.flush()
            os.fsync(f.fileno())
        return
    header = keys if header is None else _merged_columns(header, keys)
    _write_summary(path, header, [*rows, row])


def trim_summary(path: str, start_epoch: int) -> None:
    """Drop the summary rows of epochs from ``start_epoch`` on: no checkpoint holds their work (a run
    killed between its summary row and its checkpoint), and the run is about to redo them. A damaged
    tail is dropped too (see :func:`read_summary`)."""
    header, rows, dropped = read_summary(path)
    if header is None:
        return
    keep = [row for row in rows if int(row['epoch']) < start_epoch]
    if len(keep) == len(rows) and not dropped:
        return
    if len(keep) < len(rows):
        _logger.warning(f'{path}: dropping the rows of epochs {[r["epoch"] for r in rows if r not in keep]}, which '
                        'no checkpoint holds (an interrupted run); they are trained again')
    _write_summary(path, header, keep)


def write_args(args, output_dir: str) -> None:
    """args.yaml of the run, written atomically."""
    path = os.path.join(output_dir, 'args.yaml')
    with open(path + '.tmp', 'w') as f:
        yaml.safe_dump({k: v for k, v in vars(args).items() if k != 'device'}, f)
    os.replace(path + '.tmp', path)
