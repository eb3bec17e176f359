"""Triangle dataset: geometry of the labels, rendering, determinism, caching, loader use."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from timm_ait.data import TriangleDataset, _cache
from timm_ait.data import triangle
from timm_ait.data.triangle import generate_triangles

N = 96  # small enough that every dataset in this file is generated in milliseconds


@pytest.fixture(scope="module")
def generated():
    return generate_triangles(2000, np.random.default_rng(123))


def make(root, **kwargs):
    kwargs.setdefault("num_samples", N)
    return TriangleDataset(root=root, progress=False, **kwargs)


def sides(centers):
    a, b, c = centers
    return math.dist(a, b), math.dist(b, c), math.dist(c, a)


def test_labels_are_balanced(generated):
    assert np.bincount(generated["labels"]).tolist() == [1000, 1000]


def test_label_0_is_equilateral_and_label_1_is_not(generated):
    for centers, label in zip(generated["centers"], generated["labels"]):
        lengths = sides(centers)
        assert min(lengths) >= triangle.MIN_SIDE
        if label == 0:
            assert max(lengths) - min(lengths) < 1e-9 * max(lengths)
        else:
            assert max(lengths) >= triangle.MIN_SIDE_RATIO_RANDOM * min(lengths)


def test_images_show_the_clusters_and_nothing_else(generated):
    images, centers = generated["images"], generated["centers"]
    assert images.shape == (2000, 64, 64) and images.dtype == np.uint8
    assert set(np.unique(images).tolist()) == {0, 255}

    reach = triangle.CLUSTER_RADIUS + triangle.DOT_RADIUS
    assert (centers >= reach).all() and (centers <= 63 - reach).all()
    rows, cols = np.mgrid[:64, :64]
    for image, image_centers in zip(images, centers):
        for x, y in image_centers:
            # Every dot covers the pixel nearest to its cluster centre.
            assert image[round(y), round(x)] == 255
        dist_to_nearest_centre = np.min(
            [np.hypot(cols - x, rows - y) for x, y in image_centers], axis=0)
        assert (dist_to_nearest_centre[image == 255] <= reach + 1e-9).all()


def test_a_dot_is_a_disc_of_radius_2():
    x, y = 10.3, 20.6
    image = triangle._render(np.array([[[x, y]]]))[0]
    expected = {(r, c) for r in range(64) for c in range(64) if (c - x) ** 2 + (r - y) ** 2 <= 4}
    assert set(zip(*np.nonzero(image))) == expected


def test_same_seed_gives_same_data(tmp_path):
    a = generate_triangles(50, np.random.default_rng(7))
    b = generate_triangles(50, np.random.default_rng(7))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    first, second = make(tmp_path / "one", seed=3), make(tmp_path / "two", seed=3)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.targets, second.targets)


def test_splits_and_seeds_differ(tmp_path):
    train, test, other_seed = make(tmp_path), make(tmp_path, split="test"), make(tmp_path, seed=1)
    assert not np.array_equal(train.centers, test.centers)
    assert not np.array_equal(train.centers, other_seed.centers)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'train', 'test'"):
        make(tmp_path, split="val")
    with pytest.raises(ValueError, match="num_samples"):
        make(tmp_path, num_samples=0)
    with pytest.raises(ValueError, match="seed"):
        make(tmp_path, seed=-1)


def test_default_sizes_and_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMM_AIT_DATA", str(tmp_path))
    monkeypatch.setitem(triangle.DEFAULT_SIZES, "test", 10)
    dataset = TriangleDataset(split="test", progress=False)
    assert len(dataset) == 10
    assert dataset.cache_path.parent == tmp_path
    assert dataset.cache_path.name == f"triangle-test-n10-seed0-v{triangle.FORMAT_VERSION}.npz"


def test_second_call_uses_the_cache(tmp_path, monkeypatch):
    first = make(tmp_path)
    assert os.listdir(tmp_path) == [first.cache_path.name]  # no temporary file left behind

    def must_not_generate(*args, **kwargs):
        raise AssertionError("generated again instead of loading the cache")

    monkeypatch.setattr(triangle, "generate_triangles", must_not_generate)
    second = make(tmp_path)
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.targets, second.targets)


def flip_last_byte_of_images(path):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["images"].reshape(-1)[-1] ^= 1
    with open(path, "wb") as f:  # a well-formed file whose content no longer matches its checksum
        np.savez_compressed(f, **arrays)


@pytest.mark.parametrize("corrupt, reason", [
    (lambda path: path.write_bytes(path.read_bytes()[:1000]), "unusable cache file"),
    (lambda path: path.write_bytes(b"not a numpy file"), "unusable cache file"),
    (flip_last_byte_of_images, "checksums"),
], ids=["truncated", "garbage", "checksum"])
def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, corrupt, reason):
    original = make(tmp_path)
    corrupt(original.cache_path)
    with pytest.warns(UserWarning, match=reason):
        rebuilt = make(tmp_path)
    np.testing.assert_array_equal(rebuilt.images, original.images)
    np.testing.assert_array_equal(rebuilt.targets, original.targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(tmp_path)  # the rebuilt file loads without complaint


def test_cache_with_other_metadata_is_not_used(tmp_path):
    other = make(tmp_path, seed=1)
    wanted = _cache.cache_file(tmp_path, "triangle", "train", N, 0, triangle.FORMAT_VERSION)
    os.replace(other.cache_path, wanted)
    with pytest.warns(UserWarning, match="metadata"):
        dataset = make(tmp_path, seed=0)
    assert not np.array_equal(dataset.images, other.images)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_cache.np, "savez_compressed", disk_full)
    with pytest.warns(UserWarning, match="cannot write the cache file .*disk full.*without caching it"):
        dataset = make(tmp_path)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    np.testing.assert_array_equal(dataset.images, make(tmp_path).images)  # the data is all there


def test_a_read_only_data_folder_costs_the_cache_not_the_run(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(_cache.tempfile, "mkstemp", read_only)
    with pytest.warns(UserWarning, match=r"cannot write the cache file .*PermissionError.*Permission denied"):
        dataset = make(tmp_path)
    assert len(dataset) == N and os.listdir(tmp_path) == []


def test_a_killed_writers_temporary_file_is_removed(tmp_path):
    import socket
    import subprocess
    import sys

    path = _cache.cache_file(tmp_path, "triangle", "train", N, 0, triangle.FORMAT_VERSION)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has exited
    host = socket.gethostname()
    left_over = tmp_path / f"{path.name}.{host}.{dead}.k1ll3d_0.tmp"   # what kill -9 during a write leaves
    writing = tmp_path / f"{path.name}.{host}.{os.getpid()}.l1v3_000.tmp"  # a writer that still runs
    for f in (left_over, writing):
        f.write_bytes(b"partial")
    make(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, writing.name])


def test_items_work_with_timm_transforms_and_a_dataloader(tmp_path):
    from timm.data import create_transform

    dataset = make(tmp_path, target_transform=lambda label: label + 10)
    image, label = dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert label == dataset.targets[0] + 10
    np.testing.assert_array_equal(np.asarray(image)[..., 0], dataset.images[0])

    dataset.transform = create_transform(input_size=64, is_training=False, crop_pct=1.0)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
    assert labels.tolist() == (dataset.targets[:8] + 10).tolist()


def test_fresh_each_epoch_draws_a_new_reproducible_set_per_epoch(tmp_path):
    fixed = make(tmp_path)
    fresh = make(tmp_path, fresh_each_epoch=True)
    np.testing.assert_array_equal(fresh.images, fixed.images)  # epoch 0 is the cached set
    fresh.set_epoch(1)
    assert len(fresh) == N and not np.array_equal(fresh.images, fixed.images)
    assert np.bincount(fresh.targets).tolist() == [N // 2, N // 2]
    for centers, label in zip(fresh.centers, fresh.targets):  # its labels are right too
        lengths = sides(centers)
        assert (max(lengths) - min(lengths) < 1e-9 * max(lengths)) == (label == 0)
    image, target = fresh[5]
    assert np.array_equal(np.asarray(image)[..., 0], fresh.images[5]) and target == fresh.targets[5]
    other = make(tmp_path, fresh_each_epoch=True)
    other.set_epoch(1)
    np.testing.assert_array_equal(other.images, fresh.images)  # the same (seed, epoch), the same set
    other.set_epoch(2)
    assert not np.array_equal(other.images, fresh.images)
    assert not np.array_equal(make(tmp_path, seed=1, fresh_each_epoch=True).images, fixed.images)
    fresh.set_epoch(0)
    np.testing.assert_array_equal(fresh.images, fixed.images)
    fixed.set_epoch(3)  # without fresh_each_epoch the set never changes
    np.testing.assert_array_equal(fixed.images, make(tmp_path).images)


def test_fresh_each_epoch_is_for_training_data_only(tmp_path):
    with pytest.raises(ValueError, match="fresh_each_epoch draws new training data; the 'test' split stays fixed"):
        make(tmp_path, split="test", fresh_each_epoch=True)
    from timm_ait.data.factory import create_ait_dataset
    with pytest.raises(ValueError, match="training split of \\['triangle'\\] only, not for 'sort-of-clevr'"):
        create_ait_dataset('sort-of-clevr', root=str(tmp_path), fresh_each_epoch=True, num_samples=4)
