"""Checkpoint files: reading, checking and writing them (the only place that calls ``torch.load``).

torch's checkpoint format checks nothing: a file with flipped bytes in its tensor data loads without
complaint. The checkpoints the training script writes keep torch's format (``torch.load`` reads them as
before) and carry one more entry, ``digest``: the SHA-256 of the canonical bytes of every other entry
(tensors by dtype, shape and raw bytes; dicts with their keys sorted; numbers by their exact repr).
:func:`read_checkpoint` refuses a file whose digest does not match; a file without a digest (other
tools) loads as before. Like timm's ``models/_helpers.py`` this module knows files and state dicts, not
models' settings: rebuilding a run's model is ``timm_ait.run_model``'s job.
"""
import argparse
import hashlib
import os
import shutil
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn
from timm.utils import CheckpointSaver
from timm.utils.model import get_state_dict

__all__ = ['DIGEST_KEY', 'content_digest', 'with_digest', 'verify_digest', 'read_checkpoint', 'checkpoint_epoch',
           'model_state_dict', 'check_state_dict', 'state_digest', 'source_checkpoint', 'DigestCheckpointSaver']

DIGEST_KEY = 'digest'


def _feed(h, obj: Any) -> None:
    """Canonical bytes of a checkpoint entry: the type, then the value, unambiguously delimited."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f'D{len(obj)};'.encode())
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f'L{type(obj).__name__}{len(obj)};'.encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, argparse.Namespace):
        h.update(b'N')
        _feed(h, vars(obj))
    else:  # None, bool, int, float (repr is exact), str, dtypes
        text = f'{type(obj).__name__}:{obj!r}'
        h.update(f'S{len(text)};{text}'.encode())


def content_digest(checkpoint: Dict[str, Any]) -> str:
    """``sha256:<hex>`` of every entry of ``checkpoint`` but the digest itself."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in checkpoint.items() if k != DIGEST_KEY})
    return 'sha256:' + h.hexdigest()


def with_digest(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """``checkpoint`` with its digest entry added (or renewed)."""
    return {**{k: v for k, v in checkpoint.items() if k != DIGEST_KEY}, DIGEST_KEY: content_digest(checkpoint)}


def verify_digest(checkpoint: Dict[str, Any], what: str = 'checkpoint') -> bool:
    """Raise a ValueError if ``checkpoint`` carries a digest its contents do not match.

    Returns whether there was a digest to check (checkpoints of older runs and other tools have none).
    """
    stored = checkpoint.get(DIGEST_KEY)
    if stored is None:
        return False
    actual = content_digest(checkpoint)
    if stored != actual:
        raise ValueError(f'{what} is damaged: its contents do not match the digest it was saved with '
                         f'(stored {str(stored)[:23]}..., contents {actual[:23]}...); it changed after it was '
                         'written (a disk or copy error?). Use another checkpoint of the run (checkpoint-N.pth.tar)')
    return True


def _torch_load(path: str, mmap: bool = False) -> Any:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)


def read_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint file (a training checkpoint or a bare state dict) as a dict, with a clear error.

    Only plain data loads (``weights_only``; the training args as an ``argparse.Namespace``). A file
    that carries a digest is refused if its contents do not match it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    try:
        checkpoint = _torch_load(path)
    except Exception as e:  # a truncated file, not a torch file, unsafe contents
        raise ValueError(f'checkpoint {path!r} cannot be read: {type(e).__name__}: {e}') from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f'checkpoint {path!r} holds a {type(checkpoint).__name__}, not a state dict')
    verify_digest(checkpoint, f'checkpoint {path!r}')
    return checkpoint


def checkpoint_epoch(path: str) -> Optional[int]:
    """The ``epoch`` entry of a training checkpoint, its tensors left on disk; None if unreadable."""
    try:  # memory-mapped: the tensors are not read
        return int(_torch_load(path, mmap=True)['epoch'])
    except Exception:
        return None


def model_state_dict(checkpoint: Dict[str, Any], use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of a training checkpoint (plain or EMA), DDP prefixes removed."""
    key = 'state_dict_ema' if use_ema else 'state_dict'
    if use_ema and key not in checkpoint:
        raise ValueError('the checkpoint has no EMA weights (state_dict_ema); train with --model-ema')
    state_dict = checkpoint.get(key, checkpoint.get('model', checkpoint))
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def check_state_dict(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        what: str = 'checkpoint',
        ignore: Sequence[str] = (),
) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key (``ignore``: keys whose
    absence or shape is someone else's business, e.g. a classifier that timm will reset)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict) - set(ignore))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(f'{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}'
                        for k, v in state_dict.items()
                        if k in expected and k not in ignore and v.shape != expected[k].shape)
    problems = []
    for title, keys in (('missing', missing), ('unexpected', unexpected), ('shape mismatch', mismatched)):
        if keys:
            more = f', ... ({len(keys)} in all)' if len(keys) > 8 else ''
            problems.append(f'{title}: ' + ', '.join(keys[:8]) + more)
    if problems:
        raise ValueError(f'{what} does not match {type(model).__name__}: ' + '; '.join(problems))


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (memory included), to show that ranks agree bit for bit."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_checkpoint(state_dict: Dict[str, Any], model: Optional[nn.Module] = None) -> Optional[Dict[str, Any]]:
    """For a ``checkpoint_filter_fn``: the whole training checkpoint the weights came from, digest checked.

    A training checkpoint handed to the filter is itself. timm's own loader hands the filter only the
    weights it took out of the file (digest, ``arch`` and ``args`` stay behind), so when the model is
    being loaded from a local torch file (``pretrained_cfg['file']``) that file is read once more.
    None when there is no such checkpoint (a bare state dict, safetensors, the Hub).
    """
    if DIGEST_KEY in state_dict or 'args' in state_dict:
        verify_digest(state_dict)
        return state_dict
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    path = cfg.get('file')
    if path and not cfg.get('state_dict') and cfg.get('source') != 'hf-hub' \
            and not str(path).endswith('.safetensors') and os.path.isfile(path):
        return read_checkpoint(path)
    return None


class DigestCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, writing each checkpoint with its digest and syncing it to disk, in an
    order that a kill at any point leaves a run that resumes as if the save had not begun or had ended.

    * ``_save`` builds the same entries as timm's, adds ``digest``, and fsyncs the file before it is
      put in place, so a file in place is complete.
    * Every file is put in place by ``os.replace`` of a complete one. timm unlinks the old
      last.pth.tar (and model_best.pth.tar) first, so a kill between the two leaves none.
    * model_best.pth.tar is written before last.pth.tar. The other way, a kill after last.pth.tar
      is in place left the best epoch in last.pth.tar only, which the next save overwrites.
    * A resume from a last.pth.tar whose save was cut before its ranking (checkpoint-N, the best
      file) finishes that ranking: :meth:`load_state_dict`.
    """

    def _save(self, save_path, epoch, metric=None):
        save_state = {
            'epoch': epoch,
            'arch': type(self.model).__name__.lower(),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,
        }
        if self.args is not None:
            save_state['arch'] = self.args.model
            save_state['args'] = self.args
        if self.amp_scaler is not None:
            save_state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        save_state['state_dict'] = get_state_dict(self.model, self.unwrap_fn)
        if self.model_ema is not None:
            save_state['state_dict_ema'] = get_state_dict(self.model_ema, self.unwrap_fn)
        if metric is not None:
            save_state['metric'] = metric
        save_state['saver'] = self.state_dict(epoch, metric)
        if os.path.lexists(save_path):  # a killed save's file, maybe a hard link to a kept one: never write through it
            os.unlink(save_path)
        try:
            with open(save_path, 'wb') as f:
                torch.save(with_digest(save_state), f)
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:  # a full disk: torch's own error does not name the file
            errno = getattr(e, 'errno', None) or getattr(e.__cause__, 'errno', None)
            raise OSError(errno, f'cannot write checkpoint {save_path!r}: {e}') from e

    def _replace(self, src, dst):
        os.replace(src, dst)  # atomic: dst is the old file or the new one, never missing

    def _duplicate(self, src, dst):
        """``dst`` becomes a copy of ``src`` (a hard link where the file system allows) atomically."""
        if os.path.exists(dst) and os.path.samefile(src, dst):
            return  # already (rename onto a link to the same file would do nothing and leave tmp behind)
        tmp = dst + '.tmp'
        if os.path.lexists(tmp):
            os.unlink(tmp)
        if self.can_hardlink:
            try:
                os.link(src, tmp)
            except (OSError, NotImplementedError):
                self.can_hardlink = False
        if not self.can_hardlink:
            shutil.copy2(src, tmp)
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)

    def _is_best(self, metric) -> bool:
        return metric is not None and (self.best_metric is None or self.cmp(metric, self.best_metric))

    def save_checkpoint(self, epoch, metric=None):
        """timm's ``save_checkpoint`` (last.pth.tar, a place among the ranked checkpoint-N, the best
        file), in the crash-safe order of the class docstring."""
        assert epoch >= 0
        tmp_save_path = os.path.join(self.checkpoint_dir, 'tmp' + self.extension)
        self._save(tmp_save_path, epoch, metric)
        if self._is_best(metric):
            self._duplicate(tmp_save_path, os.path.join(self.checkpoint_dir, 'model_best' + self.extension))
        self._replace(tmp_save_path, os.path.join(self.checkpoint_dir, 'last' + self.extension))
        self._rank(epoch, metric)
        return (None, None) if self.best_metric is None else (self.best_metric, self.best_epoch)

    def _rank(self, epoch, metric) -> None:
        """Give last.pth.tar (of ``epoch``) its place among the ranked checkpoints, as timm's
        save_checkpoint does after writing it (the best file included)."""
        worst_file = self.checkpoint_files[-1] if self.checkpoint_files else None
        if (
            len(self.checkpoint_files) < self.max_history
            or worst_file[1] is None
            or (metric is not None and self.cmp(metric, worst_file[1]))
        ):
            if len(self.checkpoint_files) >= self.max_history:
                self._cleanup_checkpoints(1)
            save_path = self._checkpoint_path(epoch)
            self._duplicate(os.path.join(self.checkpoint_dir, 'last' + self.extension), save_path)
            self._track_checkpoint(save_path, epoch, metric)

    def load_state_dict(self, state_dict):
        """timm's, and the end of a save that a kill cut: the state was captured before the save's
        ranking (``pending``), so if last.pth.tar is that epoch and its checkpoint-N is missing, the
        ranking is done now from last.pth.tar; and model_best.pth.tar is made the best epoch's if it
        is not (a save killed in timm's order, before it was written)."""
        super().load_state_dict(state_dict)
        last = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        epoch, metric = state_dict.get('pending', (None, None))
        if epoch is not None and not os.path.exists(self._checkpoint_path(epoch)) and checkpoint_epoch(last) == epoch:
            self._rank(epoch, metric)
        best = os.path.join(self.checkpoint_dir, 'model_best' + self.extension)
        if self.best_epoch is not None and checkpoint_epoch(best) != self.best_epoch:
            for source in (self._checkpoint_path(self.best_epoch), last):
                if checkpoint_epoch(source) == self.best_epoch:
                    self._duplicate(source, best)
                    break
