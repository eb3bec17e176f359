"""Helpers shared by the generated datasets: seeding, progress and the on-disk cache.

A generated dataset is a dict of numpy arrays. It is written once to a ``.npz`` file whose
name encodes everything that determines its content (dataset, split, size, seed, format
version), so a later run with the same arguments loads it instead of generating it again.

The file also records that metadata and a CRC-32 of every array. Writes go to a temporary
file that is renamed into place, so a killed run never leaves a half-written cache behind;
a cache file that cannot be read, or whose metadata or checksums do not match, is reported
with a warning and rebuilt rather than used. The temporary file is named after its writer (host
and process id), so the one a killed writer left is recognised and removed by the next load. A
folder the cache cannot be written to (read-only) costs the cache, with a warning, not the run.
"""
import glob
import json
import os
import socket
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import numpy as np
from tqdm import tqdm

__all__ = [
    "SPLITS",
    "default_root",
    "check_split",
    "check_int",
    "split_rng",
    "progress_chunks",
    "cache_file",
    "load_or_generate",
    "cached_dataset",
]

SPLITS = ("train", "test")

# Key of the JSON metadata entry inside the .npz; the double underscores keep it apart from
# the dataset's own array names.
_META_KEY = "__meta__"

Arrays = Dict[str, np.ndarray]


def default_root() -> Path:
    """Cache directory: ``$TIMM_AIT_DATA`` if set, else ``~/.cache/timm_ait``."""
    return Path(os.environ.get("TIMM_AIT_DATA", Path.home() / ".cache" / "timm_ait")).expanduser()


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return split


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``, or a ValueError that names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def split_rng(seed: int, split: str) -> np.random.Generator:
    """Independent random stream for one split, derived from one base seed.

    Train and test get different streams from the same ``seed``, so they never share
    samples by construction, and each split's stream does not depend on the other's size.
    """
    seed = check_int(seed, "seed", minimum=0)
    return np.random.default_rng([seed, SPLITS.index(check_split(split))])


def epoch_rng(seed: int, split: str, epoch: int) -> np.random.Generator:
    """Random stream of one epoch's fresh data of a split, independent of :func:`split_rng`'s and of the
    other epochs' (the seed sequences differ in length or in their last word)."""
    seed = check_int(seed, "seed", minimum=0)
    epoch = check_int(epoch, "epoch", minimum=1)
    return np.random.default_rng([seed, SPLITS.index(check_split(split)), epoch])


def progress_chunks(total: int, chunk_size: int, desc: str, progress: bool) -> Iterator[Tuple[int, int]]:
    """Yield ``(start, stop)`` ranges covering ``range(total)``, with a tqdm bar on stderr."""
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, total, chunk_size):
            stop = min(start + chunk_size, total)
            yield start, stop
            bar.update(stop - start)


def cache_file(root: Optional[Union[str, os.PathLike]], dataset: str, split: str, size: int,
               seed: int, version: int) -> Path:
    """Path of the cache file for one generated split, e.g. ``triangle-train-n50000-seed0-v1.npz``."""
    root = default_root() if root is None else Path(root).expanduser()
    return root / f"{dataset}-{split}-n{size}-seed{seed}-v{version}.npz"


def _checksum(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _describe(arrays: Arrays, meta: Dict[str, Any]) -> Dict[str, Any]:
    """What the file records about itself: the caller's metadata plus each array's layout."""
    layout = {
        name: {"shape": list(a.shape), "dtype": a.dtype.str, "crc32": _checksum(a)}
        for name, a in arrays.items()
    }
    return {"meta": meta, "arrays": layout}


def _load_checked(path: Path, meta: Dict[str, Any]) -> Arrays:
    """Load ``path`` and raise ValueError unless it is exactly what ``meta`` asks for."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    recorded = json.loads(str(arrays.pop(_META_KEY)))
    if recorded["meta"] != meta:
        raise ValueError(f"metadata {recorded['meta']} does not match the requested {meta}")
    if recorded != _describe(arrays, meta):
        raise ValueError("array shapes, dtypes or checksums do not match the recorded ones")
    return arrays


def _tmp_prefix(path: Path, host: str, pid: int) -> str:
    return f"{path.name}.{host}.{pid}."


def _writer_is_gone(tmp: Path, path: Path) -> bool:
    """Whether the temporary file ``tmp`` of ``path`` was left by a writer that no longer runs.

    Ours are ``<name>.<host>.<pid>.<random>.tmp``: a dead process on this host left it. Files of
    other hosts (a shared folder) or of older versions are only taken as left over when nothing has
    written to them for an hour.
    """
    head, _, _ = tmp.name[len(path.name) + 1:].rpartition(".")  # host.pid.random
    host, _, pid = head.rpartition(".")[0].rpartition(".")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, owned by someone else
            return False
        return False
    try:
        return time.time() - tmp.stat().st_mtime > 3600
    except OSError:
        return False


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary files that killed writes of ``path`` left behind."""
    for tmp in path.parent.glob(glob.escape(path.name) + ".*.tmp"):
        if _writer_is_gone(tmp, path):
            try:
                tmp.unlink()
            except OSError:
                pass


def _save_atomic(path: Path, arrays: Arrays, meta: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps(_describe(arrays, meta))
    # The temporary file lives beside the target so that os.replace is an atomic rename.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path, socket.gethostname(), os.getpid()),
                                    suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays, **{_META_KEY: np.array(record)})
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private to its owner; a cache is shared like any data file.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        os.unlink(tmp_name)
        raise


def load_or_generate(path: Path, generate: Callable[[], Arrays], meta: Dict[str, Any]) -> Arrays:
    """Arrays cached at ``path``, generating and caching them first if needed.

    ``meta`` (JSON-serialisable) must equal what the file recorded when it was written; any
    mismatch, unreadable file or checksum failure triggers a warning and a rebuild.
    """
    if path.parent.is_dir():
        _remove_leftovers(path)
    if path.exists():
        try:
            return _load_checked(path, meta)
        except Exception as err:  # any failure to read it back means the file is unusable
            warnings.warn(f"ignoring unusable cache file {path} ({type(err).__name__}: {err}); "
                          "regenerating it", stacklevel=3)
    arrays = generate()
    try:
        _save_atomic(path, arrays, meta)
    except OSError as err:  # a read-only or full data folder: the data is there, only the cache is not
        warnings.warn(f"cannot write the cache file {path} ({type(err).__name__}: {err}); using the generated "
                      "data without caching it", stacklevel=3)
    return arrays


def cached_dataset(
        root: Optional[Union[str, Path]],
        dataset: str,
        split: str,
        size_name: str,
        size: int,
        seed: int,
        version: int,
        generate: Callable[[], Arrays],
) -> Tuple[Path, Arrays]:
    """A generated dataset's arrays and cache file: loaded if the file holds this (dataset, split, size,
    seed, version), else generated with ``generate()`` and written."""
    path = cache_file(root, dataset, split, size, seed, version)
    meta = {"dataset": dataset, "split": split, size_name: size, "seed": seed, "version": version}
    return path, load_or_generate(path, generate, meta)
