"""Requests that train.py and validate.py refuse before any work, and what they make visible (no training)."""
import logging
import re

import pytest
import torch

from timm_ait.train import loop, validate
from timm_ait.train.args import check_args, parse_args

TINY = ['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '-b', '8', '--workers', '0', '--epochs', '1',
        '--train-num-samples', '16', '--val-num-samples', '8']


def nothing_written(tmp_path):
    return not (tmp_path / 'x').exists() and not (tmp_path / 'data').exists()


@pytest.mark.parametrize('flag', ['--train-split', '--val-split'])
def test_train_refuses_a_misspelt_split_before_any_work(flag, tmp_path):
    # before: 'trian' meant the test split, so the run trained on the split it was scored on
    with pytest.raises(ValueError, match=re.escape(f"{flag} 'trian': unknown split 'trian' for dataset 'triangle'; "
                                                   "expected one of ['train', 'training', 'test', 'validation', 'val']")):
        loop.main([*TINY, flag, 'trian', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path),
                   '--experiment', 'x'])
    assert nothing_written(tmp_path)


def test_validate_refuses_a_misspelt_split_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=re.escape("--split 'tarin': unknown split 'tarin' for dataset 'triangle'")):
        validate.main(['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '--split', 'tarin',
                       '--data-dir', str(tmp_path / 'data'), '-j', '0'])
    assert nothing_written(tmp_path)


def loader_args(tmp_path, *extra):
    args = parse_args([*TINY, '--data-dir', str(tmp_path / 'data'), *extra])
    check_args(args)
    args.distributed, args.world_size, args.rank = False, 1, 0
    return args


@pytest.mark.parametrize('val_split,warned', [('validation', False), ('train', True), ('training', True)])
def test_training_and_validating_on_one_split_is_said(val_split, warned, tmp_path, caplog):
    args = loader_args(tmp_path, '--val-split', val_split)
    model = loop.create_task_model(args, torch.device('cpu'))
    with caplog.at_level(logging.WARNING, logger='train'):
        loop.build_loaders(args, model, torch.device('cpu'))
    said = [r.getMessage() for r in caplog.records if 'are the same split' in r.getMessage()]
    assert said == ([f"--train-split 'train' and --val-split '{val_split}' are the same split: the eval_* figures of "
                     'this run are measured on training data'] if warned else [])


QA_SMALL = ['--model-kwargs', 'patch_size=15', 'embed_dim=32', 'depth=1', 'num_heads=2', 'num_slots=4', 'slot_dim=8',
            'gwl_heads=2', 'bottleneck=8']


@pytest.mark.parametrize('model,dataset,message', [
    ('ait_small_patch5_75', 'triangle',
     "model 'ait_small_patch5_75' takes images and questions (forward(images, questions), question_dim=11), but "
     "dataset 'triangle' gives images only; expected a question-answering dataset (sort-of-clevr) for it"),
    ('ait_tiny_patch32_64', 'sort-of-clevr',
     "model 'ait_tiny_patch32_64' takes images only (forward(images)), but dataset 'sort-of-clevr' gives images "
     'with questions; expected a question-answering model for it'),
])
def test_a_model_that_does_not_take_the_datasets_inputs_is_refused_before_any_work(model, dataset, message, tmp_path):
    kwargs = QA_SMALL if model == 'ait_small_patch5_75' else []
    # as many outputs as the dataset has classes: the inputs are what does not fit
    classes = '2' if dataset == 'triangle' else '10'
    common = ['--model', model, '--dataset', dataset, '--num-classes', classes, '--data-dir', str(tmp_path / 'data')]
    # before: a TypeError deep in the first forward ("forward() missing ... 'questions'"), after the data was made
    with pytest.raises(ValueError, match=re.escape(message)):
        loop.main([*TINY, *common, *kwargs, '--output', str(tmp_path), '--experiment', 'x'])
    assert nothing_written(tmp_path)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate.main([*common, *kwargs, '--num-samples', '8', '-j', '0'])
    assert nothing_written(tmp_path)
