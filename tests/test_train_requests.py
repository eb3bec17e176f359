"""Requests that train.py and validate.py refuse before any work, and what they make visible (no training)."""
import logging
import os
import re

import pytest
import torch

from timm_ait.train import loop, validate
from timm_ait.train.args import check_args, eval_metrics, parse_args
from timm_ait.train.evaluate import metric_names

TINY = ['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '-b', '8', '--workers', '0', '--epochs', '1',
        '--train-num-samples', '16', '--val-num-samples', '8']


def nothing_written(tmp_path):
    return not (tmp_path / 'x').exists() and not (tmp_path / 'data').exists()


@pytest.mark.parametrize('flag', ['--train-split', '--val-split'])
def test_train_refuses_a_misspelt_split_before_any_work(flag, tmp_path):
    # before: 'trian' meant the test split, so the run trained on the split it was scored on
    message = (f"{flag} 'trian': unknown split 'trian' for dataset 'triangle'; expected one of ['train', 'training', "
               "'test', 'validation', 'val']")
    with pytest.raises(ValueError, match=re.escape(message)):
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


@pytest.mark.parametrize('flags,message', [
    # before: a KeyError after a full epoch, with no checkpoint
    (['--eval-metric', 'top_1'], "--eval-metric 'top_1' is not a metric of this run; expected one of ['loss', 'top1', "
                                 "'top5']"),
    (['--eval-metric', 'ema_top1'], "--eval-metric 'ema_top1' is not a metric of this run; expected one of ['loss', "
                                    "'top1', 'top5']"),
    (['--log-interval', '0'], '--log-interval must be >= 1, got 0'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist must be >= 1, got 0'),
    (['--profile', 'prof.json', '--torchcompile', 'inductor'],
     '--profile charges time to modules through hooks on their eager forward; it does not combine with --torchcompile'),
])
def test_flags_that_would_fail_later_are_refused_with_one_line(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_args(parse_args([*TINY, *flags]))


def test_a_profile_in_a_folder_that_does_not_exist_is_refused_before_any_work(tmp_path):
    # before: the whole first epoch trained, then the profile failed to be written
    path = tmp_path / 'no' / 'such' / 'prof.json'
    with pytest.raises(FileNotFoundError, match=re.escape(f"--profile {str(path)!r}: the folder")):
        check_args(parse_args([*TINY, '--profile', str(path)]))
    with pytest.raises(ValueError, match='is a folder; expected the path of the JSON file to write'):
        check_args(parse_args([*TINY, '--profile', str(tmp_path)]))


def test_eval_metrics_are_the_evaluations_names():
    for flags, relational in ((TINY, False), ([*TINY, '--dataset', 'sort-of-clevr'], True)):
        args = parse_args([*flags, '--model-ema'])
        names = metric_names(relational)
        assert eval_metrics(args) == names + [f'ema_{n}' for n in names]
        for name in eval_metrics(args):
            args.eval_metric = name
            check_args(args)


def config_error(tmp_path, capsys, text):
    path = tmp_path / 'c.yaml'
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        parse_args(['-c', str(path)])
    assert exit.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize('text,message', [
    ('epochs: 1.5\n', 'epochs: expected an integer, got 1.5 (float)'),
    ('epochs: yes\n', 'epochs: expected an integer, got True (bool; YAML reads yes/no/on/off/true/false as booleans)'),
    ('lr: [0.1, 0.2]\n', 'lr: expected a number, got [0.1, 0.2] (list)'),
    ('mean: 0.5\n', 'mean: expected a list of numbers (at least one), got 0.5 (float)'),
    ('mean: [0.5, x]\n', "mean: expected a list of numbers (at least one), got [0.5, 'x'] (list)"),
    ('model_ema: 1\n', 'model_ema: expected true or false, got 1 (int)'),
    ('clip_mode: foo\n', "clip_mode: expected one of ['norm', 'value', 'agc'], got 'foo' (str)"),
    ('model: 3\n', 'model: expected a string, got 3 (int)'),
    ('model_kwargs: [gwl]\n', "model_kwargs: expected a mapping of model keyword names to values, got ['gwl'] (list)"),
])
def test_a_config_value_of_the_wrong_type_is_refused_naming_the_key(text, message, tmp_path, capsys):
    line = config_error(tmp_path, capsys, text)
    assert line.endswith(f"error: config '{tmp_path / 'c.yaml'}': {message}"), line


def test_config_values_are_what_the_command_line_would_give(tmp_path):
    path = tmp_path / 'c.yaml'
    # YAML reads 1e-3 (no dot) as a string and 1 as an int: the flag's type makes both what argparse would
    path.write_text('lr: 1e-3\nweight_decay: 0\nepochs: "7"\nmean: [0, 0.5, 1]\ntorchcompile: null\n'
                    'model_kwargs: {gwl: false}\nno_aug: true\n')
    args = parse_args(['-c', str(path)])
    assert (args.lr, args.weight_decay, args.epochs, args.mean) == (1e-3, 0.0, 7, [0.0, 0.5, 1.0])
    assert type(args.weight_decay) is float and args.torchcompile is None and args.no_aug is True
    assert args.model_kwargs == {'gwl': False}


def test_an_unknown_clip_mode_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse_args([*TINY, '--clip-mode', 'foo'])
    assert "argument --clip-mode: invalid choice: 'foo'" in capsys.readouterr().err


def test_a_profile_that_cannot_be_written_does_not_cost_the_run(tmp_path, caplog, monkeypatch):
    """The profile is written after the epoch's steps; a failure to write it is a warning, and the epoch is
    evaluated and saved as without --profile."""
    from timm_ait.train import loop
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith('prof.json'):
            raise OSError(28, 'No space left on device')
        return real_replace(src, dst)

    monkeypatch.setattr(loop.os, 'replace', failing_replace)
    out = tmp_path / 'out'
    loop.main([*TINY, '--data-dir', str(tmp_path / 'data'), '--output', str(out), '--experiment', 'run',
               '--epochs', '1', '--profile', str(tmp_path / 'prof.json')])
    assert 'could not write' in caplog.text and not (tmp_path / 'prof.json').exists()
    assert not (tmp_path / 'prof.json.partial').exists()
    assert (out / 'run' / 'last.pth.tar').exists() and (out / 'run' / 'summary.csv').exists()
