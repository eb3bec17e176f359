"""timm_ait.run_model and timm_ait.checkpoint: the one loader, and the package's shape (layers, no cycles)."""
import argparse
import ast
import os

import pytest
import timm
import torch

import timm_ait  # noqa: F401
from timm_ait.checkpoint import read_checkpoint, with_digest
from timm_ait.run_model import load_run_model, run_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=16, patch_size=8, embed_dim=32, num_heads=2, num_slots=4, slot_dim=8, gwl_heads=2, bottleneck=3)


def trained_checkpoint(tmp_path, model_kwargs, name='ckpt.pth.tar', ema=False, digest=True, **extra):
    """A checkpoint as train.py writes one: weights (a written memory too), arch, args, optionally EMA weights."""
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32', **model_kwargs)
    model.train()(torch.randn(4, 3, 16, 16))  # writes the memory
    args = argparse.Namespace(model='ait_small_patch4_32', model_kwargs=dict(model_kwargs), num_classes=None,
                              img_size=None, mean=None, std=None, **extra)
    state = {'epoch': 0, 'arch': 'ait_small_patch4_32', 'args': args, 'state_dict': model.state_dict()}
    if ema:
        state['state_dict_ema'] = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = tmp_path / name
    torch.save(with_digest(state) if digest else state, path)
    return path, model.eval()


def test_rebuilds_the_runs_model_weights_and_memory(tmp_path):
    path, model = trained_checkpoint(tmp_path, {**TINY, 'beta': 2.0, 'bottleneck': 'none'})
    loaded = load_run_model(str(path))
    assert loaded.settings['model'] == 'ait_small_patch4_32'
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():  # the same function, not only the same tensors: beta and the dense write came along
        torch.testing.assert_close(loaded.model.eval()(x), model(x), rtol=0, atol=0)
    assert loaded.model.blocks[0].mlp.read.beta == 2.0 and loaded.model.blocks[0].mlp.write_attn.bottleneck is None


def test_runs_that_recorded_the_dense_ablation_as_none_still_rebuild_dense(tmp_path):
    path, _ = trained_checkpoint(tmp_path, {**TINY, 'bottleneck': 'none'})
    state = torch.load(path, weights_only=False)
    state['args'].model_kwargs['bottleneck'] = None  # what older versions wrote
    torch.save(with_digest(state), path)
    assert load_run_model(str(path)).model.blocks[0].mlp.write_attn.bottleneck is None


def test_ema_weights_only_when_asked(tmp_path):
    path, model = trained_checkpoint(tmp_path, TINY, ema=True)
    plain = load_run_model(str(path)).model.state_dict()
    ema = load_run_model(str(path), use_ema=True).model.state_dict()
    key = 'blocks.0.mlp.fc1.weight'
    assert torch.equal(plain[key], model.state_dict()[key]) and torch.equal(ema[key], model.state_dict()[key] + 1)
    path2, _ = trained_checkpoint(tmp_path, TINY, name='no_ema.pth.tar')
    with pytest.raises(ValueError, match='no EMA weights'):
        load_run_model(str(path2), use_ema=True)


def test_a_damaged_checkpoint_is_refused(tmp_path):
    path, _ = trained_checkpoint(tmp_path, TINY)
    state = torch.load(path, weights_only=False)
    state['state_dict']['blocks.0.mlp.fc1.weight'][0, 0] += 1  # contents changed after the digest was taken
    torch.save(state, path)
    with pytest.raises(ValueError, match='damaged'):
        load_run_model(str(path))


def test_command_line_contradicting_the_run_is_refused_naming_the_setting(tmp_path):
    path, _ = trained_checkpoint(tmp_path, {**TINY, 'beta': 2.0})
    with pytest.raises(ValueError, match='model setting beta.*beta=2.0.*beta=1.0'):
        load_run_model(str(path), model_kwargs={'beta': 1.0})
    with pytest.raises(ValueError, match='model setting model'):
        load_run_model(str(path), model='ait_base_patch4_32')
    assert load_run_model(str(path), model_kwargs={'beta': 2.0}).model.blocks[0].mlp.read.beta == 2.0


@pytest.mark.parametrize('changed', [dict(beta=2.0), dict(bottleneck='none'), dict(hopfield_steps=2),
                                     dict(memory_l2norm=True), dict(smoothing=0.5), dict(memory_decorrelation=0.05)])
def test_pretrained_file_with_other_settings_than_the_model_is_refused(tmp_path, changed):
    """timm's own pretrained path: the weights fit, the function would not (none of these changes a shape)."""
    path, _ = trained_checkpoint(tmp_path, {**TINY, **changed})
    overlay = dict(file=str(path), num_classes=10)
    name, value = next(iter(changed.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        timm.create_model('ait_small_patch4_32', pretrained=True, pretrained_cfg_overlay=overlay, **TINY)
    same = timm.create_model('ait_small_patch4_32', pretrained=True, pretrained_cfg_overlay=overlay, **{**TINY, **changed})
    assert same.settings() == load_run_model(str(path)).model.settings()


def test_training_args_as_a_dict_or_a_namespace(tmp_path):
    assert run_args({'args': {'model': 'x'}}) == {'model': 'x'}
    assert run_args({'args': argparse.Namespace(model='x')}) == {'model': 'x'}
    assert run_args({}) == {}
    with pytest.raises(ValueError, match="training args are a list, expected an argparse.Namespace or a dict"):
        run_args({'args': ['model']})


def test_checkpoint_without_training_args_needs_a_model_name(tmp_path):
    model = timm.create_model('ait_small_patch4_32', **TINY)
    torch.save(model.state_dict(), tmp_path / 'bare.pth')
    with pytest.raises(ValueError, match='records no training args: give the model name'):
        load_run_model(str(tmp_path / 'bare.pth'))
    loaded = load_run_model(str(tmp_path / 'bare.pth'), model='ait_small_patch4_32', model_kwargs=TINY)
    assert torch.equal(loaded.model.state_dict()['head.weight'], model.state_dict()['head.weight'])
    assert read_checkpoint(str(tmp_path / 'bare.pth')).keys() == model.state_dict().keys()


# ------------------------------------------------------------------ the package's shape

PACKAGE = os.path.join(REPO, 'timm_ait')
# each part of the package with the parts it may import (nothing below imports from above)
LAYERS = {
    'layers': set(),
    'data': {'constants'},
    'checkpoint': set(),
    'constants': set(),
    'version': set(),
    'hub': {'version'},
    'cpu_speed': set(),
    'profiling': set(),
    'memory_probe': {'layers'},
    'models': {'layers', 'checkpoint', 'constants', 'hub', 'version'},
}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
                yield (rel[:-len('.__init__')] if rel.endswith('.__init__') else rel), path


def _imports(module, path):
    """Every timm_ait module ``module`` imports, at module level or inside a function."""
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith('timm_ait')}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(parts + ([base] if base else []))
            if base.startswith('timm_ait'):
                found.add(base)
                found |= {f'{base}.{a.name}' for a in node.names}
    known = dict(_modules())
    return {m for m in found if m in known and m != module}


def test_no_import_cycle_in_the_package():
    graph = {m: _imports(m, p) for m, p in _modules()}
    graph = {m: {d for d in deps if not m.startswith(d + '.')} for m, deps in graph.items()}  # a parent package
    state = {}

    def visit(m, stack):
        state[m] = 'open'
        for d in graph.get(m, ()):
            if state.get(d) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = 'done'

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_nothing_below_imports_from_above():
    problems = []
    for module, path in _modules():
        part = module.split('.')[1] if '.' in module else None
        if part not in LAYERS:
            continue
        for dep in _imports(module, path):
            dep_part = dep.split('.')[1]
            if dep_part != part and dep_part not in LAYERS[part]:
                problems.append(f'{module} imports {dep}')
    assert not problems, problems


def test_torch_load_is_called_in_one_module():
    callers = [m for m, p in _modules() if 'torch.load(' in open(p).read()]
    assert callers == ['timm_ait.checkpoint'], callers


def test_a_hub_folder_that_recorded_the_dense_ablation_as_none_gets_one_line(tmp_path):
    """Earlier versions wrote bottleneck=None into config.json; read back it must not silently build top-k."""
    import json
    from timm.models import save_for_hf
    model = timm.create_model('ait_small_patch4_32', **{**TINY, 'bottleneck': 'none'})
    save_for_hf(model, str(tmp_path / 'hub'), safe_serialization=True)
    config = json.loads((tmp_path / 'hub' / 'config.json').read_text())
    assert config['model_args']['bottleneck'] == 'none'  # what is written now
    config['model_args']['bottleneck'] = None
    (tmp_path / 'hub' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bottleneck=None is ambiguous.*pass bottleneck='none'"):
        timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True)
    dense = timm.create_model(f'local-dir:{tmp_path / "hub"}', pretrained=True, bottleneck='none')
    assert dense.blocks[0].mlp.write_attn.bottleneck is None
    for key, value in model.state_dict().items():
        assert torch.equal(dense.state_dict()[key], value), key
