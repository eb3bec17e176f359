"""tools/sort_of_clevr_prior.py: the question-only floor, against a count done by hand."""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from timm_ait.data.sort_of_clevr import SortOfClevr, decode_question

REPO = Path(__file__).resolve().parents[1]
from tools import sort_of_clevr_prior  # noqa: E402


def test_the_floor_is_the_most_common_training_answer_of_each_question(tmp_path):
    out = tmp_path / 'prior.json'
    results = sort_of_clevr_prior.main(['--data-dir', str(tmp_path), '--seed', '3', '--train-num-images', '300',
                                        '--test-num-images', '30', '--results-file', str(out)])
    assert json.loads(out.read_text()) == results
    # the reference: decoded question vectors and Counters, item by item
    train, test = (SortOfClevr(root=str(tmp_path), split=split, num_images=n, seed=3, progress=False)
                   for split, n in (('train', 300), ('test', 30)))
    asked = {}
    for question, answer in zip(train.questions, train.answers):
        asked.setdefault(decode_question(question), Counter())[answer] += 1
    # ties go to the lowest answer index
    best = {q: min(c, key=lambda a: (-c[a], a)) for q, c in asked.items()}
    correct = np.array([best[decode_question(q)] == a for q, a in zip(test.questions, test.answers)])
    relational = np.array([decode_question(q)[1] for q in test.questions])
    assert results['top1'] == pytest.approx(100 * correct.mean(), abs=1e-4)
    assert results['relational_top1'] == pytest.approx(100 * correct[relational].mean(), abs=1e-4)
    assert results['non_relational_top1'] == pytest.approx(100 * correct[~relational].mean(), abs=1e-4)
    counts = np.array([decode_question(q)[1:] == (True, 2) for q in test.questions])
    assert results['count_top1'] == pytest.approx(100 * correct[counts].mean(), abs=1e-4)


def test_a_question_the_training_set_never_asked_is_an_error(tmp_path):
    with pytest.raises(ValueError, match='the training set never asked'):
        sort_of_clevr_prior.main(['--data-dir', str(tmp_path), '--train-num-images', '1', '--test-num-images', '20'])
