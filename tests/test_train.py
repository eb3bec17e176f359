"""train.py and validate.py end to end on small generated data (CPU)."""
import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from timm_ait import train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, 'train_scripts', 'train.py')
VALIDATE = os.path.join(REPO, 'train_scripts', 'validate.py')
TINY_KWARGS = ['embed_dim=32', 'num_heads=2', 'num_slots=6', 'slot_dim=8', 'gwl_heads=2', 'bottleneck=16',
               'patch_size=16']
TRIANGLE = ['--model', 'ait_small_patch32_64', '--dataset', 'triangle', '--train-num-samples', '96',
            '--val-num-samples', '40', '-b', '16', '--workers', '0', '--warmup-epochs', '0', '--lr', '1e-3',
            '--log-interval', '2', '--model-kwargs', *TINY_KWARGS]


def run(script, *args, env=None, check=True, **kwargs):
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    return proc


def script(name):
    """The code of train_scripts/NAME.py, to call its main() in this process (no interpreter start-up)."""
    from timm_ait.train import validate
    from timm_ait import publish
    return {'train': train, 'validate': validate, 'push_to_hub': publish}[name]


def read_summary(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def state_of(path):
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Two epochs of a tiny AiT on generated Triangle data."""
    root = tmp_path_factory.mktemp('train')
    data = str(root / 'data')
    run(TRAIN, *TRIANGLE, '--epochs', '2', '--data-dir', data, '--output', str(root), '--experiment', 'run')
    return root, data


def test_training_writes_summary_and_checkpoints(trained):
    root, _ = trained
    run_dir = root / 'run'
    for name in ('summary.csv', 'last.pth.tar', 'model_best.pth.tar', 'args.yaml'):
        assert (run_dir / name).is_file(), name
    rows = read_summary(run_dir / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['0', '1']
    for column in ('train_loss', 'train_balance_loss', 'eval_top1', 'eval_top5', 'lr'):
        assert column in rows[0]
    assert float(rows[0]['train_balance_loss']) > 0  # the GWL reported its balance loss
    state = state_of(run_dir / 'last.pth.tar')
    assert any(k.endswith('memory.memory') for k in state)
    # the logged slot similarity is that of the memory the epoch ended with: the mean over layers of the
    # mean cosine between distinct slots, computed here from the checkpoint in float64
    per_layer = []
    for k, memory in state.items():
        if k.endswith('memory.memory'):
            m = memory.double()
            norms = m.norm(dim=1)
            pairs = [(m[i] @ m[j] / (norms[i] * norms[j])).item()
                     for i in range(len(m)) for j in range(len(m)) if i != j]
            per_layer.append(sum(pairs) / len(pairs))
    assert float(rows[-1]['train_memory_slot_cos']) == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-5)


def test_validate_reproduces_final_eval_at_any_batch_size(trained, tmp_path):
    root, data = trained
    final_top1 = float(read_summary(root / 'run' / 'summary.csv')[-1]['eval_top1'])
    results = []
    for batch in ('1', '40'):
        out = tmp_path / f'b{batch}.json'
        run(VALIDATE, '--model', 'ait_small_patch32_64', '--checkpoint', str(root / 'run' / 'last.pth.tar'),
            '--dataset', 'triangle', '--data-dir', data, '--num-samples', '40', '-b', batch, '-j', '0',
            '--results-file', str(out))
        results.append(__import__('json').loads(out.read_text()))
    assert results[0]['top1'] == pytest.approx(final_top1, abs=1e-3)
    assert results[1]['top1'] == results[0]['top1']


def test_resume_continues_exactly_like_the_uninterrupted_run(trained):
    root, data = trained
    run(TRAIN, *TRIANGLE, '--epochs', '2', '--data-dir', data, '--output', str(root), '--experiment', 'resumed',
        '--resume', str(root / 'run' / 'checkpoint-0.pth.tar'))
    a, b = state_of(root / 'run' / 'last.pth.tar'), state_of(root / 'resumed' / 'last.pth.tar')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    rows = read_summary(root / 'resumed' / 'summary.csv')
    assert [r['epoch'] for r in rows] == ['1']


def test_fresh_train_data_trains_on_new_images_and_resumes_exactly(trained):
    root, data = trained
    common = [*TRIANGLE, '--fresh-train-data', '--data-dir', data, '--output', str(root)]
    run(TRAIN, *common, '--epochs', '2', '--experiment', 'fresh')
    run(TRAIN, *common, '--epochs', '2', '--experiment', 'fresh-resumed',
        '--resume', str(root / 'fresh' / 'checkpoint-0.pth.tar'))
    fixed, fresh = state_of(root / 'run' / 'last.pth.tar'), state_of(root / 'fresh' / 'last.pth.tar')
    resumed = state_of(root / 'fresh-resumed' / 'last.pth.tar')
    for k in fresh:
        torch.testing.assert_close(resumed[k], fresh[k], rtol=0, atol=0, msg=k)
    # epoch 0 is the cached set, as in the run without the flag; epoch 1 is another set
    epoch0 = state_of(root / 'run' / 'checkpoint-0.pth.tar')
    for k, v in state_of(root / 'fresh' / 'checkpoint-0.pth.tar').items():
        torch.testing.assert_close(v, epoch0[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(fresh[k], fixed[k]) for k in fresh)


def test_torchrun_two_cpu_ranks_agree(tmp_path):
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', TRAIN, *TRIANGLE,
         '--epochs', '1', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'ddp'],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert re.search(r'All 2 ranks end with the same weights and memory \(sha256 [0-9a-f]{64}\)', log), log
    assert (tmp_path / 'ddp' / 'last.pth.tar').is_file()


@pytest.mark.parametrize('args,message', [
    (['--model', 'ait_smal'], "unknown model 'ait_smal'"),
    (['--dataset', 'mnist'], "unknown dataset 'mnist'"),
    (['--dataset', 'torch/cifar10', '--data-dir', '/nonexistent/cifar'], "data directory '/nonexistent/cifar'"),
    (['--resume', '/nonexistent/last.pth.tar'], "--resume '/nonexistent/last.pth.tar' does not exist"),
])
def test_bad_requests_fail_before_any_work(args, message, tmp_path):
    proc = run(TRAIN, *args, '--output', str(tmp_path), '--experiment', 'x', check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('args,message', [
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),  # not a bare AssertionError from timm's scheduler
    (['-b', '0'], '-b/--batch-size must be >= 1, got 0'),
    (['--dist-timeout', '0'], '--dist-timeout must be a number of seconds > 0, got 0.0'),
    (['--dataset', 'sort-of-clevr', '--fresh-train-data'],
     "--fresh-train-data: a new training set each epoch is drawn for ['triangle'] only, not for --dataset "
     "'sort-of-clevr'"),
])
def test_bad_numbers_are_named(args, message):
    train = script('train')
    with pytest.raises(ValueError, match=re.escape(message)):
        train.check_args(train.parse_args(args))


def test_labels_that_do_not_fit_the_classifier_fail_before_any_work(tmp_path):
    proc = run(TRAIN, '--num-classes', '10', '--train-num-samples', '8', '--val-num-samples', '8',
               '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'x',
               '--model-kwargs', *TINY_KWARGS, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "dataset 'triangle' has 2 classes but the model has 10 outputs (num_classes=10); pass --num-classes 2" \
        in proc.stderr
    assert not (tmp_path / 'x').exists()


def test_unreadable_and_mismatched_resume_files(trained, tmp_path):
    root, data = trained
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'not a checkpoint')
    proc = run(TRAIN, *TRIANGLE, '--resume', str(garbage), '--output', str(tmp_path), '--experiment', 'g',
               check=False)
    assert proc.returncode == 2 and 'cannot be read' in proc.stderr, proc.stderr
    # a checkpoint of a deeper variant: refused, naming the setting, before any work
    proc = run(TRAIN, *TRIANGLE, '--model-kwargs', *TINY_KWARGS, 'depth=3', '--data-dir', data,
               '--resume', str(root / 'run' / 'last.pth.tar'), '--output', str(tmp_path), '--experiment', 'm',
               check=False)
    assert proc.returncode == 2 and 'model setting depth' in proc.stderr and '--model-kwargs depth=3' in proc.stderr, \
        proc.stderr
    assert not (tmp_path / 'm').exists()
    # a weights-only file has no optimizer state to resume
    bare = tmp_path / 'bare.pth'
    torch.save(state_of(root / 'run' / 'last.pth.tar'), bare)
    with pytest.raises(ValueError, match='holds no optimizer state'):
        script('train').main([*TRIANGLE, '--resume', str(bare), '--output', str(tmp_path), '--experiment', 'b'])


def test_existing_checkpoints_are_never_overwritten(trained):
    root, data = trained
    last = root / 'run' / 'last.pth.tar'
    before = last.read_bytes()
    proc = run(TRAIN, *TRIANGLE, '--epochs', '1', '--data-dir', data, '--output', str(root), '--experiment', 'run',
               check=False)
    assert proc.returncode == 2 and 'already holds checkpoints' in proc.stderr, proc.stderr
    assert last.read_bytes() == before


def test_yaml_config_and_unknown_keys(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('model: ait_small\nlearning_rate: 0.1\n')
    proc = run(TRAIN, '-c', str(bad), check=False)
    assert proc.returncode == 2 and "unknown keys ['learning_rate']" in proc.stderr

    def parse_error(text):
        bad.write_text(text)
        with pytest.raises(SystemExit) as exit:
            script('train').parse_args(['-c', str(bad)])
        assert exit.value.code == 2
        return capsys.readouterr().err

    # malformed: one clear line (argparse's usage and error), no traceback
    assert f"config '{bad}' is not valid YAML (line 3, column 1" in parse_error('model: ait_small\nlr: [0.1\n')
    assert 'must be a mapping of flag names to values, got a list' in parse_error('- model\n- lr\n')


CONFIGS = os.path.join(REPO, 'train_scripts', 'configs')


@pytest.mark.parametrize('config', sorted(os.path.relpath(os.path.join(folder, name), CONFIGS)
                                          for folder, _, names in os.walk(CONFIGS) for name in names))
def test_shipped_configs_parse(config):
    args = train.parse_args(['-c', os.path.join(REPO, 'train_scripts', 'configs', config)])
    train.check_args(args)


def test_img_size_builds_a_fixed_size_model_for_that_size():
    args = train.parse_args(['--model', 'ait_small_patch32_64', '--img-size', '32', '--model-kwargs', *TINY_KWARGS])
    model = train.create_task_model(args, torch.device('cpu'))
    assert model.patch_embed.img_size == (32, 32)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_model_kwargs_bottleneck_none_builds_the_dense_ablation():
    args = train.parse_args(['--model', 'ait_small_patch32_64', '--model-kwargs', *TINY_KWARGS, 'bottleneck=none'])
    assert args.model_kwargs['bottleneck'] == 'none'
    model = train.create_task_model(args, torch.device('cpu'))
    assert all(blk.mlp.write_attn.bottleneck is None for blk in model.blocks)


def test_model_kwargs_none_is_refused_naming_what_it_would_build():
    # timm.create_model drops None arguments: the run would record None and build the default
    args = train.parse_args(['--model', 'ait_small_patch32_64', '--model-kwargs', *TINY_KWARGS, 'bottleneck=None'])
    with pytest.raises(ValueError, match="--model-kwargs bottleneck=None.*default.*bottleneck=none"):
        train.check_args(args)


def test_short_sort_of_clevr_run_learns_non_relational_questions(tmp_path):
    """Two epochs of a small question-conditioned AiT on 2,000 generated Sort-of-CLEVR images.

    Chance on the non-relational questions is 50% (each has two possible answers; 500 held-out
    items, so one standard deviation is 2.2 points). The run reaches about 76% here.
    The model is ait_small_patch5_75's architecture, narrowed and with patch 15 (26 tokens) to fit
    a CPU test; weight_init='jax' (Xavier, about 4x timm's std 0.02 at width 64, close to PyTorch's
    default init that the authors' code gets) because with timm's init the attention between the
    question token and the patches stayed near uniform: 54% after 1,000 steps against 75%.
    """
    run(TRAIN, '--model', 'ait_small_patch5_75', '--dataset', 'sort-of-clevr',
        '--sort-of-clevr-questions', 'non_relational', '--train-num-samples', '2000', '--val-num-samples', '50',
        '-b', '64', '-j', '0', '--epochs', '2', '--warmup-epochs', '0', '--lr', '1e-3', '--clip-grad', '1.0',
        '--sched-on-updates', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'soc',
        '--model-kwargs', 'patch_size=15', 'embed_dim=64', 'depth=2', 'num_heads=2', 'num_slots=16', 'slot_dim=16',
        'gwl_heads=4', 'bottleneck=64', 'weight_init=jax')
    rows = read_summary(tmp_path / 'soc' / 'summary.csv')
    first, last = (float(r['eval_non_relational_top1']) for r in (rows[0], rows[-1]))
    assert last >= 65.0 and last > first, rows
    # relational accuracy is reported beside it (these questions were not trained on)
    assert 'eval_relational_top1' in rows[-1]
    # validate.py asks the questions of training's eval, or one kind of them
    results = {}
    for questions in ('all', 'non_relational'):
        out = tmp_path / f'{questions}.json'
        run(VALIDATE, '--model', 'ait_small_patch5_75', '--checkpoint', str(tmp_path / 'soc' / 'last.pth.tar'),
            '--dataset', 'sort-of-clevr', '--data-dir', str(tmp_path / 'data'), '--num-samples', '50', '-j', '0',
            '--sort-of-clevr-questions', questions, '--results-file', str(out))
        results[questions] = __import__('json').loads(out.read_text())
        assert results[questions]['questions'] == questions and results[questions]['seed'] == 42
    final = {k: float(rows[-1][f'eval_{k}']) for k in ('top1', 'relational_top1', 'non_relational_top1')}
    assert {k: results['all'][k] for k in final} == pytest.approx(final, abs=1e-3)
    only = results['non_relational']
    assert only['top1'] == only['non_relational_top1'] == pytest.approx(final['non_relational_top1'], abs=1e-3)
    assert 'relational_top1' not in only
    # and top-1 of each kind of question: those of one kind average, weighted by their counts, to its figure
    from timm_ait.data.sort_of_clevr import QUESTION_TYPES, SortOfClevr
    test_set = SortOfClevr(root=str(tmp_path / 'data'), split='test', num_images=50, seed=42, progress=False)
    counts = np.bincount(test_set.question_type, minlength=len(QUESTION_TYPES))
    for kind, types in (('non_relational', QUESTION_TYPES[:3]), ('relational', QUESTION_TYPES[3:])):
        weights = counts[:3] if kind == 'non_relational' else counts[3:]
        mean = sum(w * results['all'][f'{t}_top1'] for w, t in zip(weights, types)) / weights.sum()
        assert mean == pytest.approx(results['all'][f'{kind}_top1'], abs=1e-3)
    assert set(only) >= {f'{t}_top1' for t in QUESTION_TYPES[:3]} and 'count_top1' not in only


def test_demo_quick_trains_and_validates(tmp_path):
    """The README's main job, in its one-minute form: train, validate at batch size 1, report."""
    proc = run(os.path.join(REPO, 'train_scripts', 'demo.py'), '--quick', '--output', str(tmp_path / 'out'),
               '--data-dir', str(tmp_path / 'data'))
    (run_dir,) = (tmp_path / 'out').iterdir()
    results = __import__('json').loads((run_dir / 'validate.json').read_text())
    assert results['model'] == 'ait_tiny_patch32_64' and results['batch_size'] == 1
    assert f"reached {results['top1']:.2f}% test accuracy" in proc.stdout
    assert float(read_summary(run_dir / 'summary.csv')[-1]['eval_top1']) == pytest.approx(results['top1'], abs=1e-3)


def copy_run(src, dst):
    """A copy of a run folder (its files are hard links between each other; copy the bytes)."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_training_stops_at_the_first_non_finite_loss_and_keeps_the_checkpoints(trained, tmp_path):
    root, data = trained
    run_dir = copy_run(root / 'run', tmp_path / 'run')
    before = {f.name: f.read_bytes() for f in run_dir.iterdir()}
    # a learning rate that makes the next epoch diverge (a fresh optimizer may take new settings)
    proc = run(TRAIN, *TRIANGLE, '--resume', str(run_dir / 'last.pth.tar'), '--epochs', '4', '--no-resume-opt',
               '--opt', 'sgd', '--lr', '1e5', '--data-dir', data, check=False)
    assert proc.returncode == 1, proc.stderr
    assert re.search(r'error: the training loss is (nan|inf) at epoch 2, batch \d+/6', proc.stderr), proc.stderr
    assert 'Traceback' not in proc.stderr
    after = {f.name: f.read_bytes() for f in run_dir.iterdir()}
    for name in ('last.pth.tar', 'model_best.pth.tar', 'checkpoint-1.pth.tar', 'summary.csv'):
        assert after[name] == before[name], name
    assert not any(name.startswith('checkpoint-2') for name in after)


def test_a_training_set_smaller_than_a_batch_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            'the training set has 8 samples (8 per process), fewer than one batch (-b 16): an epoch would have no '
            'step; pass -b 8 or less')):
        script('train').main([*TRIANGLE, '--train-num-samples', '8', '--data-dir', str(tmp_path / 'data'),
                              '--output', str(tmp_path), '--experiment', 'x'])
    assert not (tmp_path / 'x').exists()


def test_a_run_whose_first_checkpoint_write_was_killed_starts_again(tmp_path):
    # what kill -9 during the first save leaves: the epoch's summary row and a partial tmp.pth.tar
    run_dir = tmp_path / 'x'
    run_dir.mkdir()
    (run_dir / 'tmp.pth.tar').write_bytes(b'')
    (run_dir / 'summary.csv').write_text('epoch,train_loss,eval_top1\n0,0.7,51.0\n')
    run(TRAIN, *TRIANGLE, '--epochs', '1', '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path),
        '--experiment', 'x')
    assert [r['epoch'] for r in read_summary(run_dir / 'summary.csv')] == ['0']
    assert (run_dir / 'last.pth.tar').is_file() and not (run_dir / 'tmp.pth.tar').exists()


def test_resume_after_a_kill_between_summary_and_checkpoint_records_each_epoch_once(trained, tmp_path):
    root, data = trained
    run_dir = copy_run(root / 'run', tmp_path / 'run')
    rows = read_summary(run_dir / 'summary.csv')
    with open(run_dir / 'summary.csv', 'a', newline='') as f:  # epoch 2's row, written before its checkpoint
        csv.DictWriter(f, fieldnames=list(rows[0])).writerow({**rows[-1], 'epoch': '2'})
    run(TRAIN, *TRIANGLE, '--resume', str(run_dir / 'last.pth.tar'), '--epochs', '3', '--data-dir', data)
    assert [r['epoch'] for r in read_summary(run_dir / 'summary.csv')] == ['0', '1', '2']
    assert [r['eval_top1'] for r in read_summary(run_dir / 'summary.csv')[:2]] == [r['eval_top1'] for r in rows]
    from timm_ait.hub_card import read_summary as card_summary
    assert card_summary(str(run_dir / 'summary.csv'))['num_epochs'] == 3


def test_resume_rebuilds_the_model_and_settings_from_the_checkpoint(trained, tmp_path):
    root, data = trained
    # nothing but --resume: the model kwargs, lr, batch size, ... come from the checkpoint
    run(TRAIN, '--resume', str(root / 'run' / 'checkpoint-0.pth.tar'), '--data-dir', data, '--workers', '0',
        '--output', str(tmp_path), '--experiment', 'bare')
    a, b = state_of(root / 'run' / 'last.pth.tar'), state_of(tmp_path / 'bare' / 'last.pth.tar')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    import yaml
    saved = yaml.safe_load((tmp_path / 'bare' / 'args.yaml').read_text())
    assert saved['model_kwargs'] == dict(k.split('=') for k in TINY_KWARGS) | {
        k: int(v) for k, v in (k.split('=') for k in TINY_KWARGS) if v.isdigit()}
    assert saved['lr'] == 1e-3 and saved['batch_size'] == 16 and saved['epochs'] == 2
    # a command line that contradicts the run's model is refused, naming the setting
    common = ['--resume', str(root / 'run' / 'checkpoint-0.pth.tar'), '--data-dir', data, '--output', str(tmp_path),
              '--experiment', 'other']
    with pytest.raises(ValueError, match=r'model setting beta: .* was trained without beta .*--model-kwargs beta=4.0'):
        script('train').main([*common, '--model-kwargs', 'beta=4.0'])
    with pytest.raises(ValueError, match=r'model setting model: .*ait_small_patch32_64.*ait_base_patch32_64'):
        script('train').main([*common, '--model', 'ait_base_patch32_64'])
    assert not (tmp_path / 'other').exists()


def test_a_finished_run_folder_is_never_rewritten_by_a_resume(trained):
    root, data = trained
    run_dir = root / 'run'
    before = {f.name: f.read_bytes() for f in run_dir.iterdir()}
    train = script('train')
    # an older checkpoint, resumed into its own folder, would overwrite the later ones
    with pytest.raises(FileExistsError, match='is epoch 0, but .* holds checkpoints up to epoch 1'):
        train.main([*TRIANGLE, '--resume', str(run_dir / 'checkpoint-0.pth.tar'), '--epochs', '2', '--data-dir', data])
    # a setting the resumed optimizer state would silently override is refused, not recorded
    with pytest.raises(ValueError, match=r'optimizer setting lr: .*--lr 0.001.*--lr 0.05.*--no-resume-opt'):
        train.main([*TRIANGLE, '--resume', str(run_dir / 'last.pth.tar'), '--epochs', '3', '--lr', '0.05',
                    '--data-dir', data])
    with pytest.raises(ValueError, match='has finished epoch 1 of --epochs 2: nothing is left to train'):
        train.main([*TRIANGLE, '--resume', str(run_dir / 'last.pth.tar'), '--epochs', '2', '--data-dir', data])
    assert {f.name: f.read_bytes() for f in run_dir.iterdir()} == before


def flip_bytes(path, count=4):
    """Flip ``count`` bytes in the middle of the largest tensor stored in a torch checkpoint."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_everywhere(trained, tmp_path):
    root, data = trained
    damaged = tmp_path / 'damaged.pth.tar'
    damaged.write_bytes((root / 'run' / 'last.pth.tar').read_bytes())
    flip_bytes(damaged)
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        torch.load(damaged, weights_only=True)  # torch itself notices nothing
    message = re.escape(f"checkpoint '{damaged}' is damaged: its contents do not match the digest it was saved with")
    with pytest.raises(ValueError, match=message):
        script('train').main([*TRIANGLE, '--resume', str(damaged), '--epochs', '3', '--data-dir', data,
                              '--output', str(tmp_path), '--experiment', 'r'])
    assert not (tmp_path / 'r').exists()
    with pytest.raises(ValueError, match=message):
        script('validate').main(['--model', 'ait_small_patch32_64', '--checkpoint', str(damaged), '--data-dir', data,
                                 '--num-samples', '8', '-j', '0'])
    with pytest.raises(ValueError, match=message):
        script('push_to_hub').main([str(damaged), '--local-dir', str(tmp_path / 'hub')])
    assert not (tmp_path / 'hub').exists()
    # the undamaged original loads
    assert script('validate').main(['--model', 'ait_small_patch32_64', '--checkpoint', str(root / 'run' / 'last.pth.tar'),
                                    '--data-dir', data, '--num-samples', '8', '-j', '0'])['num_samples'] == 8
    import timm
    with pytest.raises(ValueError, match='is damaged'):  # through the model's checkpoint_filter_fn
        timm.create_model('ait_small_patch32_64', pretrained=True, pretrained_cfg_overlay=dict(file=str(damaged)),
                          **{k: int(v) for k, v in (kv.split('=') for kv in TINY_KWARGS)})


def test_validate_keeps_the_checkpoints_model_settings(trained, tmp_path):
    root, data = trained
    checkpoint = str(root / 'run' / 'last.pth.tar')
    common = ['--model', 'ait_small_patch32_64', '--checkpoint', checkpoint, '--dataset', 'triangle', '--data-dir', data,
              '--num-samples', '40', '-j', '0']
    validate = script('validate')
    # repeating one of the run's settings keeps all the others (the model is not rebuilt with defaults)
    results = validate.main([*common, '--model-kwargs', 'embed_dim=32'])
    final_top1 = float(read_summary(root / 'run' / 'summary.csv')[-1]['eval_top1'])
    assert results['top1'] == pytest.approx(final_top1, abs=1e-3) and results['model'] == 'ait_small_patch32_64'
    with pytest.raises(ValueError, match=r'model setting embed_dim: .*embed_dim=32.*--model-kwargs embed_dim=64'):
        validate.main([*common, '--model-kwargs', 'embed_dim=64'])
    with pytest.raises(ValueError, match=r"model setting model: .*--model 'ait_small_patch32_64'.*--model 'ait_base_"):
        validate.main([*common[2:], '--model', 'ait_base_patch32_64'])


def test_a_stuck_rank_ends_the_run_with_a_clear_message(tmp_path):
    """Two ranks as torchrun starts them; rank 1 is stopped (SIGSTOP) once it has joined, as a hung rank."""
    import signal
    import socket
    import threading
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    procs, logs = [], [[], []]
    for rank in (0, 1):
        env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
               'WORLD_SIZE': '2', 'RANK': str(rank), 'LOCAL_RANK': str(rank)}
        procs.append(subprocess.Popen(
            [sys.executable, TRAIN, *TRIANGLE, '--epochs', '1', '--dist-timeout', '4', '--data-dir',
             str(tmp_path / 'data'), '--output', str(tmp_path), '--experiment', 'ddp'],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    joined = threading.Event()

    def read(rank):
        for line in procs[rank].stderr:
            logs[rank].append(line)
            if rank == 1 and 'Process 1 of 2' in line:
                os.kill(procs[1].pid, signal.SIGSTOP)
                joined.set()
    readers = [threading.Thread(target=read, args=(r,), daemon=True) for r in (0, 1)]
    for t in readers:
        t.start()
    try:
        assert joined.wait(120), ''.join(logs[1])
        try:  # --dist-timeout is 4 s; a rank 0 that waits for the stopped one (gloo's default: 30 min) fails here
            returncode = procs[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail('rank 0 did not stop within 60 s of rank 1 hanging, with --dist-timeout 4:\n'
                        + ''.join(logs[0]))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    readers[0].join(5)
    log = ''.join(logs[0])
    assert returncode == 1, log
    assert 'error: rank 0 of 2: another rank did not answer within the process group timeout (--dist-timeout)' \
        in log, log


@pytest.fixture(scope='module')
def ema_added_at_resume(trained, tmp_path_factory):
    """The two-epoch run resumed into its own folder for a third epoch with --model-ema added, at decay 1:
    that EMA never moves from the copy it starts as."""
    root, data = trained
    run_dir = copy_run(root / 'run', tmp_path_factory.mktemp('ema') / 'run')
    resumed = state_of(run_dir / 'last.pth.tar')
    run(TRAIN, *TRIANGLE, '--resume', str(run_dir / 'last.pth.tar'), '--epochs', '3', '--model-ema',
        '--model-ema-decay', '1.0', '--data-dir', data)
    return run_dir, resumed


def test_model_ema_added_at_a_resume_starts_from_the_resumed_weights_and_memory(ema_added_at_resume):
    run_dir, resumed = ema_added_at_resume
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        ema = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)['state_dict_ema']
    assert ema.keys() == resumed.keys() and any(k.endswith('memory.memory') for k in ema)
    for k, v in resumed.items():
        if v.is_floating_point():
            torch.testing.assert_close(ema[k], v, rtol=0, atol=0, msg=k)


def test_a_summary_column_added_at_a_resume_keeps_every_value_under_its_name(trained, ema_added_at_resume):
    root, _ = trained
    run_dir, _ = ema_added_at_resume
    with open(run_dir / 'summary.csv', newline='') as f:
        header, *lines = list(csv.reader(f))
    before = read_summary(root / 'run' / 'summary.csv')
    ema_columns = ['eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5']
    assert header == [c for c in before[0] if c != 'lr'] + ema_columns + ['lr']
    assert all(len(line) == len(header) for line in lines)
    rows = [dict(zip(header, line)) for line in lines]
    assert [{k: v for k, v in r.items() if k not in ema_columns} for r in rows[:2]] == before
    assert all(r[c] == '' for r in rows[:2] for c in ema_columns)
    # before: the third row's values were written under the first rows' header, lr holding eval_ema_loss
    with torch.serialization.safe_globals([__import__('argparse').Namespace]):
        last = torch.load(run_dir / 'last.pth.tar', map_location='cpu', weights_only=True)
    assert float(rows[2]['lr']) == last['optimizer']['param_groups'][0]['lr']
    assert 0 <= float(rows[2]['eval_ema_top1']) <= 100 and float(rows[2]['eval_ema_loss']) > 0
