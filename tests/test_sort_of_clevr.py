"""Sort-of-CLEVR: answers checked against a plain-Python reference, rendering, caching, items."""
import itertools
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from timm_ait.data import sort_of_clevr
from timm_ait.train.evaluate import evaluate
from timm_ait.data.sort_of_clevr import (
    ANSWERS,
    COLORS,
    NUM_ANSWERS,
    QUESTION_DIM,
    QUESTION_TYPES,
    SHAPES,
    SortOfClevr,
    answer_name,
    answer_questions,
    decode_question,
    describe_question,
    encode_questions,
    generate_sort_of_clevr,
)

N = 40  # images per dataset built in a test; generation takes milliseconds


@pytest.fixture(scope="module")
def generated():
    return generate_sort_of_clevr(300, np.random.default_rng(2024))


def make(root, **kwargs):
    kwargs.setdefault("num_images", N)
    return SortOfClevr(root=root, progress=False, **kwargs)


def reference_answer(centers, shapes, color, relational, subtype):
    """The answer, as a word from ANSWERS, worked out the slow and obvious way."""
    x, y = centers[color]
    shape = SHAPES[shapes[color]]
    if not relational:
        return [shape, "yes" if x < 37.5 else "no", "yes" if y < 37.5 else "no"][subtype]
    if subtype == 2:
        return str(sum(SHAPES[s] == shape for s in shapes))
    distances = sorted((math.dist((x, y), centers[other]), other)
                       for other in range(len(centers)) if other != color)
    # The generator promises a unique nearest and farthest object.
    assert distances[0][0] < distances[1][0] and distances[-2][0] < distances[-1][0]
    nearest, farthest = distances[0][1], distances[-1][1]
    return SHAPES[shapes[nearest if subtype == 0 else farthest]]


def test_stored_answers_match_the_reference(generated):
    for n in range(300):
        centers, shapes = generated["centers"][n].tolist(), generated["shapes"][n].tolist()
        for q in range(20):
            color = generated["question_colors"][n, q]
            relational = generated["question_relational"][n, q]
            subtype = generated["question_subtypes"][n, q]
            assert relational == (q >= 10)  # 10 non-relational, then 10 relational
            expected = reference_answer(centers, shapes, color, relational, subtype)
            assert ANSWERS[generated["answers"][n, q]] == expected, (n, q)


def test_every_question_type_matches_the_reference(generated):
    # Ask every (colour, kind, subtype) of every scene, not only the randomly drawn questions.
    combos = list(itertools.product(range(len(COLORS)), (False, True), range(3)))
    n = len(generated["centers"])
    colors, relational, subtypes = (np.array([c[i] for c in combos]) for i in range(3))
    colors, relational, subtypes = (np.tile(a, (n, 1)) for a in (colors, relational, subtypes))
    answers = answer_questions(generated["centers"], generated["shapes"], colors, relational, subtypes)
    for scene in range(n):
        centers, shapes = generated["centers"][scene].tolist(), generated["shapes"][scene].tolist()
        for answer, combo in zip(answers[scene], combos):
            assert ANSWERS[answer] == reference_answer(centers, shapes, *combo), (scene, combo)


def test_questions_and_answers_cover_all_kinds(generated):
    assert set(np.unique(generated["answers"]).tolist()) == set(range(NUM_ANSWERS))
    assert set(np.unique(generated["question_colors"]).tolist()) == set(range(len(COLORS)))


def expected_footprint(shape):
    offsets = range(-5, 6)
    if shape == "square":
        return {(dy, dx) for dy in offsets for dx in offsets}
    return {(dy, dx) for dy in offsets for dx in offsets if dx * dx + dy * dy <= 5.5 ** 2}


def test_objects_are_drawn_whole_in_their_colour_without_overlap(generated):
    images, all_centers, all_shapes = generated["images"], generated["centers"], generated["shapes"]
    assert images.shape == (300, 75, 75, 3) and images.dtype == np.uint8
    for image, centers, shapes in zip(images, all_centers, all_shapes):
        coloured = np.zeros((75, 75), dtype=int)
        for (x, y), shape, rgb in zip(centers, shapes, COLORS.values()):
            rows, cols = np.nonzero((image == rgb).all(axis=-1))
            drawn = {(r - y, c - x) for r, c in zip(rows, cols)}
            # Exactly the object's footprint around its centre has its colour: it is all
            # there (so nothing was drawn over it) and nowhere else.
            assert drawn == expected_footprint(SHAPES[shape])
            coloured[rows, cols] += 1
        assert (image[coloured == 0] == 255).all()  # the rest is white background
        for (x1, y1), (x2, y2) in itertools.combinations(centers.tolist(), 2):
            assert max(abs(x1 - x2), abs(y1 - y2)) > 10  # disjoint bounding boxes


def test_same_seed_gives_same_data_and_splits_differ(tmp_path):
    a = generate_sort_of_clevr(30, np.random.default_rng(5))
    b = generate_sort_of_clevr(30, np.random.default_rng(5))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    first, second = make(tmp_path / "one"), make(tmp_path / "two")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.answers, second.answers)
    assert not np.array_equal(first.centers, make(tmp_path, split="test").centers)


def test_question_filtering(tmp_path):
    every = make(tmp_path)
    relational = make(tmp_path, questions="relational")
    non_relational = make(tmp_path, questions="non_relational")
    assert len(every) == 20 * N and len(relational) == len(non_relational) == 10 * N
    assert relational.is_relational.all() and not non_relational.is_relational.any()
    assert (relational.questions[:, 7] == 1).all() and (non_relational.questions[:, 6] == 1).all()
    for subset, mask in ((relational, every.is_relational), (non_relational, ~every.is_relational)):
        np.testing.assert_array_equal(subset.questions, every.questions[mask])
        np.testing.assert_array_equal(subset.answers, every.answers[mask])
        np.testing.assert_array_equal(subset.image_index, every.image_index[mask])


def test_question_encoding_round_trips():
    vector = encode_questions(np.array(3), np.array(True), np.array(1))
    assert vector.shape == (QUESTION_DIM,) and vector.dtype == np.float32
    assert vector.tolist() == [0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0]
    assert decode_question(torch.from_numpy(vector)) == (3, True, 1)
    assert describe_question(vector) == "What shape is the object farthest from the orange object?"
    assert [answer_name(a) for a in range(NUM_ANSWERS)] == list(ANSWERS)


@pytest.mark.parametrize("bad", [np.zeros(QUESTION_DIM), np.ones(QUESTION_DIM), np.zeros(10)])
def test_invalid_question_vectors_are_rejected(bad):
    with pytest.raises(ValueError, match="question vector"):
        describe_question(bad)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="'all', 'relational', 'non_relational'"):
        make(tmp_path, questions="both")
    with pytest.raises(ValueError, match="'train', 'test'"):
        make(tmp_path, split="val")
    with pytest.raises(ValueError, match="num_images"):
        make(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="seed"):
        make(tmp_path, seed=-1)
    with pytest.raises(ValueError, match="answer index"):
        answer_name(NUM_ANSWERS)


def test_second_call_uses_the_cache(tmp_path, monkeypatch):
    first = make(tmp_path)

    def must_not_generate(*args, **kwargs):
        raise AssertionError("generated again instead of loading the cache")

    monkeypatch.setattr(sort_of_clevr, "generate_sort_of_clevr", must_not_generate)
    second = make(tmp_path, questions="relational")  # one cache serves every question filter
    np.testing.assert_array_equal(second.answers, first.answers[first.is_relational])


def test_corrupt_cache_is_rebuilt_with_a_warning(tmp_path):
    original = make(tmp_path)
    data = original.cache_path.read_bytes()
    original.cache_path.write_bytes(data[: len(data) - 100])
    with pytest.warns(UserWarning, match="unusable cache file"):
        rebuilt = make(tmp_path)
    np.testing.assert_array_equal(rebuilt.images, original.images)
    np.testing.assert_array_equal(rebuilt.answers, original.answers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(tmp_path)
    assert os.listdir(tmp_path) == [original.cache_path.name]


def test_items(tmp_path):
    dataset = make(tmp_path)
    (image, question), answer = dataset[25]
    assert image.shape == (3, 75, 75) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    torch.testing.assert_close(image, torch.from_numpy(dataset.images[1]).permute(2, 0, 1) / 255)
    assert question.dtype == torch.float32 and question.shape == (QUESTION_DIM,)
    assert isinstance(answer, int) and answer == dataset.answers[25]

    received = []
    dataset.transform = lambda pil: received.append(pil) or torch.zeros(3, 8, 8)
    (images, questions), answers = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert isinstance(received[0], Image.Image) and received[0].mode == "RGB"
    assert images.shape == (4, 3, 8, 8) and questions.shape == (4, QUESTION_DIM)
    assert answers.tolist() == dataset.answers[:4].tolist()


def test_grid_of_questions_and_answers_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    from tools import show_sort_of_clevr as show

    dataset = make(tmp_path, split="test", num_images=5)
    items = show.questions_to_show(dataset, 3, 5)
    assert (dataset.image_index[items] == 3).all()
    assert dataset.is_relational[items].tolist() == [False] * 3 + [True] * 2
    out = tmp_path / "grid.png"
    show.main(["--data-dir", str(tmp_path), "--split", "test", "--num-images", "5", "--num-shown", "5",
               "--out", str(out)])
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > grid.height > 300


@pytest.mark.parametrize("flags,message", [
    (["--cols", "0"], "--cols must be >= 1, got 0"),
    (["--num-shown", "-1"], "--num-shown must be >= 1, got -1"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--out", "/no/such/folder/grid.png"], "expected a file in an existing folder"),
])
def test_grid_arguments_are_checked_before_any_data_is_made(tmp_path, capsys, flags, message):
    from tools import show_sort_of_clevr as show

    with pytest.raises(SystemExit) as exit_info:
        show.main(["--data-dir", str(tmp_path / "data"), "--num-images", "5", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in error and message in error, error
    assert not (tmp_path / "data").exists()


class AlwaysAnswers(torch.nn.Module):
    """Answers every question with one fixed answer, whatever the image."""

    def __init__(self, answer):
        super().__init__()
        self.logits = torch.nn.functional.one_hot(torch.tensor(answer), NUM_ANSWERS).float()

    def forward(self, image, question):
        return self.logits.expand(image.shape[0], -1)


def test_evaluate_reports_top1_of_each_kind_of_question(tmp_path):
    """Per-kind top-1 of a model that always says 'circle': the share of 'circle' among each kind's answers."""
    dataset = make(tmp_path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    groups = {name: dataset.question_type == i for i, name in enumerate(QUESTION_TYPES)}
    metrics = evaluate(AlwaysAnswers(ANSWERS.index("circle")), loader, torch.device("cpu"),
                       relational=dataset.is_relational, groups=groups)
    # the reference decodes each question vector, not question_type
    kinds = [decode_question(q)[1:] for q in dataset.questions]
    circle = dataset.answers == ANSWERS.index("circle")
    for i, name in enumerate(QUESTION_TYPES):
        of_kind = np.array([k == (i >= 3, i % 3) for k in kinds])
        assert of_kind.any()
        assert metrics[f"{name}_top1"] == pytest.approx(100 * circle[of_kind].mean())
    assert metrics["relational_top1"] == pytest.approx(100 * circle[dataset.is_relational].mean())
    assert metrics["top1"] == pytest.approx(100 * circle.mean())
    assert 0 < metrics["nearest_shape_top1"] < 100 and metrics["left_top1"] == metrics["count_top1"] == 0


def test_evaluate_refuses_a_group_of_the_wrong_length_before_any_work(tmp_path):
    dataset = make(tmp_path)

    class Refuses(torch.nn.Module):
        def forward(self, *inputs):
            raise AssertionError("the model ran")

    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    with pytest.raises(ValueError, match=rf"group 'count' needs one bool per item of the evaluation set "
                                         rf"\({len(dataset)}\), got shape \(3,\)"):
        evaluate(Refuses(), loader, torch.device("cpu"), groups={"count": np.ones(3, dtype=bool)})
