"""The dataset factory on small stand-ins for the torchvision datasets (no download)."""
import os
import pickle
import sys

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

from timm_ait import train
from timm_ait.data.factory import check_num_classes, create_ait_dataset, dataset_num_classes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """A CIFAR-10 folder in torchvision's layout with 8 images per batch file."""
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {'data': rng.integers(0, 256, (8, 3072), dtype=np.uint8), 'labels': list(rng.integers(0, 10, 8))}
        with open(folder / name, 'wb') as f:
            pickle.dump(batch, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'class{i}' for i in range(10)]}, f)
    # the stand-in files cannot match CIFAR's md5 sums
    monkeypatch.setattr(torchvision.datasets.CIFAR10, '_check_integrity', lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda path, md5=None: True)
    return tmp_path


def test_cifar10_splits(cifar10_root):
    train = create_ait_dataset('torch/cifar10', root=str(cifar10_root), split='train')
    test = create_ait_dataset('torch/cifar10', root=str(cifar10_root), split='validation')
    assert (len(train), len(test)) == (40, 8)
    image, label = train[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and 0 <= label < 10
    first_five = create_ait_dataset('torch/cifar10', root=str(cifar10_root), split='train', num_samples=5)
    assert len(first_five) == 5
    assert dataset_num_classes(train) == dataset_num_classes(first_five) == 10  # through the subset too


def test_training_on_cifar_stand_in(cifar10_root, tmp_path):
    model_kwargs = dict(embed_dim=32, num_heads=2, num_slots=4, slot_dim=8, gwl_heads=2, bottleneck=8, patch_size=8)
    metrics = train.main([
        '--model', 'ait_small_patch4_32', '--dataset', 'torch/cifar10', '--data-dir', str(cifar10_root),
        '--epochs', '1', '-b', '8', '--workers', '0', '--warmup-epochs', '0', '--output', str(tmp_path / 'out'),
        '--experiment', 'cifar', '--train-num-samples', '16', '--hflip', '0.5', '--scale', '0.75', '1',
        '--model-kwargs', *(f'{k}={v}' for k, v in model_kwargs.items())])
    last = tmp_path / 'out' / 'cifar' / 'last.pth.tar'
    assert last.is_file()

    # the reported metrics, recomputed from the saved weights and the raw test batch: pixels / 255,
    # normalised with the model's mean and std (the 32x32 images need no resize or crop), in eval mode
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        state = torch.load(last, map_location='cpu', weights_only=True)['state_dict']
    model = timm.create_model('ait_small_patch4_32', num_classes=10, **model_kwargs)
    model.load_state_dict(state)
    with open(cifar10_root / 'cifar-10-batches-py' / 'test_batch', 'rb') as f:
        batch = pickle.load(f)
    images = torch.tensor(batch['data']).reshape(8, 3, 32, 32).float() / 255
    mean, std = (torch.tensor(model.pretrained_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    labels = torch.tensor([int(y) for y in batch['labels']])
    with torch.no_grad():
        logits = model.eval()((images - mean) / std)
    top5 = logits.topk(5, dim=-1).indices
    assert metrics['top1'] == pytest.approx(100.0 * (top5[:, 0] == labels).float().mean().item(), abs=1e-4)
    assert metrics['top5'] == pytest.approx(100.0 * (top5 == labels[:, None]).any(-1).float().mean().item(), abs=1e-4)
    assert metrics['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)


def test_oxford_pet_stand_in(tmp_path):
    base = tmp_path / 'oxford-iiit-pet'
    (base / 'images').mkdir(parents=True)
    (base / 'annotations').mkdir()
    lines = []
    for i, (breed, label) in enumerate([('Abyssinian', 1), ('beagle', 2)] * 2):
        image_id = f'{breed}_{i}'
        Image.fromarray(np.full((40, 30, 3), 40 * i, np.uint8)).save(base / 'images' / f'{image_id}.jpg')
        lines.append(f'{image_id} {label} 1 1')
    for split in ('trainval', 'test'):
        (base / 'annotations' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    dataset = create_ait_dataset('torch/oxford-pet', root=str(tmp_path), split='train')
    assert len(dataset) == 4 and dataset_num_classes(dataset) == 2  # the breeds of the stand-in
    image, label = dataset[0]
    assert image.mode == 'RGB' and label in (0, 1)
    dataset.transform = torchvision.transforms.Compose([
        torchvision.transforms.Resize((16, 16)), torchvision.transforms.ToTensor()])
    assert dataset[1][0].shape == (3, 16, 16)  # timm's loader sets the transform after construction


def test_image_folder(tmp_path):
    for cls in ('cat', 'dog'):
        (tmp_path / 'train' / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / cls / 'a.png')
    dataset = create_ait_dataset('folder', root=str(tmp_path), split='train')
    assert len(dataset) == 2 and dataset_num_classes(dataset) == 2
    with pytest.raises(FileNotFoundError, match="no directory .* for split 'validation'"):
        create_ait_dataset('folder', root=str(tmp_path), split='validation')


def test_image_folder_labels_mean_the_same_class_in_every_split(tmp_path):
    def images(split, classes):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / cls / f'{cls}.png')

    images('train', ['a', 'b', 'c'])
    images('validation', ['a', 'c'])  # no 'b' in the validation split
    train = create_ait_dataset('folder', root=str(tmp_path), split='train')
    validation = create_ait_dataset('folder', root=str(tmp_path), split='validation')
    assert [label for _, label in train] == [0, 1, 2]
    assert [label for _, label in validation] == [0, 2]  # 'c' is class 2 there too
    assert dataset_num_classes(validation) == 3
    images('test', ['a', 'd'])
    with pytest.raises(ValueError, match=r"has class folders that the training split .* does not have: \['d'\]"):
        create_ait_dataset('folder', root=str(tmp_path), split='test')


def test_a_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -2] Name or service not known')

    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(ConnectionError, match=r"cannot download dataset 'torch/cifar10' into .*URLError.*Name or "
                                              r"service not known.*check the network"):
        create_ait_dataset('torch/cifar10', root=str(tmp_path / 'cifar'), download=True)


@pytest.mark.parametrize('name,root,error,match', [
    ('imagenet', None, ValueError, "unknown dataset 'imagenet'"),
    ('torch/cifar10', None, ValueError, 'needs --data-dir'),
    ('torch/cifar100', '/nonexistent/c100', FileNotFoundError, "data directory '/nonexistent/c100'"),
])
def test_dataset_errors(name, root, error, match):
    with pytest.raises(error, match=match):
        create_ait_dataset(name, root=root)


def test_missing_cifar_files_in_an_existing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match='--dataset-download'):
        create_ait_dataset('torch/cifar10', root=str(tmp_path))


def test_class_count_of_generated_data_and_the_check_against_the_model(tmp_path):
    triangle = create_ait_dataset('triangle', root=str(tmp_path), num_samples=4, progress=False)
    clevr = create_ait_dataset('sort-of-clevr', root=str(tmp_path), num_samples=2, progress=False)
    assert (dataset_num_classes(triangle), dataset_num_classes(clevr)) == (2, 10)
    check_num_classes(torch.nn.Linear(1, 1), triangle, 'triangle')  # says nothing of its classes: no check
    model = torch.nn.Module()
    model.num_classes = 2
    check_num_classes(model, triangle, 'triangle')
    with pytest.raises(ValueError, match=r"dataset 'sort-of-clevr' has 10 classes but the model has 2 outputs"
                                         r".*--num-classes 10"):
        check_num_classes(model, clevr, 'sort-of-clevr')


@pytest.mark.parametrize('name', ['triangle', 'sort-of-clevr', 'torch/cifar10', 'torch/oxford-pet'])
def test_a_misspelt_split_is_refused_naming_the_split_names(name, tmp_path):
    # before: every name but train/training meant the held-out split
    with pytest.raises(ValueError, match=r"unknown split 'trian' for dataset .*expected one of \['train', 'training', "
                                         r"'test', 'validation', 'val'\]"):
        create_ait_dataset(name, root=str(tmp_path), split='trian', num_samples=4, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was generated or read


def test_split_aliases_name_the_same_data(tmp_path):
    def images(split):
        return create_ait_dataset('triangle', root=str(tmp_path), split=split, num_samples=6, progress=False).images

    assert np.array_equal(images('train'), images('training'))
    held_out = images('test')
    assert np.array_equal(images('validation'), held_out) and np.array_equal(images('val'), held_out)
    assert not np.array_equal(images('train'), held_out)


def test_an_image_folder_split_is_one_of_its_subfolders(tmp_path):
    for split in ('train', 'valid'):
        (tmp_path / split / 'cat').mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / 'cat' / 'a.png')
    assert len(create_ait_dataset('folder', root=str(tmp_path), split='valid')) == 1
    with pytest.raises(FileNotFoundError, match=r"for split 'vaild'; the splits of .* are its subfolders: "
                                                r"\['train', 'valid'\]"):
        create_ait_dataset('folder', root=str(tmp_path), split='vaild')


def class_folder(root, split, counts):
    """An image folder split with ``counts[c]`` images in class folder c (files sorted by class on disk)."""
    for c, count in enumerate(counts):
        (root / split / f'class{c}').mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(root / split / f'class{c}' / f'{i:03d}.png')


def test_num_samples_of_an_image_folder_is_a_seeded_random_subset(tmp_path):
    class_folder(tmp_path, 'train', [16, 16])

    def labels(seed, n=16):
        subset = create_ait_dataset('folder', root=str(tmp_path), split='train', num_samples=n, seed=seed)
        return [label for _, label in subset]

    # before: the first 16 files, all of class 0
    assert sorted(set(labels(0))) == [0, 1]
    assert labels(0) == labels(0)  # drawn from the seed alone: the same on every rank and at validation
    assert labels(0) != labels(1)
    # every class in expectation: the share of class 0 in a draw of 8 of the 32 files is
    # hypergeometric with mean 1/2 and sd 0.16; over 100 seeds the mean is 1/2 within 0.016 (1 sd)
    shares = [np.mean(np.array(labels(seed, 8)) == 0) for seed in range(100)]
    assert abs(np.mean(shares) - 0.5) < 0.05


def test_num_samples_of_oxford_pet_is_a_seeded_random_subset(tmp_path):
    base = tmp_path / 'oxford-iiit-pet'
    (base / 'images').mkdir(parents=True)
    (base / 'annotations').mkdir()
    lines = []
    for i in range(20):  # the list file is sorted by breed, as torchvision's is
        breed, label = ('Abyssinian', 1) if i < 10 else ('beagle', 2)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(base / 'images' / f'{breed}_{i}.jpg')
        lines.append(f'{breed}_{i} {label} 1 1')
    (base / 'annotations' / 'trainval.txt').write_text('\n'.join(lines) + '\n')
    subset = create_ait_dataset('torch/oxford-pet', root=str(tmp_path), split='train', num_samples=10, seed=0)
    assert len(subset) == 10 and sorted({label for _, label in subset}) == [0, 1]


def test_num_samples_of_a_generated_dataset_is_its_size(tmp_path):
    triangle = create_ait_dataset('triangle', root=str(tmp_path), num_samples=6, seed=3, progress=False)
    assert len(triangle) == 6 and triangle.num_samples == 6
