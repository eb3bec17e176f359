"""What an install of timm-ait gives a user: a wheel that works outside the source tree, and floors that hold.

``USER_SCRIPT`` is what a user does with the public API only (no test helpers, no repository
files): build one model of each family, train a step, publish it to a Hub folder with timm's
``save_for_hf``, load it back, render its card and run the card's usage snippet. The wheel test
runs it from a fresh environment holding the built wheel; ``make test`` runs the ``floor`` tests a
second time in an environment holding the dependency floors of pyproject.toml.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# set by `make test` for its run at the declared floors: the folder of that environment
FLOOR_VENV = os.environ.get('TIMM_AIT_FLOOR_VENV')

USER_SCRIPT = r'''
import json, re, sys
from pathlib import Path
import torch, timm, timm_ait
from PIL import Image
from timm.data import resolve_data_config
from timm.models import save_for_hf
from timm.optim import create_optimizer_v2
from timm_ait.hub_card import render_model_card

torch.manual_seed(0)
torch.set_num_threads(1)
out = Path(sys.argv[1])
# one model of each family, small; the dense ablation must come back as itself from the Hub folder
FAMILIES = {
    'ait': ('ait_small_patch4_32', dict(embed_dim=32, num_heads=2, num_slots=4, slot_dim=8, gwl_heads=2,
                                         bottleneck=4), 'torch/cifar10'),
    'ait_no_bottleneck': ('ait_small_patch4_32', dict(embed_dim=32, num_heads=2, num_slots=4, slot_dim=8,
                                                       gwl_heads=2, ablation='no_bottleneck'), 'torch/cifar10'),
    'hmixer': ('hmixer_symbreak_s4_32', dict(embed_dim=32, num_blocks=2), 'torch/cifar10'),
    'relational': ('ait_small_patch5_75', dict(patch_size=15, embed_dim=32, depth=1, num_heads=2, num_slots=4,
                                                slot_dim=8, gwl_heads=2, bottleneck=16), 'sort-of-clevr'),
}
report = dict(timm_ait=timm_ait.__file__, timm=timm.__file__, models={})
for family, (name, kwargs, dataset) in FAMILIES.items():
    model = timm.create_model(name, **kwargs)
    inputs = [torch.rand(8, *model.pretrained_cfg['input_size'])]
    if family == 'relational':
        inputs.append(torch.eye(11)[torch.arange(8) % 11])
    target = torch.arange(8) % model.num_classes

    def loss_of(model):
        loss = torch.nn.functional.cross_entropy(model(*inputs), target)
        balance = timm_ait.balance_loss(model)
        return loss if balance is None else loss + 1e-2 * balance

    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3)
    model.train()
    loss = loss_of(model)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        loss_after = loss_of(model).item()

    folder = out / family
    save_for_hf(model, folder, safe_serialization=True, data_config=resolve_data_config({}, model=model))
    repo_id = 'someone/' + family
    card = render_model_card(model, repo_id, dataset)
    (folder / 'README.md').write_text(card)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    with torch.no_grad():
        same_logits = torch.equal(loaded.eval()(*inputs), model.eval()(*inputs))
        # and in training, where the memory write (and with it the bottleneck) acts
        same_logits &= torch.equal(loaded.train()(*inputs), model.train()(*inputs))

    # the card's usage snippet, on the folder instead of the Hub
    snippet = re.search(r'```python\n(.*?)```', card, re.S).group(1).replace(f'hf-hub:{repo_id}', f'local-dir:{folder}')
    size = model.pretrained_cfg['input_size'][1:]
    for image in ('image.png', 'scene.png'):
        Image.new('RGB', size, (200, 30, 30)).save(image)
    namespace = {}
    exec(compile(snippet, 'card usage', 'exec'), namespace)
    report['models'][family] = dict(
        loss=loss.item(), loss_after=loss_after, same_logits=same_logits, card=card,
        usage_output=list(namespace['output'].shape), num_classes=model.num_classes)
print(json.dumps(report))
'''


def declared_floors():
    """{distribution: floor} of pyproject.toml's dependencies; each must have one (``>=``)."""
    with open(ROOT / 'pyproject.toml', 'rb') as f:
        dependencies = tomllib.load(f)['project']['dependencies']
    floors = {}
    for dependency in dependencies:
        requirement = Requirement(dependency)
        lower = [s.version for s in requirement.specifier if s.operator == '>=']
        assert len(lower) == 1, f'{dependency!r}: expected one floor (>=), got {requirement.specifier or "none"}'
        floors[requirement.name] = lower[0]
    return floors


def run_user_script(python, cwd: Path, env: dict) -> dict:
    result = subprocess.run([str(python), '-c', USER_SCRIPT, str(cwd / 'hub')], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f'the user script failed ({result.returncode}):\n{result.stderr[-4000:]}'
    return json.loads(result.stdout.splitlines()[-1])


def check_user_report(report: dict) -> None:
    assert set(report['models']) == {'ait', 'ait_no_bottleneck', 'hmixer', 'relational'}
    for family, result in report['models'].items():
        assert result['loss_after'] < result['loss'], f'{family}: one step did not lower the loss on its batch'
        assert result['same_logits'], f'{family}: the model loaded from its Hub folder computes other logits'
        assert result['usage_output'] == [1, result['num_classes']], family
        assert f'# Model card for {family}' in result['card'], family
    assert 'Bottleneck k: none' in report['models']['ait_no_bottleneck']['card']
    assert 'Visual question answering' in report['models']['relational']['card']


def user_env(tmp_path: Path, **extra) -> dict:
    """No PYTHONPATH and nothing of the user's Hugging Face setup: the subprocess sees its interpreter's packages."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH' and not k.startswith(('HF_', 'HUGGING'))}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1', **extra)
    return env


@pytest.mark.floor
def test_a_user_builds_trains_publishes_and_reloads_every_family(tmp_path):
    """The user script on the source tree, with this interpreter's dependencies (the floors under make test)."""
    work = tmp_path / 'work'
    work.mkdir()
    report = run_user_script(sys.executable, work, user_env(tmp_path, PYTHONPATH=str(ROOT)))
    assert Path(report['timm_ait']).is_relative_to(ROOT)
    check_user_report(report)


@pytest.mark.floor
@pytest.mark.skipif(FLOOR_VENV is None, reason='make test runs this in its environment of the declared floors')
def test_the_floor_run_imports_the_declared_floors():
    """Each dependency at its floor, and found in the floor environment rather than the main one it reuses
    (torch and torchvision excepted: the main environment is pinned to their floors)."""
    site_packages = Path(FLOOR_VENV).resolve()
    for name, floor in declared_floors().items():
        distribution = importlib.metadata.distribution(name)
        assert distribution.version == floor, f'{name}: the floor run has {distribution.version}, pyproject says >={floor}'
        if not name.startswith('torch'):
            where = Path(distribution.locate_file('')).resolve()
            assert where.is_relative_to(site_packages), f'{name} {floor} comes from {where}, not {site_packages}'


def test_every_dependency_declares_one_floor():
    """make test installs the floors by reading each ``>=`` as ``==``: a dependency without one would come unpinned."""
    assert {'torch', 'timm'} <= set(declared_floors())


@pytest.mark.wheel
def test_the_wheel_works_in_a_fresh_environment_outside_the_source_tree(tmp_path):
    # a copy without build leftovers (setuptools packs whatever an earlier build left in build/lib) and
    # without the environments, runs and data sets that a working tree holds at its top
    def leftovers(directory, names):
        top = Path(directory) == ROOT
        return {name for name in names if name in ('__pycache__', '.pytest_cache') or name.endswith('.egg-info')
                or top and (name in ('.git', 'build', 'dist', 'output', 'data', '.cache') or name.startswith('.venv'))}

    source = tmp_path / 'source'
    shutil.copytree(ROOT, source, ignore=leftovers)
    built = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '.', '--no-deps', '-v', '-w', str(tmp_path / 'dist')],
                           cwd=source, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    deprecations = [line for line in (built.stdout + built.stderr).splitlines() if 'deprecat' in line.lower()]
    assert not deprecations, 'building the wheel warns of deprecations:\n' + '\n'.join(deprecations)
    wheel, = (tmp_path / 'dist').glob('timm_ait-*.whl')

    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    installed = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '-q',
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-4000:]
    # the dependencies from this interpreter's environment (no download), after the venv's own packages
    venv_site = Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
                                    capture_output=True, text=True, check=True).stdout.strip())
    ours = [p for p in sys.path if p.endswith('site-packages')]
    (venv_site / 'zz_dependencies.pth').write_text('\n'.join(ours) + '\n')

    work = tmp_path / 'work'
    work.mkdir()
    report = run_user_script(python, work, user_env(tmp_path))
    assert Path(report['timm_ait']).resolve().is_relative_to(venv_site.resolve()), report['timm_ait']
    check_user_report(report)
