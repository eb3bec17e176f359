"""validate.py and analyze.py on a run's checkpoint: the run's model, weights, data and normalisation.

One tiny run of train.py (one epoch on 128 Triangle images, EMA on) with settings that differ from every
default validate.py and analyze.py could fall back to: --model-kwargs bottleneck=2 beta=4, an odd --mean/--std
and --seed 7. The references are the run's own epoch evaluation (summary.csv) and a model built and loaded
here with torch.load and timm.create_model.
"""
import argparse
import csv
import json
import os

import numpy
import pytest
import timm
import torch
from PIL import Image

import timm_ait  # noqa: F401  (registers the models)
from timm_ait import analyze as analyze_script  # train_scripts/analyze.py's code
from timm_ait.analysis import analyze
from timm_ait.train import validate as validate_script  # train_scripts/validate.py's code

from conftest import REPO, run_script

MODEL = 'ait_tiny_patch32_64'
KWARGS = dict(embed_dim=32, num_heads=2, bottleneck=2, beta=4)
MEAN, STD = (0.9, 0.1, 0.5), (0.1, 2.0, 0.5)
SEED, VAL_SAMPLES = 7, 64


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp('run')
    run_script(os.path.join(REPO, 'train_scripts', 'train.py'),
               '--model', MODEL, '--dataset', 'triangle', '--data-dir', root / 'data', '--workers', 0, '-b', 32,
               '--warmup-epochs', 0, '--train-num-samples', 128, '--val-num-samples', VAL_SAMPLES, '--epochs', 1,
               '--model-ema', '--seed', SEED, '--mean', *MEAN, '--std', *STD,
               '--model-kwargs', *[f'{k}={v}' for k, v in KWARGS.items()],
               '--output', root / 'runs', '--experiment', 'tiny',
               env={**os.environ, 'OMP_NUM_THREADS': '1'})
    folder = root / 'runs' / 'tiny'
    with open(folder / 'summary.csv', newline='') as f:
        summary = list(csv.DictReader(f))[-1]
    return argparse.Namespace(folder=folder, checkpoint=folder / 'last.pth.tar', data=root / 'data', summary=summary)


def validate(*argv):
    return validate_script.main([*map(str, argv), '-j', '0'])


@pytest.mark.parametrize('use_ema', [False, True])
def test_validate_scores_a_checkpoint_as_its_run_evaluated_it(run, use_ema):
    # no --seed, --mean or --std: the run's; a validate.py with its own defaults scores other images
    results = validate('--checkpoint', run.checkpoint, '--data-dir', run.data, '--num-samples', VAL_SAMPLES,
                       *(['--use-ema'] if use_ema else []))
    prefix = 'eval_ema_' if use_ema else 'eval_'
    assert results['dataset'] == 'triangle' and results['seed'] == SEED
    assert results['loss'] == pytest.approx(float(run.summary[prefix + 'loss']), abs=1e-4)
    assert results['top1'] == pytest.approx(float(run.summary[prefix + 'top1']), abs=1e-6)


def test_validate_records_which_weights_it_measured(run, tmp_path):
    saved = torch.load(run.checkpoint, map_location='cpu', weights_only=False)
    plain = validate('--checkpoint', run.checkpoint, '--data-dir', run.data, '--num-samples', 8,
                     '--results-file', tmp_path / 'plain.json')
    ema = validate('--checkpoint', run.checkpoint, '--data-dir', run.data, '--num-samples', 8, '--use-ema')
    assert json.loads((tmp_path / 'plain.json').read_text()) == plain
    for results, use_ema in ((plain, False), (ema, True)):
        assert results['checkpoint'] == str(run.checkpoint) and results['use_ema'] is use_ema
        assert results['checkpoint_digest'] == saved['digest'] and results['epoch'] == saved['epoch'] == 0
    assert plain['weights_digest'].startswith('sha256:') and plain['weights_digest'] != ema['weights_digest']


def test_analyze_builds_the_run_model_with_its_plain_weights(run, tmp_path):
    out = tmp_path / 'analysis'
    analyze_script.main(['--checkpoint', str(run.checkpoint), '-b', '4', '--seed', '3', '--output', str(out)])
    written = json.loads((out / 'analysis.json').read_text())
    # the reference: the run's model built here from its recorded settings, its plain weights loaded by hand
    model = timm.create_model(MODEL, **KWARGS)
    model.load_state_dict(torch.load(run.checkpoint, map_location='cpu', weights_only=False)['state_dict'])
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))  # analyze.py's random images
    expected = analyze(model.eval(), images)
    assert written['model_kwargs'] == KWARGS and written['use_ema'] is False
    for layer, reference in zip(written['layers'], expected):
        assert layer['chance_frequency'] == pytest.approx(2 / (4 * 4))  # k=2 of the pool of 4 images x 4 patches
        assert layer['diversity'] == pytest.approx(reference.diversity, abs=1e-6)
        assert layer['balance_loss'] == pytest.approx(reference.balance_loss, rel=1e-5)
        assert layer['energy']['after_mean'] == pytest.approx(reference.summary()['energy']['after_mean'], rel=1e-5)


def test_analyze_refuses_a_damaged_checkpoint_before_any_work(run, tmp_path, capsys):
    checkpoint = torch.load(run.checkpoint, map_location='cpu', weights_only=False)
    checkpoint['state_dict']['head.bias'][0] += 1  # changed after it was written: its digest no longer matches
    damaged = tmp_path / 'damaged.pth.tar'
    torch.save(checkpoint, damaged)
    with pytest.raises(SystemExit) as exit_info:
        analyze_script.cli(['--checkpoint', str(damaged), '--output', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: checkpoint '{damaged}' is damaged: its contents do not match the digest it was "
                            'saved with (stored sha256:') and error.count('\n') == 1
    assert not (tmp_path / 'out').exists()


def test_a_checkpoint_whose_args_are_a_dict_validates_as_the_run(run, tmp_path):
    checkpoint = torch.load(run.checkpoint, map_location='cpu', weights_only=False)
    checkpoint['args'] = vars(checkpoint.pop('args'))  # as other tools save the training args
    del checkpoint['digest']
    torch.save(checkpoint, tmp_path / 'dict_args.pth.tar')
    results = validate('--checkpoint', tmp_path / 'dict_args.pth.tar', '--data-dir', run.data,
                       '--num-samples', VAL_SAMPLES)
    assert results['loss'] == pytest.approx(float(run.summary['eval_loss']), abs=1e-4)


def make_image_folder(root, seed=0):
    """A two-class image folder (dark and bright 64x64 noise), 4 images a class in each of train and val."""
    generator = torch.Generator().manual_seed(seed)
    for split in ('train', 'val'):
        for label, name in enumerate(('dark', 'bright')):
            os.makedirs(root / split / name)
            for i in range(4):
                pixels = torch.rand(64, 64, 3, generator=generator) * (0.3 + 0.6 * label)
                Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(root / split / name / f'{i}.png')


def test_validate_without_dataset_evaluates_the_image_folder_its_run_trained_on(tmp_path):
    folder = tmp_path / 'pictures'
    make_image_folder(folder)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=2, **KWARGS).eval()
    args = argparse.Namespace(model=MODEL, model_kwargs=KWARGS, num_classes=2, img_size=None, dataset='folder',
                              data_dir=str(folder), train_split='train', val_split='val', seed=SEED, mean=MEAN,
                              std=STD, interpolation='', crop_pct=1.0)
    torch.save(dict(state_dict=model.state_dict(), args=args, epoch=0), tmp_path / 'last.pth.tar')
    before = sorted(p.relative_to(folder) for p in folder.rglob('*'))

    results = validate('--checkpoint', tmp_path / 'last.pth.tar')  # no --dataset, --data-dir or --split
    assert (results['dataset'], results['split'], results['num_samples']) == ('folder', 'val', 8)
    assert sorted(p.relative_to(folder) for p in folder.rglob('*')) == before  # no Triangle cache written there
    # a loop that knows image folders only: each PNG, its class folder's label, the run's normalisation
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    losses = []
    with torch.no_grad():
        for label, name in enumerate(('bright', 'dark')):  # the class folders in sorted order
            for path in sorted((folder / 'val' / name).iterdir()):
                pixels = torch.tensor(numpy.array(Image.open(path).convert('RGB')), dtype=torch.float32)
                x = (pixels.permute(2, 0, 1) / 255 - mean) / std
                losses.append(torch.nn.functional.cross_entropy(model(x[None]), torch.tensor([label])))
    assert results['loss'] == pytest.approx(torch.stack(losses).mean().item(), abs=1e-4)


def test_pretrained_weights_offline_fail_in_one_line_naming_the_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    for script, extra in (('validate.py', ['--dataset', 'triangle']), ('analyze.py', []),
                          ('train.py', ['--dataset', 'triangle', '--output', tmp_path / 'runs'])):
        proc = run_script(os.path.join(REPO, 'train_scripts', script), '--model', MODEL, '--pretrained', *extra,
                          '--data-dir', tmp_path / 'data', check=False, env=env)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot load the pretrained weights of '{MODEL}' from Hub repo ") and \
            'Download them once with network access' in last, proc.stderr
        assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'data').exists()
    assert not any((tmp_path / 'runs').iterdir())  # train.py let go of its run folder


def test_a_full_disk_while_writing_results_is_one_line_naming_the_file(run, tmp_path, capsys):
    # /dev/full: every write to it fails with ENOSPC, as on a full disk
    with pytest.raises(SystemExit) as exit_info:
        validate_script.cli(['--checkpoint', str(run.checkpoint), '--data-dir', str(run.data), '--num-samples', '8',
                             '-j', '0', '--results-file', '/dev/full'])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: [Errno 28] cannot write --results-file '/dev/full': No space left "
                                       'on device\n')
    out = tmp_path / 'analysis'
    out.mkdir()
    (out / 'analysis.json').symlink_to('/dev/full')
    with pytest.raises(SystemExit) as exit_info:
        analyze_script.cli(['--checkpoint', str(run.checkpoint), '-b', '2', '--output', str(out)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: [Errno 28] cannot write '{out / 'analysis.json'}': No space "
                                            'left on device\n')


@pytest.mark.parametrize('argv,message', [
    (['--model', 'hmixer_symbreak_s4_32'], 'HamMixer has no Global Workspace Layer to analyse: expected an AiT'),
    (['--model', MODEL, '--model-kwargs', 'gwl=False'], 'AssociativeTransformer has no Global Workspace Layer'),
    (['--model', MODEL, '--model-kwargs', 'no_such_setting=1'], "unexpected keyword argument 'no_such_setting'"),
])
def test_analyze_refuses_what_it_cannot_analyse_in_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        analyze_script.cli([*argv, '--output', str(tmp_path / 'out')])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith('error: ') and message in error and error.count('\n') == 1
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('setting,message', [
    ('hopfield_steps=2.5', 'hopfield_steps must be >= 1 (an integer), got 2.5'),
    ('depth=0', 'depth must be >= 1 (an integer), got 0'),
])
def test_validate_refuses_a_bad_model_setting_in_one_line(tmp_path, capsys, setting, message):
    with pytest.raises(SystemExit) as exit_info:
        validate_script.cli(['--model', MODEL, '--model-kwargs', setting, '--dataset', 'triangle',
                             '--data-dir', str(tmp_path / 'data')])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f'error: {message}\n'
    assert not (tmp_path / 'data').exists()


def _with_read_scaled(run, path, factor):
    """The run's checkpoint with every Hopfield read's up-projection (Y = M W + b) multiplied by ``factor``."""
    state = torch.load(run.checkpoint, map_location='cpu', weights_only=False)
    for key in list(state['state_dict']):
        if '.mlp.read.up.' in key:
            state['state_dict'][key] = state['state_dict'][key] * factor
    state.pop('digest')
    torch.save(state, path)
    return path


def test_memory_swaps_change_a_model_that_reads_its_memory_and_not_one_that_cannot(run, tmp_path):
    """validate.py --memory-swaps. With the read's up-projection zeroed the read returns 0 whatever the memory
    holds, so every swap must score exactly as the stored memory; with it scaled up the read dominates the
    block's output, so a swapped memory must change the loss."""
    common = ['--data-dir', run.data, '--num-samples', VAL_SAMPLES, '--memory-swaps']
    blind = validate('--checkpoint', _with_read_scaled(run, tmp_path / 'blind.pth.tar', 0.0), *common)
    assert {'rotated_memory_loss', 'random_orthogonal_memory_loss', 'collapsed_memory_loss',
            'other_layer_memory_loss'} <= blind.keys()
    for swap in ('rotated', 'random_orthogonal', 'collapsed', 'other_layer'):
        assert blind[f'{swap}_memory_loss'] == blind['loss'] and blind[f'{swap}_memory_top1'] == blind['top1']
    loud = validate('--checkpoint', _with_read_scaled(run, tmp_path / 'loud.pth.tar', 50.0), *common, 'collapsed',
                    'rotated')
    assert 'random_orthogonal_memory_loss' not in loud
    for swap in ('collapsed', 'rotated'):
        assert loud[f'{swap}_memory_loss'] != loud['loss'], (swap, loud)


def test_train_logs_each_layers_memory_rank_and_mean_abs_cosine(run):
    """summary.csv carries, per GWL, the memory's participation rank (between 1 and the slot count) and its mean
    |cosine| between slots (in [0, 1]), recomputed here from the run's stored memory by first principles."""
    state = torch.load(run.checkpoint, map_location='cpu', weights_only=False)['state_dict']
    for i in range(2):
        memory = state[f'blocks.{i}.mlp.memory.memory'].double()
        s = torch.linalg.svdvals(memory) ** 2
        rank = float(s.sum() ** 2 / (s ** 2).sum())
        unit = torch.nn.functional.normalize(memory, dim=-1)
        cos = (unit @ unit.T).abs()
        n = memory.shape[0]
        abs_cos = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
        assert float(run.summary[f'train_memory_rank_blocks{i}']) == pytest.approx(rank, rel=1e-4)
        assert float(run.summary[f'train_memory_abs_cos_blocks{i}']) == pytest.approx(abs_cos, abs=1e-5)
