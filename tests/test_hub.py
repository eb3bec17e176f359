"""Publishing on the Hub: push_to_hub.py, the model card, and pretrained=True back, offline.

The end-to-end tests run the client in subprocesses whose HF_ENDPOINT points at a Hub stand-in
on 127.0.0.1 (tests/hub_server.py), with a fresh HF_HOME: huggingface_hub reads both at import,
and neither it nor timm is patched. The published weights are the fixture ait_tiny_patch32_64
trained on Triangle (tests/fixtures/README.md says how).
"""
import argparse
import csv
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import timm
import timm_ait  # noqa: F401  (registers the models)
from timm_ait.hub import hf_hub_id

from hub_server import FakeHub

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / 'fixtures' / 'ait_tiny_patch32_64.triangle'
PUSH_SCRIPT = ROOT / 'train_scripts' / 'push_to_hub.py'
MODEL = 'ait_tiny_patch32_64'
REPO_ID = hf_hub_id(MODEL, 'triangle')
TOKEN = 'hf_test_token'
# the fresh Triangle set the published model is scored on; the fixture's validate.json was
# measured by validate.py on the same set (--seed 20240917 --num-samples 1000), from the checkpoint
FRESH_SEED, FRESH_SAMPLES = 20240917, 1000
# the brief's bar for the published fixture on fresh Triangle images
MIN_ACCURACY = 95.0

# Run in a subprocess after publishing: what a user does with the published model.
CONSUMER = r'''
import json, sys
import torch, timm, timm_ait
from safetensors.torch import load_file
from timm.data import create_transform, resolve_model_data_config
from timm_ait.data.factory import create_ait_dataset

fixture_weights, data_root, repo_id, seed, num_samples = sys.argv[1:6]
expected = load_file(fixture_weights)

def same(model, skip=()):
    state = model.state_dict()
    return state.keys() == expected.keys() and all(
        torch.equal(state[k], expected[k]) for k in expected if k not in skip)

model = timm.create_model('ait_tiny_patch32_64', pretrained=True).eval()
# images the model has never seen: a seed other than the training run's
dataset = create_ait_dataset('triangle', root=data_root, split='validation', num_samples=int(num_samples),
                             seed=int(seed), progress=False)
dataset.transform = create_transform(**resolve_model_data_config(model), is_training=False)
loader = torch.utils.data.DataLoader(dataset, batch_size=250)
with torch.no_grad():
    correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
reset = timm.create_model('ait_tiny_patch32_64', pretrained=True, num_classes=5)
by_name = timm.create_model('hf-hub:' + repo_id, pretrained=True)
print(json.dumps(dict(
    accuracy=100.0 * correct / len(dataset),
    bitwise=same(model),
    hub_id=model.pretrained_cfg['hf_hub_id'],
    reset_head=tuple(reset.head.weight.shape),
    reset_keeps_the_rest=same(reset, skip=('head.weight', 'head.bias')),
    by_name_bitwise=same(by_name),
)))
'''


def _load_push_script():
    spec = importlib.util.spec_from_file_location('push_to_hub', PUSH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


push_to_hub = _load_push_script()


def client_env(tmp_path, endpoint=None, token=None, **extra):
    """Environment of a client subprocess: its own empty HF_HOME, nothing from the user's setup."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_TELEMETRY='1', OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')]))
    if endpoint:
        env['HF_ENDPOINT'] = endpoint
    if token:
        env['HF_TOKEN'] = token
    env.update(extra)
    return env


def run(args, env, check=True):
    result = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f'{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
    return result


def make_checkpoint(folder: Path, state_dict=None, ema_state_dict=None, **train_args) -> Path:
    """A checkpoint as timm's CheckpointSaver writes it, with the run's summary.csv beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(model=MODEL, model_kwargs={}, num_classes=None, dataset='triangle', img_size=None,
                              mean=None, std=None, interpolation='', crop_pct=None)
    vars(args).update(train_args)
    checkpoint = dict(state_dict=state_dict or load_file(FIXTURE / 'model.safetensors'), args=args, epoch=7,
                      metric=99.0)
    if ema_state_dict is not None:
        checkpoint['state_dict_ema'] = ema_state_dict
    path = folder / 'model_best.pth.tar'
    torch.save(checkpoint, path)
    (folder / 'summary.csv').write_bytes((FIXTURE / 'summary.csv').read_bytes())
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as server:
        yield server


def test_publish_then_pretrained_downloads_and_classifies(tmp_path, hub):
    # the EMA weights are the trained ones; the plain weights are noise that must not be published
    noise = timm.create_model(MODEL).state_dict()
    checkpoint = make_checkpoint(tmp_path / 'run', state_dict=noise,
                                 ema_state_dict=load_file(FIXTURE / 'model.safetensors'))
    run([PUSH_SCRIPT, checkpoint, '--use-ema', '--results-file', FIXTURE / 'validate.json'],
        client_env(tmp_path / 'publisher', hub.endpoint, TOKEN))
    published = hub.files(REPO_ID)
    assert sorted(published) == ['README.md', 'config.json', 'model.safetensors']
    assert json.loads(published['config.json'])['architecture'] == MODEL

    result = run(['-c', CONSUMER, FIXTURE / 'model.safetensors', tmp_path / 'data', REPO_ID, FRESH_SEED,
                  FRESH_SAMPLES], client_env(tmp_path / 'user', hub.endpoint))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['hub_id'] == REPO_ID
    assert report['bitwise'] and report['by_name_bitwise'], 'weights (memory buffers included) changed on the way'
    validation = json.loads((FIXTURE / 'validate.json').read_text())
    assert validation['num_samples'] == FRESH_SAMPLES  # validate.py does not record the seed; the README does
    # the downloaded model scores exactly what validate.py measured on the original checkpoint
    assert report['accuracy'] == pytest.approx(validation['top1'], abs=1e-3)
    assert report['accuracy'] >= MIN_ACCURACY, report
    assert report['reset_head'] == [5, 4 * 128]  # flatten head: 4 patches x width 128 and report['reset_keeps_the_rest']


def test_local_dir_loads_back_bit_for_bit(tmp_path):
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out)])
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    expected = load_file(FIXTURE / 'model.safetensors')
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert any('memory' in k for k in state)  # the GWL memory is a buffer and travels with the weights
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_card_reports_the_run_it_was_made_from(tmp_path):
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out),
                      '--results-file', str(FIXTURE / 'validate.json')])
    card = (out / 'README.md').read_text()
    front_matter = yaml.safe_load(card.split('---')[1])
    assert set(front_matter['tags']) >= {'image-classification', 'timm', 'timm-ait'}
    assert front_matter['library_name'] == 'timm' and front_matter['pipeline_tag'] == 'image-classification'
    assert front_matter['license'] == 'apache-2.0' and front_matter['datasets'] == ['triangle']

    with open(FIXTURE / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda row: float(row['eval_top1']))
    assert f"| Best | {best['epoch']} | {float(best['eval_top1']):.2f} |" in card
    assert f"| Final | {rows[-1]['epoch']} | {float(rows[-1]['eval_top1']):.2f} |" in card
    validation = json.loads((FIXTURE / 'validate.json').read_text())
    assert f"top-1 {validation['top1']:.2f}%" in card and f"num_samples {validation['num_samples']}" in card

    params = sum(p.numel() for p in timm.create_model(MODEL).parameters()) / 1e6
    assert f'Params (M): {params:.3g}' in card
    for expected in ('Memory slots: 16', 'Slot dim: 16', 'Heads: 4', 'Bottleneck k: 64', 'Hopfield beta: 1.0',
                     'Memory smoothing: 0.9', f"hf-hub:{hf_hub_id(MODEL, 'triangle')}", 'arXiv:2309.12862',
                     'arXiv:2406.12220', 'Karakida, Ryo and Ota, Toshihiro and Taki, Masato'):
        assert expected in card
    assert '$' not in card  # every placeholder was filled


def test_missing_token_fails_before_any_request(tmp_path, hub):
    result = run([PUSH_SCRIPT, make_checkpoint(tmp_path / 'run')], client_env(tmp_path, hub.endpoint), check=False)
    assert result.returncode == 2 and 'no Hugging Face token' in result.stderr
    assert hub.writes == [] and ('GET', '/api/whoami-v2') not in hub.requests


def test_unreachable_hub_fails_clearly(tmp_path):
    endpoint = f'http://127.0.0.1:{closed_port()}'
    result = run([PUSH_SCRIPT, make_checkpoint(tmp_path / 'run')], client_env(tmp_path, endpoint, TOKEN),
                 check=False)
    assert result.returncode == 2 and f'cannot reach the Hub at {endpoint}' in result.stderr


PRETRAINED = "import timm, timm_ait; timm.create_model('ait_tiny_patch32_64', pretrained=True)"


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def test_offline_without_cache_fails_clearly(tmp_path):
    result = run(['-c', PRETRAINED], client_env(tmp_path, HF_HUB_OFFLINE='1'), check=False)
    assert result.returncode != 0
    error = last_line(result.stderr)
    assert error.startswith("RuntimeError: cannot load the pretrained weights of 'ait_tiny_patch32_64' from Hub "
                            f"repo {REPO_ID} at https://huggingface.co"), error
    assert str(tmp_path / 'hf_home') in error and 'HF_HUB_OFFLINE is set' in error
    assert 'LocalEntryNotFoundError' in result.stderr  # huggingface_hub's error stays attached as the cause


def test_unpublished_model_fails_clearly(tmp_path, hub):
    result = run(['-c', PRETRAINED], client_env(tmp_path, hub.endpoint), check=False)
    error = last_line(result.stderr)
    assert result.returncode != 0 and f'from Hub repo {REPO_ID} at {hub.endpoint}' in error, error
    assert 'no such repo' in error


@pytest.mark.parametrize('repo_id', ['timm-ait/has space', 'a/b/c', 'timm-ait/--bad--', 'x' * 97])
def test_bad_repo_id_fails_before_any_request(tmp_path, repo_id):
    with pytest.raises(ValueError, match='bad repo id'):
        push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--repo-id', repo_id, '--token', TOKEN])


def test_mismatched_checkpoint_names_the_keys_before_writing(tmp_path):
    state = load_file(FIXTURE / 'model.safetensors')
    del state['blocks.1.mlp.memory.memory']
    state['pos_embed'] = torch.zeros(1, 4, 64)
    checkpoint = make_checkpoint(tmp_path / 'run', state_dict=state)
    out = tmp_path / 'hub_folder'
    out.mkdir()
    (out / 'keep.txt').write_text('previous contents')
    for target in (['--local-dir', str(out), '--overwrite'], ['--token', TOKEN]):
        with pytest.raises(ValueError, match=r'missing: blocks\.1\.mlp\.memory\.memory.*shape mismatch: pos_embed'):
            push_to_hub.main([str(checkpoint), *target])
    assert os.listdir(out) == ['keep.txt']


def test_existing_local_dir_needs_overwrite(tmp_path):
    out = tmp_path / 'hub_folder'
    out.mkdir()
    (out / 'keep.txt').write_text('previous contents')
    with pytest.raises(FileExistsError, match='--overwrite'):
        push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out)])
    assert os.listdir(out) == ['keep.txt']
