"""Training checkpoints that tell when they are damaged: a digest of their contents, inside the file.

torch's checkpoint format checks nothing: a file with flipped bytes in its tensor data loads without
complaint. The checkpoints the training script writes keep torch's format (``torch.load`` reads them as
before) and carry one more entry, ``digest``: the SHA-256 of the canonical bytes of every other entry
(tensors by dtype, shape and raw bytes; dicts with their keys sorted; numbers by their exact repr).
:func:`verify_digest` recomputes it; ``timm_ait.engine.load_training_checkpoint`` refuses a file whose
digest does not match. A file without a digest (older runs, other tools) loads as before.
"""
import argparse
import hashlib
import os
from typing import Any, Dict, Optional

import torch
from timm.utils import CheckpointSaver
from timm.utils.model import get_state_dict

__all__ = ['DIGEST_KEY', 'content_digest', 'with_digest', 'verify_digest', 'DigestCheckpointSaver',
           'verify_loaded_checkpoint']

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


def verify_loaded_checkpoint(state_dict: Dict[str, Any], model: Optional[torch.nn.Module] = None) -> None:
    """The digest check for a ``checkpoint_filter_fn``.

    A whole training checkpoint handed to the filter is checked directly. timm's own loader hands the
    filter only the weights it took out of the file (the digest stays behind), so when the model is
    being loaded from a file (``pretrained_cfg['file']``) that file's digest is checked, if it has one.
    """
    if DIGEST_KEY in state_dict:
        verify_digest(state_dict)
        return
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    path = cfg.get('file')
    if path and not cfg.get('state_dict') and cfg.get('source') != 'hf-hub' \
            and not str(path).endswith('.safetensors') and os.path.isfile(path):
        from .engine import load_training_checkpoint  # it verifies the digest
        load_training_checkpoint(path)


class DigestCheckpointSaver(CheckpointSaver):
    """timm's CheckpointSaver, writing each checkpoint with its digest and syncing it to disk.

    Only ``_save`` differs: it builds the same entries as timm's, adds ``digest``, and fsyncs the file
    before timm renames it into place (so a crash cannot leave a renamed file without its contents).
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
        with open(save_path, 'wb') as f:
            torch.save(with_digest(save_state), f)
            f.flush()
            os.fsync(f.fileno())
