"""A run's folder: which folder, what it already holds, and the files written beside the checkpoints."""
import csv
import logging
import os
import re
from datetime import datetime

import yaml
from timm.models import safe_model_name

from ..checkpoint import checkpoint_epoch

__all__ = ['CHECKPOINT_FILE', 'checkpoint_files', 'latest_epoch', 'resolve_output_dir', 'trim_summary', 'write_args']

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


def resolve_output_dir(args, resume_state=None) -> str:
    """The run folder. A folder with checkpoints is only reused to resume its newest one.

    Another run, or a resume of an older checkpoint, would rewrite its checkpoints: that is refused.
    A folder without a complete checkpoint (the first save was killed) holds nothing to resume, so
    the run starts (again) there.
    """
    if args.resume and not args.experiment:
        out = os.path.dirname(os.path.abspath(args.resume))
    else:
        name = args.experiment or '-'.join([
            datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model), args.dataset.replace('/', '_')])
        out = os.path.join(args.output, name)
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
    return out


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
