"""The analysis tools (timm_ait.analysis and train_scripts/analyze.py) on a tiny AiT."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_ait  # noqa: F401  (registers the models)
from timm_ait.analysis import analyze, diversity_score, slot_attention_maps
from timm_ait.layers import BottleneckGates

TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return timm.create_model('ait_small_patch4_32', **TINY).eval()


def load_analyze_script():
    from timm_ait import analyze as analyze_script  # train_scripts/analyze.py's code
    return analyze_script


@pytest.mark.parametrize('memory_scale', [1.0, 10.0])
def test_maps_diversity_and_energy_of_a_tiny_model(memory_scale):
    model = tiny_model()
    for block in model.blocks:
        block.mlp.memory.memory.mul_(memory_scale)  # larger attractors: a sharper, more selective read
    layers = analyze(model, torch.randn(8, 3, 16, 16))

    assert [layer.name for layer in layers] == ['blocks.0.mlp', 'blocks.1.mlp']
    for layer in layers:
        assert layer.attention.shape == layer.selection_frequency.shape == (6, 4, 4)
        # a slot's gates sum to one over the pool in every head, so its map sums to one
        torch.testing.assert_close(layer.attention.sum(dim=(1, 2)), torch.ones(6))
        assert layer.chance_frequency == pytest.approx(10 / (8 * 16))
        assert 0 <= layer.diversity <= layer.diversity_ceiling == 1
        assert layer.energy_before.shape == layer.energy_after.shape == (8, 16)
        assert torch.all(layer.energy_after <= layer.energy_before)
        summary = layer.summary()
        assert summary['energy']['largest_change'] <= 0
        json.dumps(summary)


def test_diversity_score_of_constructed_gates():
    weights = torch.full((2, 3, 2), 0.5)  # 2 heads, 3 slots, k = 2, over a pool of 6 patches
    every_slot_its_own_pair = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[5, 0], [1, 2], [3, 4]]])
    assert diversity_score(BottleneckGates(weights, every_slot_its_own_pair, 6)) == 1.0
    one_pair_for_all = torch.tensor([[[0, 1]] * 3] * 2)
    assert diversity_score(BottleneckGates(weights, one_pair_for_all, 6)) == pytest.approx(2 / 6)
    # head 0 shares nothing, head 1 one pair: the heads are averaged
    mixed = torch.stack([every_slot_its_own_pair[0], one_pair_for_all[1]])
    assert diversity_score(BottleneckGates(weights, mixed, 6)) == pytest.approx((1 + 2 / 6) / 2)
    # dense attention: every slot takes every patch
    assert diversity_score(BottleneckGates(torch.full((2, 3, 6), 1 / 6), None, 6)) == pytest.approx(1 / 3)


def test_a_collapsed_memory_reads_as_collapsed():
    # every slot the same prior: the same query, so every slot keeps the same k patches in every head
    model = tiny_model()
    for block in model.blocks:
        block.mlp.memory.memory.copy_(torch.randn(1, 8).expand(6, 8))
    batch, tokens, k, heads, slots = 8, 16, 10, 2, 6
    for layer in analyze(model, torch.randn(batch, 3, 16, 16)):
        assert layer.memory_slot_cosine == pytest.approx(1.0)
        assert layer.diversity == pytest.approx(1 / slots)
        # the load alone, k patches of the pool of T taken by all S slots: Var/mean^2 = (T/k - 1) T/(T-1)
        pool = batch * tokens
        assert layer.balance_loss >= heads * (pool / k - 1) * pool / (pool - 1) * (1 - 1e-5)
    for layer in analyze(tiny_model(), torch.randn(batch, 3, 16, 16)):  # the random initial memory
        assert abs(layer.memory_slot_cosine) < 0.5 and layer.diversity > 1 / slots
        assert layer.balance_loss < heads * (batch * tokens / k - 1)


def test_a_question_answering_ait_is_analysed_with_its_questions():
    torch.manual_seed(0)
    model = timm.create_model('ait_small_w256_patch15_75', **dict(TINY, img_size=75)).eval()
    images, questions = torch.rand(4, 3, 75, 75), torch.eye(11)[:4]
    layers = analyze(model, images, questions)
    assert [layer.name for layer in layers] == ['blocks.0.mlp', 'blocks.1.mlp']
    for layer in layers:
        # the 5 x 5 patches only: the question token, last in each sample's tokens, is not on the grid
        assert layer.attention.shape == (6, 5, 5)
        assert torch.all(layer.attention.sum(dim=(1, 2)) <= 1 + 1e-6)
        assert layer.chance_frequency == pytest.approx(10 / (4 * 26))


def test_slot_maps_put_each_selection_at_its_grid_position():
    # a batch of 2 images of 2x2 patches: pool index = sample * 4 + position
    indices = torch.tensor([[[3, 7], [4, 1]]] * 2)  # (heads, slots, k)
    weights = torch.tensor([[[0.5, 0.5], [0.25, 0.75]]] * 2)
    attention, frequency, chance = slot_attention_maps(BottleneckGates(weights, indices, 8), 2, (2, 2))
    # slot 0: position 3 of both samples; slot 1: position 0 of sample 1, position 1 of sample 0
    torch.testing.assert_close(attention, torch.tensor([[[0., 0.], [0., 1.]], [[0.25, 0.75], [0., 0.]]]))
    torch.testing.assert_close(frequency, torch.tensor([[[0., 0.], [0., 1.]], [[0.5, 0.5], [0., 0.]]]))
    assert chance == 2 / 8


def test_analysis_does_not_change_the_model():
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    analyze(model, torch.randn(4, 3, 16, 16))
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert model.balance_loss() is None


def test_model_without_gwl_is_a_clear_error():
    with pytest.raises(ValueError, match='no Global Workspace Layer'):
        analyze(timm.create_model('ait_small_patch4_32', gwl=False, **TINY), torch.randn(2, 3, 16, 16))


def test_analyze_script_writes_png_and_json(tmp_path, capsys):
    analyze_script = load_analyze_script()
    kwargs = [f'{k}={v}' for k, v in TINY.items()]
    out = tmp_path / 'analysis'
    analyze_script.main(['-m', 'ait_small_patch4_32', '--model-kwargs', *kwargs, '--dataset', 'triangle',
                         '--data-dir', str(tmp_path / 'data'), '--num-samples', '6', '-b', '4',
                         '--output', str(out)])
    names = {'analysis.json', 'attention_blocks.0.mlp.png', 'attention_blocks.1.mlp.png', 'energy.png'}
    assert names <= {p.name for p in out.iterdir()}
    for name in names - {'analysis.json'}:
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    result = json.loads((out / 'analysis.json').read_text())
    assert result['dataset'] == 'triangle' and result['num_images'] == 4
    for layer in result['layers']:
        assert 0 <= layer['diversity'] <= 1
        assert layer['energy']['after_mean'] <= layer['energy']['before_mean']
        assert len(layer['attention']) == 6
    assert 'diversity' in capsys.readouterr().out


def test_analyze_script_on_sort_of_clevr_takes_one_question_an_image(tmp_path, capsys):
    analyze_script = load_analyze_script()
    kwargs = [f'{k}={v}' for k, v in dict(TINY, img_size=75).items()]
    out = tmp_path / 'analysis'
    seen = []
    real_analyze = analyze_script.analyze

    def spy(model, images, questions=None):
        seen.append((images, questions))
        return real_analyze(model, images, questions)

    analyze_script.analyze = spy
    analyze_script.main(['-m', 'ait_small_w256_patch15_75', '--model-kwargs', *kwargs, '--dataset', 'sort-of-clevr',
                         '--data-dir', str(tmp_path / 'data'), '--num-samples', '3', '-b', '8',
                         '--output', str(out)])
    from timm_ait.data import SortOfClevr
    dataset = SortOfClevr(root=str(tmp_path / 'data'), split='test', num_images=3, progress=False)
    images, questions = seen[0]
    assert images.shape == (3, 3, 75, 75)  # one item an image, however large the batch asked for
    for i in range(3):  # image i with its question i
        (image, question), _ = dataset[20 * i + i]
        assert torch.equal(images[i], image) and torch.equal(questions[i], question)
    result = json.loads((out / 'analysis.json').read_text())
    assert result['dataset'] == 'sort-of-clevr' and result['num_images'] == 3
    for layer in result['layers']:
        assert -1 <= layer['memory_slot_cosine'] <= 1 and layer['balance_loss'] >= 0
    assert 'slot cosine' in capsys.readouterr().out


@pytest.mark.parametrize('model_name,dataset,message', [
    ('ait_small_w256_patch15_75', 'triangle', 'answers questions about images: analyse it with --dataset'),
    ('ait_small_w256_patch15_75', None, 'answers questions about images'),
    ('ait_small_patch4_32', 'sort-of-clevr', 'classifies images; --dataset sort-of-clevr is for a question-'),
])
def test_analyze_script_refuses_data_the_model_cannot_take(tmp_path, model_name, dataset, message):
    analyze_script = load_analyze_script()
    kwargs = dict(TINY, img_size=75 if model_name.endswith('_75') else 16)
    args = ['-m', model_name, '--model-kwargs', *[f'{k}={v}' for k, v in kwargs.items()],
            '--data-dir', str(tmp_path / 'data'), '--output', str(tmp_path / 'out')]
    with pytest.raises(SystemExit, match=message):
        analyze_script.main(args + (['--dataset', dataset] if dataset else []))
    assert not (tmp_path / 'data').exists() and not (tmp_path / 'out').exists()  # before any work


def test_analyze_script_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    analyze_script = load_analyze_script()
    monkeypatch.setitem(sys.modules, 'matplotlib.figure', None)  # makes the import fail
    with pytest.raises(SystemExit, match="pip install 'timm-ait\\[analysis\\]'"):
        analyze_script.main(['--output', str(tmp_path)])


def test_a_memory_split_into_plus_and_minus_v_is_reported_collapsed():
    """Half the slots v, half -v: the mean cosine is about 0, yet every slot lies on one line (rank 1, |cos| 1)."""
    model = tiny_model()
    v = torch.randn(8)
    signs = torch.tensor([1., -1., 1., -1., 1., -1.])[:, None]
    with torch.no_grad():
        model.blocks[0].mlp.memory.memory.copy_(signs * v)
    layers = analyze(model, torch.randn(2, 3, 16, 16))
    first = layers[0]
    assert abs(first.memory_slot_cosine) < 0.25  # (3 * 2 same-sign pairs - 9 * 2 opposite) / 30 = -0.2
    assert first.memory_abs_cosine == pytest.approx(1.0, abs=1e-5) and first.memory_rank == pytest.approx(1.0, abs=1e-4)
    assert layers[1].memory_rank > 2 and layers[1].memory_abs_cosine < 0.6  # the untouched random memory
