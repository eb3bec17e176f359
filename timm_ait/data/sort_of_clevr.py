"""Sort-of-CLEVR (Santoro et al. 2017): questions about six coloured squares and circles.

Each 75x75 RGB image shows six objects on a white background, one per colour in
``COLORS``, each a square (centre +- 5 px) or a circle (radius 5 px). Every image comes with
10 non-relational and 10 relational questions, each drawn at random as a (colour, subtype)
pair:

=============== ======= ===================================================== ===========
kind            subtype question                                              answers
=============== ======= ===================================================== ===========
non-relational  0       what shape is the c object?                           square/circle
non-relational  1       is the c object on the left (x < 75 / 2)?             yes/no
non-relational  2       is the c object on the top (y < 75 / 2)?              yes/no
relational      0       what shape is the object nearest to the c object?     square/circle
relational      1       what shape is the object farthest from the c object?  square/circle
relational      2       how many objects have the shape of the c object?      1..6
=============== ======= ===================================================== ===========

The count includes the c object itself. A question is the 11-dim one-hot vector
``[colour (6) | non-relational, relational (2) | subtype (3)]``; the answer is an index
into ``ANSWERS``.

Choices beyond the paper, so that every image is clean and every answer unique:

* Objects never share a pixel: their centres are more than ``2 * OBJECT_SIZE`` px apart
  in x or in y. (The common reference generator only keeps centres 10 px apart, which
  lets squares overlap.)
* Scenes in which an object has two equally near, or two equally far, other objects are
  redrawn, so "nearest" and "farthest" never need a tie-break.
"""
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..constants import SORT_OF_CLEVR_ANSWERS, SORT_OF_CLEVR_QUESTION_DIM
from ._cache import (
    cached_dataset,
    check_int,
    check_split,
    progress_chunks,
    split_rng,
)

__all__ = [
    "SortOfClevr",
    "COLORS",
    "SHAPES",
    "ANSWERS",
    "QUESTION_DIM",
    "NUM_ANSWERS",
    "QUESTION_TYPES",
    "generate_sort_of_clevr",
    "sample_scenes",
    "render_scenes",
    "answer_questions",
    "encode_questions",
    "decode_question",
    "describe_question",
    "answer_name",
]

IMAGE_SIZE = 75
OBJECT_SIZE = 5
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "orange": (255, 156, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
}
SHAPES = ("square", "circle")
ANSWERS = SORT_OF_CLEVR_ANSWERS
NUM_OBJECTS = len(COLORS)
NUM_SUBTYPES = 3
QUESTIONS_PER_KIND = 10
QUESTION_DIM = SORT_OF_CLEVR_QUESTION_DIM
assert QUESTION_DIM == NUM_OBJECTS + 2 + NUM_SUBTYPES, "a question is one-hot colour, kind and subtype"
NUM_ANSWERS = len(ANSWERS)
QUESTION_SETS = ("all", "relational", "non_relational")
# One name per (kind, subtype), non-relational first: the table above, row by row.
QUESTION_TYPES = ("shape", "left", "top", "nearest_shape", "farthest_shape", "count")
DEFAULT_SIZES = {"train": 9_800, "test": 200}

# Bump when the generator changes, so that old cache files are not mistaken for new data.
FORMAT_VERSION = 1

_YES, _NO = ANSWERS.index("yes"), ANSWERS.index("no")
_FIRST_SHAPE = ANSWERS.index(SHAPES[0])  # answer index of shape s is _FIRST_SHAPE + s
_FIRST_COUNT = ANSWERS.index("1")  # answer index of count k is _FIRST_COUNT + k - 1
_TEMPLATES = {
    False: ("What shape is the {} object?",
            "Is the {} object on the left?",
            "Is the {} object on the top?"),
    True: ("What shape is the object nearest to the {} object?",
           "What shape is the object farthest from the {} object?",
           "How many objects have the same shape as the {} object?"),
}

_COLOR_RGB = np.array(list(COLORS.values()), dtype=np.uint8)
# Pixel footprint of each shape on a (2 * OBJECT_SIZE + 1)^2 grid around its centre. The
# circle takes the pixels whose centre lies within OBJECT_SIZE + 0.5, so that it is as wide
# as the square instead of ending in one-pixel tips.
_OFFSETS = np.arange(-OBJECT_SIZE, OBJECT_SIZE + 1)
_FOOTPRINTS = np.stack([
    np.ones((_OFFSETS.size, _OFFSETS.size), dtype=bool),
    _OFFSETS[:, None] ** 2 + _OFFSETS[None, :] ** 2 <= (OBJECT_SIZE + 0.5) ** 2,
])
_RENDER_CHUNK = 1024


def _pairwise_sq_distances(centers: np.ndarray) -> np.ndarray:
    """Squared distances (N, 6, 6) between the integer object centres (N, 6, 2)."""
    diff = centers[:, :, None, :] - centers[:, None, :, :]
    return (diff ** 2).sum(axis=-1)


def _valid_layouts(centers: np.ndarray) -> np.ndarray:
    """Which scenes (N,) have disjoint objects and no tie for nearest or farthest object."""
    apart = np.abs(centers[:, :, None, :] - centers[:, None, :, :]).max(axis=-1) > 2 * OBJECT_SIZE
    apart |= np.eye(NUM_OBJECTS, dtype=bool)
    # Row i sorted: [0 (itself), nearest, second nearest, ..., second farthest, farthest].
    by_distance = np.sort(_pairwise_sq_distances(centers), axis=-1)
    unique_nearest = by_distance[..., 1] < by_distance[..., 2]
    unique_farthest = by_distance[..., -2] < by_distance[..., -1]
    return apart.all(axis=(1, 2)) & (unique_nearest & unique_farthest).all(axis=1)


def sample_scenes(num_images: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Random scenes: ``centers`` (N, 6, 2) int64 as (x, y), ``shapes`` (N, 6) int64.

    Object ``i`` has colour ``list(COLORS)[i]`` and shape ``SHAPES[shapes[n, i]]``. Centres
    keep every object inside the image. Whole scenes are drawn in batches and the invalid
    ones dropped (about one in five is kept).
    """
    num_images = check_int(num_images, "num_images", minimum=1)
    kept, num_kept = [], 0
    while num_kept < num_images:
        batch = 6 * (num_images - num_kept) + 64
        candidates = rng.integers(OBJECT_SIZE, IMAGE_SIZE - OBJECT_SIZE, size=(batch, NUM_OBJECTS, 2))
        kept.append(candidates[_valid_layouts(candidates)])
        num_kept += len(kept[-1])
    centers = np.concatenate(kept)[:num_images]
    shapes = rng.integers(0, len(SHAPES), size=(num_images, NUM_OBJECTS))
    return centers, shapes


def render_scenes(centers: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Images (N, 75, 75, 3) uint8 of the scenes given by ``sample_scenes``."""
    images = np.full((len(centers), IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    image, obj, row, col = np.nonzero(_FOOTPRINTS[shapes])  # (N, 6, 11, 11) footprint masks
    y = centers[image, obj, 1] + row - OBJECT_SIZE
    x = centers[image, obj, 0] + col - OBJECT_SIZE
    images[image, y, x] = _COLOR_RGB[obj]
    return images


def answer_questions(centers: np.ndarray, shapes: np.ndarray, colors: np.ndarray,
                     relational: np.ndarray, subtypes: np.ndarray) -> np.ndarray:
    """Answer indices (N, Q) for questions (N, Q) about the scenes (N, ...) from ``sample_scenes``.

    ``colors`` picks the object the question is about, ``relational`` its kind and
    ``subtypes`` (0, 1, 2) the question within the kind; see the module docstring.
    """
    sq_dist = _pairwise_sq_distances(centers)
    others = np.where(np.eye(NUM_OBJECTS, dtype=bool), np.iinfo(sq_dist.dtype).max, sq_dist)
    nearest_shape = np.take_along_axis(shapes, others.argmin(axis=-1), axis=1)
    # Every other object is farther than the object itself (distance 0), so argmax skips it.
    farthest_shape = np.take_along_axis(shapes, sq_dist.argmax(axis=-1), axis=1)
    same_shape_count = (shapes[:, :, None] == shapes[:, None, :]).sum(axis=-1)
    is_left = centers[..., 0] < IMAGE_SIZE / 2
    is_top = centers[..., 1] < IMAGE_SIZE / 2

    # Every answer of each scene, indexed [scene, relational, colour, subtype].
    table = np.stack([
        np.stack([_FIRST_SHAPE + shapes,
                  np.where(is_left, _YES, _NO),
                  np.where(is_top, _YES, _NO)], axis=-1),
        np.stack([_FIRST_SHAPE + nearest_shape,
                  _FIRST_SHAPE + farthest_shape,
                  _FIRST_COUNT - 1 + same_shape_count], axis=-1),
    ], axis=1)
    scene = np.arange(len(centers))[:, None]
    return table[scene, np.asarray(relational, dtype=np.int64), colors, subtypes].astype(np.int64)


def _sample_questions(num_images: int, rng: np.random.Generator):
    """Per image 10 non-relational then 10 relational questions with random colour and subtype."""
    shape = (num_images, 2 * QUESTIONS_PER_KIND)
    colors = rng.integers(0, NUM_OBJECTS, size=shape)
    subtypes = rng.integers(0, NUM_SUBTYPES, size=shape)
    relational = np.broadcast_to(np.arange(shape[1]) >= QUESTIONS_PER_KIND, shape).copy()
    return colors, relational, subtypes


def generate_sort_of_clevr(num_images: int, rng: np.random.Generator, progress: bool = False) -> dict:
    """Generate ``num_images`` scenes with 20 questions each, as a dict of numpy arrays.

    ``images`` (N, 75, 75, 3) uint8; ``centers`` (N, 6, 2) and ``shapes`` (N, 6) describe
    the objects; ``question_colors``, ``question_relational``, ``question_subtypes`` and
    ``answers`` are (N, 20), non-relational questions first.
    """
    centers, shapes = sample_scenes(num_images, rng)
    colors, relational, subtypes = _sample_questions(len(centers), rng)
    images = np.empty((len(centers), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for start, stop in progress_chunks(len(centers), _RENDER_CHUNK, "Sort-of-CLEVR", progress):
        images[start:stop] = render_scenes(centers[start:stop], shapes[start:stop])
    return {
        "images": images,
        "centers": centers,
        "shapes": shapes,
        "question_colors": colors,
        "question_relational": relational,
        "question_subtypes": subtypes,
        "answers": answer_questions(centers, shapes, colors, relational, subtypes),
    }


def encode_questions(colors: np.ndarray, relational: np.ndarray, subtypes: np.ndarray) -> np.ndarray:
    """One-hot question vectors (..., 11) float32: colour (6), kind (2), subtype (3)."""
    eye = np.eye(QUESTION_DIM, dtype=np.float32)
    return (eye[colors]
            + eye[NUM_OBJECTS + np.asarray(relational, dtype=np.int64)]
            + eye[NUM_OBJECTS + 2 + np.asarray(subtypes)])


def decode_question(question) -> Tuple[int, bool, int]:
    """``(colour index, is relational, subtype)`` of one question vector (array or tensor)."""
    q = np.asarray(question, dtype=np.float64)
    blocks = np.split(q, [NUM_OBJECTS, NUM_OBJECTS + 2])
    if q.shape != (QUESTION_DIM,) or not np.isin(q, (0, 1)).all() or any(b.sum() != 1 for b in blocks):
        raise ValueError(f"not a Sort-of-CLEVR question vector (one-hot blocks of 6, 2 and 3): {q}")
    color, kind, subtype = (int(b.argmax()) for b in blocks)
    return color, bool(kind), subtype


def describe_question(question) -> str:
    """The question vector in words, e.g. ``'Is the red object on the left?'``."""
    color, relational, subtype = decode_question(question)
    return _TEMPLATES[relational][subtype].format(list(COLORS)[color])


def answer_name(answer) -> str:
    """The answer index in words: ``'yes'``, ``'no'``, ``'square'``, ``'circle'`` or ``'1'``..``'6'``."""
    answer = int(answer)
    if not 0 <= answer < NUM_ANSWERS:
        raise ValueError(f"answer index must be in [0, {NUM_ANSWERS}), got {answer}")
    return ANSWERS[answer]


class SortOfClevr(Dataset):
    """Sort-of-CLEVR as ``((image, question), answer)`` items, one per image-question pair.

    Args:
        root: cache directory; ``None`` means ``$TIMM_AIT_DATA`` or ``~/.cache/timm_ait``.
        split: ``'train'`` or ``'test'``; each split has its own random stream from ``seed``.
        num_images: number of images (20 questions each); defaults to 9,800 train, 200 test.
        seed: base seed; the same arguments always give the same data.
        questions: ``'all'``, ``'relational'`` or ``'non_relational'``: which items to keep.
        transform: applied to the PIL RGB image; without one the image is a float tensor
            (3, 75, 75) in [0, 1].
        progress: show a progress bar on stderr while generating.

    Per item, ``questions`` (M, 11), ``answers`` (M,), ``is_relational`` (M,),
    ``question_type`` (M,) (an index into ``QUESTION_TYPES``) and ``image_index`` (M,), which
    indexes ``images`` (N, 75, 75, 3), ``centers`` and ``shapes``.
    """

    num_classes = NUM_ANSWERS

    def __init__(
            self,
            root: Optional[str] = None,
            split: str = "train",
            num_images: Optional[int] = None,
            seed: int = 0,
            questions: str = "all",
            transform: Optional[Callable] = None,
            progress: bool = True,
    ):
        if questions not in QUESTION_SETS:
            raise ValueError(f"unknown questions {questions!r}; expected one of {QUESTION_SETS}")
        self.split = check_split(split)
        self.num_images = check_int(
            DEFAULT_SIZES[split] if num_images is None else num_images, "num_images", minimum=1)
        self.seed = check_int(seed, "seed", minimum=0)
        self.transform = transform

        self.cache_path, arrays = cached_dataset(
            root, "sort_of_clevr", split, "num_images", self.num_images, self.seed, FORMAT_VERSION,
            lambda: generate_sort_of_clevr(self.num_images, split_rng(self.seed, split), progress))
        self.images = arrays["images"]
        self.centers = arrays["centers"]
        self.shapes = arrays["shapes"]

        relational = arrays["question_relational"].reshape(-1)
        keep = {"all": np.ones_like(relational), "relational": relational,
                "non_relational": ~relational}[questions]
        self.image_index = np.repeat(np.arange(self.num_images), arrays["answers"].shape[1])[keep]
        self.is_relational = relational[keep]
        subtypes = arrays["question_subtypes"].reshape(-1)[keep]
        self.question_type = NUM_SUBTYPES * self.is_relational.astype(np.int64) + subtypes
        self.questions = encode_questions(arrays["question_colors"].reshape(-1)[keep],
                                          self.is_relational, subtypes)
        self.answers = arrays["answers"].reshape(-1)[keep]

    def __len__(self) -> int:
        return len(self.answers)

    def __getitem__(self, index: int):
        pixels = self.images[self.image_index[index]]
        if self.transform is not None:
            image = self.transform(Image.fromarray(pixels))
        else:
            image = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)
        question = torch.from_numpy(self.questions[index].copy())
        return (image, question), int(self.answers[index])
