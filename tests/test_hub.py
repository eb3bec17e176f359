"""Publishing on the Hub: push_to_hub.py, the model card, and pretrained=True back, offline.

The end-to-end tests run the client in subprocesses whose HF_ENDPOINT points at a Hub stand-in
on 127.0.0.1 (tests/hub_server.py), with a fresh HF_HOME: huggingface_hub reads both at import,
and neither it nor timm is patched. The published weights are the fixture ait_tiny_patch32_64
trained on Triangle (tests/fixtures/README.md says how).
"""
import argparse
import contextlib
import csv
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import timm
import timm_ait  # noqa: F401  (registers the models)
from timm_ait.data.factory import create_ait_dataset
from timm_ait.checkpoint import with_digest
from timm_ait.data.sort_of_clevr import SortOfClevr
from timm_ait.hub import hf_hub_id
from timm_ait.hub_card import read_summary
from timm_ait.models.ait_relational import SORT_OF_CLEVR_ANSWERS
from timm_ait.profiling import profile_model

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


from timm_ait import publish as push_to_hub  # noqa: E402  (train_scripts/push_to_hub.py's code)
from timm_ait.train import validate as validate_script  # noqa: E402  (train_scripts/validate.py's code)


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


def make_checkpoint(folder: Path, state_dict=None, ema_state_dict=None, summary: str = None, epoch: int = 7,
                    digest: bool = False, args_as_dict: bool = False, **train_args) -> Path:
    """A checkpoint as timm's CheckpointSaver writes it, with the run's summary.csv beside it.

    By default the fixture's run; ``summary`` is the text of another summary.csv. ``digest``: with the
    digest entry train.py's saver adds. ``args_as_dict``: the training args as a dict, as other tools save them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(model=MODEL, model_kwargs={}, num_classes=None, dataset='triangle', img_size=None,
                              mean=None, std=None, interpolation='', crop_pct=None)
    vars(args).update(train_args)
    checkpoint = dict(state_dict=state_dict or load_file(FIXTURE / 'model.safetensors'),
                      args=vars(args) if args_as_dict else args, epoch=epoch, metric=99.0)
    if ema_state_dict is not None:
        checkpoint['state_dict_ema'] = ema_state_dict
    path = folder / 'model_best.pth.tar'
    torch.save(with_digest(checkpoint) if digest else checkpoint, path)
    (folder / 'summary.csv').write_text(summary or (FIXTURE / 'summary.csv').read_text())
    return path


def validate_checkpoint(checkpoint: Path, data_dir: Path, *flags, seed=FRESH_SEED, num_samples=FRESH_SAMPLES) -> Path:
    """validate.py's results file (validate.json beside the checkpoint) on fresh Triangle images."""
    results = checkpoint.parent / 'validate.json'
    validate_script.main(['--checkpoint', str(checkpoint), '--data-dir', str(data_dir), '--seed', str(seed),
                          '--num-samples', str(num_samples), '-j', '0', '--results-file', str(results), *flags])
    return results


def ema_summary() -> str:
    """The fixture's summary.csv as a run with --model-ema writes it, the fixture's weights as the EMA ones:
    eval_ema_* columns with the fixture's accuracies, the plain weights' at chance."""
    with open(FIXTURE / 'summary.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*rows[0], 'eval_ema_loss', 'eval_ema_top1', 'eval_ema_top5'])
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, 'eval_top1': '50.0', 'eval_ema_loss': row['eval_loss'],
                         'eval_ema_top1': row['eval_top1'], 'eval_ema_top5': row['eval_top5']})
    return out.getvalue()


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
                                 ema_state_dict=load_file(FIXTURE / 'model.safetensors'), summary=ema_summary())
    results = validate_checkpoint(checkpoint, tmp_path / 'data', '--use-ema')
    run([PUSH_SCRIPT, checkpoint, '--use-ema', '--results-file', results],
        client_env(tmp_path / 'publisher', hub.endpoint, TOKEN))
    published = hub.files(REPO_ID)
    assert sorted(published) == ['README.md', 'config.json', 'model.safetensors']
    with open(FIXTURE / 'summary.csv', newline='') as f:
        final = list(csv.DictReader(f))[-1]
    assert f"| Final | {final['epoch']} | {float(final['eval_top1']):.2f} |" in published['README.md'].decode()
    assert json.loads(published['config.json'])['architecture'] == MODEL

    result = run(['-c', CONSUMER, FIXTURE / 'model.safetensors', tmp_path / 'data', REPO_ID, FRESH_SEED,
                  FRESH_SAMPLES], client_env(tmp_path / 'user', hub.endpoint))
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['hub_id'] == REPO_ID
    assert report['bitwise'] and report['by_name_bitwise'], 'weights (memory buffers included) changed on the way'
    validation = json.loads(results.read_text())
    assert validation['num_samples'] == FRESH_SAMPLES and validation['seed'] == FRESH_SEED
    # the downloaded model scores exactly what validate.py measured on the original checkpoint, as when the
    # fixture was made (its validate.json: the same weights on the same images)
    assert report['accuracy'] == pytest.approx(validation['top1'], abs=1e-3)
    assert validation['top1'] == json.loads((FIXTURE / 'validate.json').read_text())['top1']
    assert report['accuracy'] >= MIN_ACCURACY, report
    assert report['reset_head'] == [5, 4 * 128]  # flatten head: 4 patches x width 128
    assert report['reset_keeps_the_rest'], 'a new num_classes must reset only the classifier'


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
    out, checkpoint = tmp_path / 'hub_folder', make_checkpoint(tmp_path / 'run')
    results = validate_checkpoint(checkpoint, tmp_path / 'data', num_samples=200)
    push_to_hub.main([str(checkpoint), '--local-dir', str(out), '--results-file', str(results)])
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
    validation = json.loads(results.read_text())
    assert f"top-1 {validation['top1']:.2f}%" in card and 'num_samples 200' in card
    assert 'The published weights are those of epoch 7 of the run.' in card  # make_checkpoint's epoch

    model = timm.create_model(MODEL)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cost = profile_model(model)
    assert f'Params (M): {params:.3g}' in card
    assert f"GMACs: {cost['gmacs']:.3g}" in card and f"Activations (M): {cost['activations_m']:.3g}" in card
    for expected in ('Memory slots: 16', 'Slot dim: 16', 'Heads: 4', 'Bottleneck k: 64', 'Hopfield beta: 1.0',
                     'Memory smoothing: 0.9', f"hf-hub:{hf_hub_id(MODEL, 'triangle')}", 'arXiv:2309.12862',
                     'Sun, Yuwei and Ochiai, Hideya'):
        assert expected in card
    assert '2406.12220' not in card and 'Karakida' not in card  # the hmixer paper is not this model's
    assert '$' not in card  # every placeholder was filled


def test_missing_token_fails_before_any_request(tmp_path, hub):
    result = run([PUSH_SCRIPT, make_checkpoint(tmp_path / 'run')], client_env(tmp_path, hub.endpoint), check=False)
    assert result.returncode == 2 and 'no Hugging Face token' in result.stderr
    assert hub.writes == [] and ('GET', '/api/whoami-v2') not in hub.requests


def test_refused_token_fails_before_any_write(tmp_path, hub):
    result = run([PUSH_SCRIPT, make_checkpoint(tmp_path / 'run')], client_env(tmp_path, hub.endpoint, 'hf_wrong'),
                 check=False)
    assert result.returncode == 2 and f'the Hub at {hub.endpoint} refused the token' in result.stderr, result.stderr
    assert hub.writes == []


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
    # a RuntimeError (PretrainedDownloadError) that scripts can catch by class
    assert error.startswith("timm_ait.hub.PretrainedDownloadError: cannot load the pretrained weights of "
                            f"'ait_tiny_patch32_64' from Hub repo {REPO_ID} at https://huggingface.co"), error
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
    (out / 'README.md').write_text('an earlier card')  # an earlier Hub folder, which --overwrite may replace
    for target in (['--local-dir', str(out), '--overwrite'], ['--token', TOKEN]):
        with pytest.raises(ValueError, match=r'missing: blocks\.1\.mlp\.memory\.memory.*shape mismatch: pos_embed'):
            push_to_hub.main([str(checkpoint), *target])
    assert os.listdir(out) == ['README.md'] and (out / 'README.md').read_text() == 'an earlier card'


def test_overwrite_never_deletes_what_push_to_hub_did_not_write(tmp_path):
    checkpoint = make_checkpoint(tmp_path / 'run')
    run_files = {f.name: f.read_bytes() for f in (tmp_path / 'run').iterdir()}
    # the run folder itself as the Hub folder: the checkpoint being published is in it
    with pytest.raises(FileExistsError, match=r"holds files push_to_hub did not write \(model_best.pth.tar, "
                                              r"summary.csv\)"):
        push_to_hub.main([str(checkpoint), '--local-dir', str(tmp_path / 'run'), '--overwrite'])
    assert {f.name: f.read_bytes() for f in (tmp_path / 'run').iterdir()} == run_files
    # an earlier Hub folder is replaced, file by file
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(checkpoint), '--local-dir', str(out)])
    (out / 'README.md').write_text('stale')
    push_to_hub.main([str(checkpoint), '--local-dir', str(out), '--overwrite'])
    assert sorted(os.listdir(out)) == ['README.md', 'config.json', 'model.safetensors']
    assert (out / 'README.md').read_text() != 'stale'


def test_a_diverged_checkpoint_is_refused_for_what_it_is(tmp_path):
    state = load_file(FIXTURE / 'model.safetensors')
    state['head.weight'][0, 0] = float('nan')
    with pytest.raises(ValueError, match=r'holds non-finite values \(NaN or inf\) in 1 of its weight tensors '
                                         r'\(head.weight\): the run diverged'):
        push_to_hub.main([str(make_checkpoint(tmp_path / 'run', state_dict=state)), '--local-dir', str(tmp_path / 'h')])
    assert not (tmp_path / 'h').exists()


def test_an_epoch_recorded_twice_counts_once_on_the_card(tmp_path):
    # a summary.csv an interrupted and resumed run of an older train.py wrote: epoch 1 twice
    summary = tmp_path / 'summary.csv'
    summary.write_text('epoch,train_loss,eval_top1\n0,0.7,50.0\n1,0.6,60.0\n1,0.6,61.0\n2,0.5,70.0\n')
    result = read_summary(str(summary))
    assert result['num_epochs'] == 3 and result['final'] == dict(epoch=2, top1=70.0)
    # a run resumed into a new folder records only its later epochs, and still trained all of them
    summary.write_text('epoch,train_loss,eval_top1\n3,0.5,72.0\n4,0.4,75.0\n')
    assert read_summary(str(summary))['num_epochs'] == 5


EMA_SUMMARY = """epoch,train_loss,eval_loss,eval_top1,eval_top5,eval_ema_loss,eval_ema_top1,eval_ema_top5
0,0.7,0.69,51.00,100.0,0.69,50.00,100.0
1,0.6,0.55,75.00,100.0,0.60,70.00,100.0
2,0.5,0.45,90.00,100.0,0.50,88.50,100.0
"""


def test_epochs_before_ema_was_added_at_a_resume_are_left_out_of_the_ema_figures(tmp_path):
    summary = tmp_path / 'summary.csv'  # --model-ema added at the resume of epoch 1: epoch 0 has empty EMA cells
    summary.write_text(EMA_SUMMARY.replace('0,0.7,0.69,51.00,100.0,0.69,50.00,100.0', '0,0.7,0.69,51.00,100.0,,,'))
    result = read_summary(str(summary), ema=True)
    assert result['best'] == dict(epoch=2, top1=88.5) and result['num_epochs'] == 3


def test_the_card_of_ema_weights_shows_the_ema_accuracies(tmp_path):
    weights = load_file(FIXTURE / 'model.safetensors')
    checkpoint = make_checkpoint(tmp_path / 'run', state_dict=weights, ema_state_dict=weights, summary=EMA_SUMMARY)
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(checkpoint), '--use-ema', '--local-dir', str(out)])
    card = (out / 'README.md').read_text()
    assert 'eval accuracy of the EMA weights' in card
    assert '| Best | 2 | 88.50 |' in card and '| Final | 2 | 88.50 |' in card and '90.00' not in card
    assert 'The published EMA weights are those of epoch 7 of the run.' in card
    # validate.py's results of the other weights do not go on this card
    plain = tmp_path / 'validate.json'
    plain.write_text(json.dumps(dict(model=MODEL, top1=91.0, top5=100.0, use_ema=False)))
    with pytest.raises(ValueError, match=r'was measured on the plain \(non-EMA\) weights.*validate them with --use-ema'):
        push_to_hub.main([str(checkpoint), '--use-ema', '--local-dir', str(tmp_path / 'h2'), '--results-file',
                          str(plain)])
    # a run without EMA has no accuracies to show for --use-ema
    checkpoint = make_checkpoint(tmp_path / 'plain_run', state_dict=weights, ema_state_dict=weights)
    with pytest.raises(ValueError, match='no accuracies of the EMA weights'):
        push_to_hub.main([str(checkpoint), '--use-ema', '--local-dir', str(tmp_path / 'h3')])


def test_existing_local_dir_needs_overwrite(tmp_path):
    out = tmp_path / 'hub_folder'
    out.mkdir()
    (out / 'keep.txt').write_text('previous contents')
    with pytest.raises(FileExistsError, match='--overwrite'):
        push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out)])
    assert os.listdir(out) == ['keep.txt']


def usage_snippet(card: str) -> str:
    """The Python code block of the card's usage section."""
    usage = card.split('## Model Usage')[1].split('## Citation')[0]
    return usage.split('```python\n')[1].split('```')[0]


def run_snippet(code: str, repo_id: str, folder: Path, image_file: str, image: Path) -> dict:
    """Run a card's snippet as a user would, with the Hub repo swapped for the local folder."""
    assert f"'hf-hub:{repo_id}'" in code and f"'{image_file}'" in code
    code = code.replace(f'hf-hub:{repo_id}', f'local-dir:{folder}').replace(image_file, str(image))
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, 'model card usage', 'exec'), namespace)
    namespace['printed'] = printed.getvalue().splitlines()
    return namespace


def test_card_usage_classifies_an_image(tmp_path):
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out)])
    dataset = create_ait_dataset('triangle', root=tmp_path / 'data', split='validation', num_samples=8, seed=3,
                                 progress=False)
    image, label = dataset[0]
    image.save(tmp_path / 'triangle.png')
    result = run_snippet(usage_snippet((out / 'README.md').read_text()), REPO_ID, out, 'image.png',
                         tmp_path / 'triangle.png')
    assert result['output'].shape == (1, 2)
    assert result['top5_class_indices'].shape == (1, 2)  # two classes: the top five are both


# a Sort-of-CLEVR question answerer small enough to build in a test (75x75, patch 15: 25 patches)
RELATIONAL = 'ait_small_patch5_75'
RELATIONAL_KWARGS = dict(patch_size=15, embed_dim=32, depth=1, num_heads=2, num_slots=4, slot_dim=8, gwl_heads=2,
                         bottleneck=16)
RELATIONAL_SUMMARY = """epoch,train_loss,eval_loss,eval_top1,eval_top5,eval_relational_top1,eval_non_relational_top1
0,1.5,1.4,51.25,90.0,40.5,62.0
1,1.2,1.1,60.75,95.0,48.25,73.25
2,1.1,1.2,59.5,95.5,47.0,72.0
"""


def test_question_answering_model_is_published_with_its_own_card(tmp_path):
    model = timm.create_model(RELATIONAL, **RELATIONAL_KWARGS)
    model.train()(torch.rand(4, 3, 75, 75), torch.eye(11)[:4])  # write the memory: it must travel too
    checkpoint = make_checkpoint(tmp_path / 'run', state_dict=model.state_dict(), summary=RELATIONAL_SUMMARY,
                                 model=RELATIONAL, model_kwargs=RELATIONAL_KWARGS, dataset='sort-of-clevr')
    validation = validate_checkpoint(checkpoint, tmp_path / 'data', seed=42, num_samples=5)  # 5 scenes
    out = tmp_path / 'hub_folder'
    assert push_to_hub.main([str(checkpoint), '--local-dir', str(out), '--results-file', str(validation)]) == str(out)
    measured = json.loads(validation.read_text())

    card = (out / 'README.md').read_text()
    repo_id = hf_hub_id(RELATIONAL, 'sort_of_clevr')  # the tag follows the dataset
    assert f'# Model card for {repo_id.split("/")[1]}' in card
    front_matter = yaml.safe_load(card.split('---')[1])
    assert front_matter['pipeline_tag'] == 'visual-question-answering' and front_matter['datasets'] == ['sort-of-clevr']
    assert 'Visual question answering' in card and 'one extra token' in card
    assert '| | Epoch | Top-1 (%) | Relational (%) | Non-relational (%) |' in card
    assert '| Best | 1 | 60.75 | 48.25 | 73.25 |' in card and '| Final | 2 | 59.50 | 47.00 | 72.00 |' in card
    assert (f"relational {measured['relational_top1']:.2f}%, non-relational {measured['non_relational_top1']:.2f}%"
            in card) and f"num_samples {measured['num_samples']}, seed 42" in card
    cost = profile_model(model)
    assert f"GMACs: {cost['gmacs']:.3g}" in card and cost['gmacs'] > 0

    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    scene = SortOfClevr(root=tmp_path / 'data', split='test', num_images=1, progress=False)
    Image.fromarray(scene.images[0]).save(tmp_path / 'scene.png')
    result = run_snippet(usage_snippet(card), repo_id, out, 'scene.png', tmp_path / 'scene.png')
    question, answer = result['printed']
    assert question == 'What shape is the object nearest to the red object?'
    assert answer in SORT_OF_CLEVR_ANSWERS and result['output'].shape == (1, 10)


@pytest.mark.parametrize('model_name,kwargs,dataset,present,absent', [
    ('hmixer_symbreak_s4_32', dict(embed_dim=32, num_blocks=2), 'torch/cifar10',
     ['symbreak MLP-Mixer image classifier', 'Mixer block:** `symbreak`', 'W1^T act(W1 z) + W2 act(W1 z)',
      'Paper:** Hierarchical Associative Memory', 'arXiv:2406.12220', 'Karakida, Ryo'],
     ['Global Workspace', 'Associative Transformer (AiT)', '2309.12862', 'Sun, Yuwei']),
    ('hmixer_parallel_s4_32', dict(embed_dim=32, num_blocks=2, n_iter=2, lcoeff=1e-3), 'torch/cifar10',
     ['Block iterations:** each block applied 2 times', '`lcoeff=0.001`'], ['Global Workspace']),
    ('ait_small_patch4_32', dict(gwl=False, embed_dim=32, num_heads=2, num_classes=100), 'torch/cifar100',
     ['ViT twin', 'Global Workspace Layer:** none'], ['Memory slots', 'Hopfield beta']),
    ('ait_small_patch4_32', dict(embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Each block keeps timm's pre-norm self-attention and replaces the MLP with a Global Workspace Layer: a "
      'bottleneck attention (top-k patches per slot) writes', 'a Hopfield network reads it back',
      'Paper:** Associative Transformer', 'arXiv:2309.12862'],
     ['ablation', 'n/a (cross-attention read)', '2406.12220', 'Karakida', 'memory_decorrelation']),
    ('ait_small_patch4_32', dict(self_attn=False, embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Each block has no self-attention (the paper's 'W/O SA' ablation), only a pre-norm Global Workspace Layer: "
      'a bottleneck attention'], ['self-attention and replaces', 'feed-forward', 'Reset Memory']),
    ('ait_small_patch4_32', dict(ablation='no_self_attn', embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Each block has no self-attention (the paper's 'W/O SA' ablation)"], ['keeps timm\'s pre-norm self-attention']),
    ('ait_small_patch4_32', dict(feed_forward=False, embed_dim=32, num_heads=2), 'torch/cifar10',
     ["keeps timm's pre-norm self-attention and replaces the MLP with a Global Workspace Layer without its "
      "feed-forward network (the paper's 'W/O FF' ablation; the patches are only layer-normalised): a bottleneck"],
     ['Layer: a bottleneck', 'W/O SA']),
    ('ait_small_patch4_32', dict(self_attn=False, feed_forward=False, embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Each block has no self-attention, only a pre-norm Global Workspace Layer without its feed-forward network "
      "(the paper's 'W/O SA' and 'W/O FF' ablations"], ['keeps timm\'s pre-norm self-attention']),
    ('ait_small_patch4_32', dict(ablation='reset_memory', embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Layer: a bottleneck attention (top-k", "re-initialised at the start of every epoch (the paper's 'Reset "
      "Memory' ablation)"], ['W/O', 'no Hopfield']),
    ('ait_small_patch4_32', dict(gwl=False, self_attn=False, embed_dim=32, num_heads=2), 'torch/cifar10',
     ['ViT twin', 'Its blocks have no self-attention (`self_attn=False`)'], ['Memory slots']),
    ('ait_small_patch4_32', dict(ablation='no_hopfield', embed_dim=32, num_heads=2), 'torch/cifar10',
     ['a bottleneck attention (top-k', 'a multi-head cross-attention (no Hopfield', 'n/a (cross-attention read)'],
     ['Hopfield network', 'no bottleneck']),
    ('ait_small_patch4_32', dict(ablation='no_bottleneck', embed_dim=32, num_heads=2), 'torch/cifar10',
     ['a dense attention over all tokens (no bottleneck', 'Bottleneck k: none', 'a Hopfield network reads'],
     ['a bottleneck attention', 'no Hopfield']),
    ('ait_small_patch4_32', dict(memory_decorrelation=0.05, embed_dim=32, num_heads=2), 'torch/cifar10',
     ["Its memory write is not the paper's", '`memory_decorrelation=0.05`',
      'not changed accuracy measurably against the paper\'s write (Triangle, 8 seeds; Sort-of-CLEVR, 3 seeds'],
     ['Reset Memory']),
])
def test_card_says_what_the_model_is(tmp_path, model_name, kwargs, dataset, present, absent):
    model = timm.create_model(model_name, **kwargs)
    checkpoint = make_checkpoint(tmp_path / 'run', state_dict=model.state_dict(), model=model_name,
                                 model_kwargs=kwargs, dataset=dataset)
    out = tmp_path / 'hub_folder'
    push_to_hub.main([str(checkpoint), '--local-dir', str(out)])
    card = (out / 'README.md').read_text()
    for text in present:
        assert text in card, text
    for text in absent:
        assert text not in card, text
    assert yaml.safe_load(card.split('---')[1])['pipeline_tag'] == 'image-classification'
    # the Hub config rebuilds what the weights alone cannot tell (n_iter shares the weights)
    assert getattr(timm.create_model(f'local-dir:{out}', pretrained=True), 'n_iter', 1) == kwargs.get('n_iter', 1)


def test_overwrite_never_writes_through_a_planted_link(tmp_path):
    checkpoint = make_checkpoint(tmp_path / 'run')
    out, outside = tmp_path / 'hub_folder', tmp_path / 'outside.txt'
    push_to_hub.main([str(checkpoint), '--local-dir', str(out)])
    outside.write_text('not push_to_hub\'s')
    (out / 'config.json.tmp').symlink_to(outside)  # where the copy of config.json goes before its rename
    with pytest.raises(FileExistsError, match=r"holds symbolic links \(config.json.tmp\); expected regular files"):
        push_to_hub.main([str(checkpoint), '--local-dir', str(out), '--overwrite'])
    assert outside.read_text() == 'not push_to_hub\'s'


def test_a_link_planted_after_the_check_is_replaced_not_followed(tmp_path):
    folder, outside, source = tmp_path / 'hub_folder', tmp_path / 'outside.txt', tmp_path / 'config.json'
    folder.mkdir()
    outside.write_text('outside')
    source.write_text('{"architecture": "x"}')
    for planted in ('config.json.tmp', 'config.json'):
        (folder / planted).unlink(missing_ok=True)
        (folder / planted).symlink_to(outside)
        push_to_hub.install_file(str(source), str(folder), 'config.json')
        assert outside.read_text() == 'outside'
        assert not (folder / 'config.json').is_symlink() and (folder / 'config.json').read_text() == source.read_text()
        assert sorted(os.listdir(folder)) == ['config.json']


def test_a_full_disk_while_writing_the_folder_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    import errno
    out = tmp_path / 'hub_folder'

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(push_to_hub.os, 'fsync', full_disk)
    with pytest.raises(SystemExit) as exit_info:
        push_to_hub.cli([str(make_checkpoint(tmp_path / 'run')), '--local-dir', str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error == f"error: [Errno 28] cannot write '{out / 'README.md'}': No space left on device\n"
    assert os.listdir(out) == []  # no partial copy left behind


def test_results_of_other_weights_are_refused_naming_both(tmp_path):
    weights = load_file(FIXTURE / 'model.safetensors')
    published = make_checkpoint(tmp_path / 'published', digest=True)  # epoch 7
    earlier = make_checkpoint(tmp_path / 'earlier', state_dict={**weights, 'head.bias': weights['head.bias'] + 1},
                              epoch=3, digest=True)
    out = tmp_path / 'hub_folder'
    results = validate_checkpoint(earlier, tmp_path / 'data', num_samples=32)
    with pytest.raises(ValueError, match=(
            rf"was measured on other weights \(weights_digest, checkpoint_digest, epoch differ\): the plain weights of "
            rf"epoch 3 of checkpoint '{earlier}' \(checkpoint digest sha256:.*; expected the plain weights of epoch 7 "
            rf"of checkpoint '{published}' .*: run validate.py --checkpoint {published} --results-file")):
        push_to_hub.main([str(published), '--local-dir', str(out), '--results-file', str(results)])
    # an older validate.py's results (the fixture's) say nothing of the weights: they cannot be checked
    with pytest.raises(ValueError, match=r'does not record which weights it measured .*expected results of the '
                                         r'plain weights of epoch 7'):
        push_to_hub.main([str(published), '--local-dir', str(out), '--results-file', str(FIXTURE / 'validate.json')])
    assert not out.exists()
    # the results of these very weights go on the card, which says which epoch they are
    results = validate_checkpoint(published, tmp_path / 'data', num_samples=32)
    push_to_hub.main([str(published), '--local-dir', str(out), '--results-file', str(results)])
    card = (out / 'README.md').read_text()
    assert 'The published weights are those of epoch 7 of the run.' in card
    assert f"`validate.py` on these weights: top-1 {json.loads(results.read_text())['top1']:.2f}%" in card


def test_a_checkpoint_whose_args_are_a_dict_is_published_with_its_run_settings(tmp_path):
    checkpoint = make_checkpoint(tmp_path / 'run', args_as_dict=True, mean=(0.9, 0.1, 0.5), std=(0.1, 2.0, 0.5))
    out = tmp_path / 'hub_folder'
    push_to_hub.cli([str(checkpoint), '--local-dir', str(out)])
    config = json.loads((out / 'config.json').read_text())['pretrained_cfg']
    assert config['mean'] == [0.9, 0.1, 0.5] and config['std'] == [0.1, 2.0, 0.5]
