#!/usr/bin/env python3
"""What Sort-of-CLEVR's questions alone give away: the floor a model must beat to have looked at the image.

For each question (colour, kind, subtype) the answer the training set gives most often; scored on the
test set with the keys validate.py writes (top1, relational_top1, non_relational_top1, <kind>_top1).
A "relational" figure at this floor means the model answers from the question's prior, not the scene.

    python tools/sort_of_clevr_prior.py --data-dir data --seed 0 --results-file prior.json
"""
import argparse
import sys

import numpy as np

from timm_ait.data.sort_of_clevr import COLORS, NUM_ANSWERS, QUESTION_TYPES, SortOfClevr
from timm_ait.train.evaluate import report_results


NUM_QUESTIONS = len(COLORS) * len(QUESTION_TYPES)


def question_keys(dataset: SortOfClevr) -> np.ndarray:
    """One integer per item naming its question: its colour and its kind (question_type)."""
    colors = dataset.questions[:, :len(COLORS)].argmax(1)
    return colors * len(QUESTION_TYPES) + dataset.question_type


def prior_answers(train: SortOfClevr) -> np.ndarray:
    """The most common training answer of each question (ties: the lowest answer index; -1: never asked)."""
    counts = np.zeros((NUM_QUESTIONS, NUM_ANSWERS), dtype=np.int64)
    np.add.at(counts, (question_keys(train), train.answers), 1)
    return np.where(counts.any(1), counts.argmax(1), -1)


def score(prior: np.ndarray, test: SortOfClevr) -> dict:
    """Top-1 (percent) of answering each test question with ``prior``, overall and by kind."""
    predicted = prior[question_keys(test)]
    if (predicted < 0).any():
        raise ValueError('the test set asks a question the training set never asked; use more training images')
    correct = predicted == test.answers
    masks = dict(relational=test.is_relational, non_relational=~test.is_relational,
                 **{name: test.question_type == i for i, name in enumerate(QUESTION_TYPES)})
    results = dict(top1=correct.mean(), **{f'{name}_top1': correct[mask].mean()
                                           for name, mask in masks.items() if mask.any()})
    return {k: round(100.0 * float(v), 4) for k, v in results.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-dir', default='data', help='cache of the generated datasets')
    parser.add_argument('--seed', type=int, default=0, help='the seed of the data (a run\'s --seed)')
    parser.add_argument('--train-num-images', type=int, default=None, help='default: the paper\'s 9,800')
    parser.add_argument('--test-num-images', type=int, default=None, help='default: the paper\'s 200')
    parser.add_argument('--results-file', default='', help='also write the figures here as JSON')
    args = parser.parse_args(argv)
    data = dict(root=args.data_dir, seed=args.seed, progress=False)
    train = SortOfClevr(split='train', num_images=args.train_num_images, **data)
    test = SortOfClevr(split='test', num_images=args.test_num_images, **data)
    results = dict(baseline='most common training answer per question', seed=args.seed,
                   num_samples=len(test), **score(prior_answers(train), test))
    report_results(results, args.results_file)
    return results


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
