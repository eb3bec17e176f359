"""The Triangle dataset (Goyal et al. 2022): do three clusters of dots form an equilateral triangle?

Each 64x64 grayscale image holds three clusters of 8 dots. A dot is a filled disc of radius
2 px whose centre lies within 1 px of its cluster centre. Label 0: the cluster centres form
an equilateral triangle (the third centre is the second rotated by 60 degrees about the
first). Label 1: three random centres.

Two choices the paper leaves open, made so that every label is right and visible:

* Cluster centres are at least ``MIN_SIDE`` px apart, so no two clusters merge.
* Random triangles that are nearly equilateral (longest side less than
  ``MIN_SIDE_RATIO_RANDOM`` times the shortest) are redrawn, so label 1 is never
  equilateral by chance.
"""
import math
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ._cache import (
    cached_dataset,
    check_int,
    check_split,
    epoch_rng,
    progress_chunks,
    split_rng,
)

__all__ = ["TriangleDataset", "generate_triangles"]

IMAGE_SIZE = 64
NUM_CLUSTERS = 3
POINTS_PER_CLUSTER = 8
CLUSTER_RADIUS = 1.0
DOT_RADIUS = 2.0
MIN_SIDE = 10.0
MIN_SIDE_RATIO_RANDOM = 1.1
DEFAULT_SIZES = {"train": 50_000, "test": 10_000}

# Bump when the generator changes, so that old cache files are not mistaken for new data.
FORMAT_VERSION = 1

# Lit pixels lie within CLUSTER_RADIUS + DOT_RADIUS of a cluster centre; keep them on the canvas.
_MARGIN = CLUSTER_RADIUS + DOT_RADIUS
_ROTATE_60 = np.array([[math.cos(math.pi / 3), -math.sin(math.pi / 3)],
                       [math.sin(math.pi / 3), math.cos(math.pi / 3)]])
# Integer pixel offsets, relative to floor(dot centre), that can fall inside a dot.
_DOT_WINDOW = np.arange(-math.floor(DOT_RADIUS), math.floor(DOT_RADIUS) + 1)
_RENDER_CHUNK = 4096


def _side_lengths(centers: np.ndarray) -> np.ndarray:
    """Lengths of the three sides of each triangle in ``centers`` (..., 3, 2)."""
    return np.linalg.norm(centers - np.roll(centers, 1, axis=-2), axis=-1)


def _sample_centers(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cluster centres (N, 3, 2) as (x, y), by rejection sampling all pending images at once."""
    low, high = _MARGIN, IMAGE_SIZE - 1 - _MARGIN
    centers = np.empty((len(labels), NUM_CLUSTERS, 2))
    pending = np.arange(len(labels))
    while pending.size:
        first, second, random_third = rng.uniform(low, high, size=(3, pending.size, 2))
        equilateral_third = first + (second - first) @ _ROTATE_60.T
        is_equilateral = labels[pending, None] == 0
        candidates = np.stack(
            [first, second, np.where(is_equilateral, equilateral_third, random_third)], axis=1)

        sides = _side_lengths(candidates)
        valid = ((candidates >= low) & (candidates <= high)).all(axis=(1, 2))
        valid &= sides.min(axis=1) >= MIN_SIDE
        nearly_equilateral = sides.max(axis=1) < MIN_SIDE_RATIO_RANDOM * sides.min(axis=1)
        valid &= is_equilateral[:, 0] | ~nearly_equilateral

        centers[pending[valid]] = candidates[valid]
        pending = pending[~valid]
    return centers


def _render(dots: np.ndarray) -> np.ndarray:
    """Images (N, 64, 64) uint8 with a white disc of radius DOT_RADIUS at each dot (N, D, 2)."""
    images = np.zeros((len(dots), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    x, y = dots[..., 0, None, None], dots[..., 1, None, None]
    # Candidate pixels: a small window around each dot, as (N, D, W, W) row and column indices.
    rows, cols = np.broadcast_arrays(np.floor(y).astype(np.int64) + _DOT_WINDOW[:, None],
                                     np.floor(x).astype(np.int64) + _DOT_WINDOW[None, :])
    inside = (cols - x) ** 2 + (rows - y) ** 2 <= DOT_RADIUS ** 2
    image = np.nonzero(inside)[0]
    images[image, rows[inside], cols[inside]] = 255
    return images


def generate_triangles(num_samples: int, rng: np.random.Generator, progress: bool = False) -> dict:
    """Generate ``num_samples`` Triangle images with balanced labels.

    Returns a dict of numpy arrays: ``images`` (N, 64, 64) uint8, ``labels`` (N,) int64
    (0 equilateral, 1 random) and ``centers`` (N, 3, 2) float64, the cluster centres as
    (x, y) = (column, row) in pixel coordinates.
    """
    num_samples = check_int(num_samples, "num_samples", minimum=1)
    labels = rng.permutation(np.arange(num_samples) % 2)
    centers = _sample_centers(labels, rng)

    # Offsets uniform over the disc of radius CLUSTER_RADIUS (sqrt makes them uniform in area).
    radius = CLUSTER_RADIUS * np.sqrt(rng.uniform(size=(num_samples, NUM_CLUSTERS, POINTS_PER_CLUSTER)))
    angle = rng.uniform(0, 2 * np.pi, size=radius.shape)
    offsets = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    dots = (centers[:, :, None, :] + offsets).reshape(num_samples, -1, 2)

    images = np.empty((num_samples, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for start, stop in progress_chunks(num_samples, _RENDER_CHUNK, "Triangle", progress):
        images[start:stop] = _render(dots[start:stop])
    return {"images": images, "labels": labels.astype(np.int64), "centers": centers}


class TriangleDataset(Dataset):
    """Triangle images as ``(PIL RGB 64x64, label)``, generated once and cached.

    With ``fresh_each_epoch`` the set is drawn anew for each epoch (:meth:`set_epoch`, which timm-ait's
    train.py calls): epoch 0 is the cached set, epoch e > 0 one of the same size from its own random
    stream of (seed, split, e), generated in memory (about 4 s for 100k images). The authors' Triangle
    draws a new image at every access, so their 100 epochs of 50k are 5M different images; a fixed set
    of 100k is memorised by AiT-Small within ten epochs.

    Args:
        root: cache directory; ``None`` means ``$TIMM_AIT_DATA`` or ``~/.cache/timm_ait``.
        split: ``'train'`` or ``'test'``; each split has its own random stream from ``seed``.
        num_samples: number of images; defaults to 50,000 for train and 10,000 for test.
        seed: base seed; the same arguments always give the same data.
        transform: applied to the PIL image (timm's ``create_loader`` sets this attribute).
        target_transform: applied to the int label.
        download: accepted for torchvision-style callers and ignored; nothing is downloaded.
        progress: show a progress bar on stderr while generating.
        fresh_each_epoch: a new set every epoch (training split only), see above.
    """

    num_classes = 2

    def __init__(
            self,
            root: Optional[str] = None,
            split: str = "train",
            num_samples: Optional[int] = None,
            seed: int = 0,
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            download: bool = False,
            progress: bool = True,
            fresh_each_epoch: bool = False,
    ):
        self.split = check_split(split)
        if fresh_each_epoch and self.split != "train":
            raise ValueError(f"fresh_each_epoch draws new training data; the {split!r} split stays fixed")
        self.fresh_each_epoch = fresh_each_epoch
        self.num_samples = check_int(
            DEFAULT_SIZES[split] if num_samples is None else num_samples, "num_samples", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self.transform = transform
        self.target_transform = target_transform

        self.cache_path, arrays = cached_dataset(
            root, "triangle", split, "num_samples", self.num_samples, self.seed, FORMAT_VERSION,
            lambda: generate_triangles(self.num_samples, split_rng(self.seed, split), progress))
        self._cached = arrays
        self.epoch = 0
        self._use(arrays)

    def _use(self, arrays: dict) -> None:
        self.images = arrays["images"]
        self.targets = arrays["labels"]
        self.centers = arrays["centers"]

    def set_epoch(self, epoch: int) -> None:
        """Hold the data of ``epoch``: with ``fresh_each_epoch`` a set of its own, else the one set."""
        epoch = check_int(epoch, "epoch", minimum=0)
        if not self.fresh_each_epoch or epoch == self.epoch:
            return
        self.epoch = epoch
        if epoch == 0:
            self._use(self._cached)
        else:
            self._use(generate_triangles(self.num_samples, epoch_rng(self.seed, self.split, epoch)))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target
