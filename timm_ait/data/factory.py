"""One entry point for every dataset the training and validation scripts accept."""
import os
import warnings
from typing import Dict, Optional

import numpy as np
from torch.utils.data import Dataset, Subset

__all__ = ['DATASETS', 'FRESH_EACH_EPOCH', 'SPLITS', 'create_ait_dataset', 'resolve_split', 'is_train_split',
           'dataset_needs_no_aug', 'dataset_is_generated', 'dataset_num_classes', 'check_num_classes',
           'folder_class_map', 'random_subset', 'QUESTION_ANSWERING', 'check_model_inputs']

# name -> what it is; generated datasets need no data directory
DATASETS = {
    'triangle': 'Triangle (generated, 64x64, 2 classes)',
    'sort-of-clevr': 'Sort-of-CLEVR (generated, 75x75 images with questions, 10 answers)',
    'torch/cifar10': 'CIFAR-10 through torchvision',
    'torch/cifar100': 'CIFAR-100 through torchvision',
    'torch/oxford-pet': 'Oxford-IIIT Pet through torchvision (37 classes)',
    'folder': 'an image folder per split (DATA_DIR/SPLIT/CLASS/*.jpg), through timm',
}
# every split name a dataset with fixed splits accepts (all but 'folder', whose splits are its
# subfolders), and which split it means: the training split or the held-out one (a generated
# dataset's test stream, CIFAR's test batch, Oxford Pet's test list)
SPLITS = {'train': 'train', 'training': 'train', 'test': 'test', 'validation': 'test', 'val': 'test'}
# datasets of (image, question) items answered by a question-answering model, forward(images, questions)
QUESTION_ANSWERING = ('sort-of-clevr',)
# made by this package from a seed, so no data directory is needed
_GENERATED = ('triangle', 'sort-of-clevr')
# generated data whose labels a crop or a flip would change (a clipped cluster, 'is it on the left')
_NO_AUG = ('triangle', 'sort-of-clevr')
# generated data that can be drawn anew each epoch (fresh_each_epoch)
FRESH_EACH_EPOCH = ('triangle',)


def resolve_split(name: str, split: str, root: Optional[str] = None) -> str:
    """The split ``split`` of dataset ``name`` means: 'train' or 'test' (see :data:`SPLITS`), or for an
    image folder the subfolder itself. Any other name is refused, naming the accepted ones: a
    misspelt split must not fall back to another one."""
    _check_name(name)
    if name == 'folder':
        root = _require_dir(root, name, download=False)
        if not os.path.isdir(os.path.join(root, split)):
            found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            raise FileNotFoundError(f'image folder dataset: no directory {os.path.join(root, split)!r} for split '
                                    f'{split!r}; the splits of {root!r} are its subfolders: {found}')
        return split
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r} for dataset {name!r}; expected one of {list(SPLITS)} (train, '
                         'training: the training split; test, validation, val: the held-out split)')
    return SPLITS[split]


def is_train_split(split: str) -> bool:
    """Whether ``split`` names the training split (an image folder's 'train' and 'training' too)."""
    return SPLITS.get(split) == 'train'


def dataset_needs_no_aug(name: str) -> bool:
    return name in _NO_AUG


def dataset_is_generated(name: str) -> bool:
    return name in _GENERATED


def dataset_num_classes(dataset: Dataset) -> Optional[int]:
    """How many classes (answers) the labels of a dataset from ``create_ait_dataset`` range over.

    Read from what each kind of dataset says of itself (``num_classes``, torchvision's ``classes``,
    timm's folder reader's ``class_to_idx``), through subsets and wrappers; None if it says nothing.
    """
    while dataset is not None:
        if getattr(dataset, 'num_classes', None) is not None:
            return int(dataset.num_classes)
        if getattr(dataset, 'classes', None) is not None:
            return len(dataset.classes)
        class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
        if class_to_idx:
            return len(class_to_idx)
        dataset = getattr(dataset, 'dataset', None)
    return None


def check_num_classes(model, dataset: Dataset, name: str) -> None:
    """A clear error, before any step, when the labels of ``dataset`` do not fit the model's classifier."""
    classes = dataset_num_classes(dataset)
    outputs = getattr(model, 'num_classes', None)
    if classes is not None and outputs is not None and outputs != classes:
        raise ValueError(f'dataset {name!r} has {classes} classes but the model has {outputs} outputs '
                         f'(num_classes={outputs}); pass --num-classes {classes}')


def check_model_inputs(model, model_name: str, name: str) -> None:
    """A clear error, before any work, when ``model`` does not take what dataset ``name`` gives: a
    question-answering model (one with ``question_dim``) needs questions with its images, a
    classifier takes images only."""
    question_dim = getattr(model, 'question_dim', None)
    if question_dim is not None and name not in QUESTION_ANSWERING:
        raise ValueError(f'model {model_name!r} takes images and questions (forward(images, questions), question_dim='
                         f'{question_dim}), but dataset {name!r} gives images only; expected a question-answering '
                         f'dataset ({", ".join(QUESTION_ANSWERING)}) for it, or an image classifier for {name!r}')
    if question_dim is None and name in QUESTION_ANSWERING:
        raise ValueError(f'model {model_name!r} takes images only (forward(images)), but dataset {name!r} gives images '
                         'with questions; expected a question-answering model for it (one with question_dim, e.g. '
                         'ait_small_patch5_75)')


def _check_name(name: str) -> None:
    if name not in DATASETS:
        known = '\n'.join(f'  {k}: {v}' for k, v in DATASETS.items())
        raise ValueError(f'unknown dataset {name!r}; expected one of:\n{known}')


def _require_dir(path: Optional[str], name: str, download: bool) -> str:
    if not path:
        raise ValueError(f'dataset {name!r} needs --data-dir' + (' (add --dataset-download to fetch it there)'
                                                                  if name.startswith('torch/') else ''))
    if not download and not os.path.isdir(path):
        raise FileNotFoundError(f'data directory {path!r} for dataset {name!r} does not exist'
                                + (' (add --dataset-download to fetch it)' if name.startswith('torch/') else ''))
    return path


def create_ait_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'train',
        download: bool = False,
        num_samples: Optional[int] = None,
        seed: int = 0,
        questions: str = 'all',
        progress: bool = True,
        train_split: str = 'train',
        fresh_each_epoch: bool = False,
) -> Dataset:
    """Build the dataset ``name`` for ``split`` (a name of :data:`SPLITS`; an image folder's subfolder).

    ``num_samples`` sets the size of a generated dataset (images for Sort-of-CLEVR) and takes a
    random subset of ``num_samples`` items of the others, drawn from ``seed`` (the same on every
    rank). Raises a clear error for an unknown name, split or a missing data directory before
    anything is read. An image folder's classes are numbered from the
    class folders of ``train_split``, for every split, so labels mean the same class in all of them.
    ``fresh_each_epoch``: a training set drawn anew each epoch (Triangle only; the dataset's
    ``set_epoch`` switches it).
    """
    split = resolve_split(name, split, root)
    train = is_train_split(split)
    if fresh_each_epoch and not (name in FRESH_EACH_EPOCH and train):
        raise ValueError(f'fresh_each_epoch: a new set each epoch is drawn for the training split of '
                         f'{list(FRESH_EACH_EPOCH)} only, not for {name!r} split {split!r}')
    if name == 'triangle':
        from .triangle import TriangleDataset
        return TriangleDataset(root=root or None, split=split, num_samples=num_samples,
                               seed=seed, progress=progress, fresh_each_epoch=fresh_each_epoch)
    if name == 'sort-of-clevr':
        from .sort_of_clevr import SortOfClevr
        return SortOfClevr(root=root or None, split=split, num_images=num_samples,
                           seed=seed, questions=questions, progress=progress)

    root = _require_dir(root, name, download)
    try:
        if name in ('torch/cifar10', 'torch/cifar100'):
            from timm.data import create_dataset
            dataset = create_dataset(name, root=root, split='train' if train else 'validation',
                                     download=download, is_training=train)
        elif name == 'torch/oxford-pet':
            from torchvision.datasets import OxfordIIITPet
            dataset = _WithTransform(OxfordIIITPet(root, split='trainval' if train else 'test',
                                                   target_types='category', download=download))
        else:
            from timm.data import create_dataset
            dataset = create_dataset('', root=os.path.join(root, split), is_training=train,
                                     class_map=folder_class_map(root, split, train_split))
    except RuntimeError as e:  # torchvision's 'Dataset not found or corrupted', timm's 'Found 0 images'
        hint = ' (add --dataset-download to fetch it)' if name.startswith('torch/') else ''
        raise FileNotFoundError(f'dataset {name!r} not found under {root!r}: {e}{hint}') from e
    except OSError as e:  # no network, a refused connection, a folder it cannot write
        if not (download and name.startswith('torch/')):
            raise
        raise ConnectionError(f'cannot download dataset {name!r} into {root!r} ({type(e).__name__}: {e}); check '
                              'the network and the folder, or put the files there and drop --dataset-download') from e
    if num_samples is not None and num_samples < len(dataset):
        dataset = _TransformableSubset(dataset, random_subset(len(dataset), num_samples, seed))
    return dataset


def random_subset(size: int, num_samples: int, seed: int) -> list:
    """``num_samples`` distinct indices of ``range(size)``, drawn from ``seed`` alone (so every rank and
    every later validation draws the same ones), in increasing order. Files on disk are sorted by
    class, so the first N would hold the first classes only; a random subset holds every class in
    expectation."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f'num_samples must be an integer >= 1, got {num_samples!r}')
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(size, size=num_samples, replace=False)).tolist()


def folder_class_map(root: str, split: str, train_split: str = 'train') -> Optional[Dict[str, int]]:
    """Class name -> label for the image folder ``root/split``, numbered as in ``root/train_split``.

    timm numbers the class folders of each folder it reads by themselves, so a validation folder
    missing a class would shift every later label. Here every split takes the training split's
    numbering; a class folder the training split does not have is an error. Without a training
    split on disk the split numbers its own folders, with a warning.
    """
    from timm.data.readers.reader_image_folder import find_images_and_targets

    split_dir, train_dir = os.path.join(root, split), os.path.join(root, train_split)
    if split == train_split:
        return None  # timm numbers the training split's own folders: that is the numbering
    if not os.path.isdir(train_dir):
        warnings.warn(f'image folder dataset: no training split {train_dir!r} to number the classes by; the classes '
                      f'of {split_dir!r} are numbered by its own folders, which matches training only if it has '
                      'every class (pass the training split name)')
        return None
    _, class_to_idx = find_images_and_targets(train_dir)
    _, own = find_images_and_targets(split_dir)
    unknown = sorted(set(own) - set(class_to_idx))
    if unknown:  # timm would drop their images without a word
        raise ValueError(f'image folder dataset: {split_dir!r} has class folders that the training split '
                         f'{train_dir!r} does not have: {unknown[:10]}; expected a subset of '
                         f'{sorted(class_to_idx)[:10]}{" ..." if len(class_to_idx) > 10 else ""}')
    return class_to_idx


class _TransformableSubset(Subset):
    """A Subset whose ``transform`` reaches the wrapped dataset, as timm's loader sets it."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


class _WithTransform(Dataset):
    """Applies a settable ``transform`` to the images of a dataset that fixes its transforms at
    construction (torchvision's OxfordIIITPet), as timm's loader expects to set it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        image = image.convert('RGB')
        return (self.transform(image) if self.transform is not None else image), target
