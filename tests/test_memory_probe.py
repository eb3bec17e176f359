"""The causal memory probe: evaluation with the memory swapped, and the stored memory put back exactly."""
import pytest
import timm
import torch

import timm_ait  # noqa: F401
from timm_ait.memory_probe import SWAPS, memory_swap_accuracy, memory_swapped, swapped_memories

TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)


def _model(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32', num_classes=3, **{**TINY, **kwargs})
    with torch.no_grad():  # a few writes, so the memory is not the raw initial one
        for _ in range(3):
            model.train()(torch.randn(4, 3, 16, 16))
    return model.eval()


def _loader(n=20, batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]  # a last partial batch of 2


def _memories(model):
    return [b.mlp.memory.memory for b in model.blocks]


def test_each_swap_is_what_it_says():
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(6, 8, generator=g) + 0.5
    norms = memory.norm(dim=-1)
    rotated, orthogonal, collapsed = (swapped_memories([memory], s)[0]
                                      for s in ('rotated', 'random_orthogonal', 'collapsed'))
    # a rotation keeps every length and every cosine between slots (the Gram matrix), not the slots
    torch.testing.assert_close(rotated @ rotated.T, memory @ memory.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(rotated, memory, atol=1e-2)
    # orthogonal rows with the stored lengths
    torch.testing.assert_close(orthogonal @ orthogonal.T, torch.diag(norms ** 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(collapsed, memory.mean(0).expand(6, 8))
    # more slots than dimensions: unit frame rows scaled to the lengths
    wide = swapped_memories([torch.randn(12, 4, generator=g)], 'random_orthogonal')[0]
    assert wide.shape == (12, 4)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert [torch.equal(x, y) for x, y in zip(swapped_memories([a, b], 'other_layer'), [b, a])] == [True, True]
    assert torch.equal(swapped_memories([a], 'rotated', seed=3)[0], swapped_memories([a], 'rotated', seed=3)[0])


def test_the_stored_memory_comes_back_bit_for_bit_even_after_an_exception():
    model = _model()
    before = [m.clone() for m in _memories(model)]
    with memory_swapped(model, 'random_orthogonal'):
        assert not any(torch.equal(m, b) for m, b in zip(_memories(model), before))
    assert all(torch.equal(m, b) for m, b in zip(_memories(model), before))
    with pytest.raises(RuntimeError, match='interrupted'):
        with memory_swapped(model, 'collapsed'):
            raise RuntimeError('interrupted')
    assert all(torch.equal(m, b) for m, b in zip(_memories(model), before))
    model.train()
    memory_swap_accuracy(model, _loader())
    assert model.training and all(torch.equal(m, b) for m, b in zip(_memories(model), before))


def _plain_accuracy(model, loader):
    """A generic evaluation loop that knows nothing of memories."""
    model.eval()
    with torch.no_grad():
        hits = torch.cat([model(x).argmax(-1) == y for x, y in loader])
    return 100.0 * hits.sum().item() / len(hits)


def test_a_model_whose_read_ignores_the_memory_scores_the_same_under_every_swap():
    """With the read's up-projection zeroed every attractor is its bias, whatever the memory holds."""
    model = _model()
    for block in model.blocks:
        torch.nn.init.zeros_(block.mlp.read.up.weight)
    results = memory_swap_accuracy(model, _loader())
    assert list(results) == ['stored', *SWAPS]
    expected = _plain_accuracy(model, _loader())
    assert all(value == pytest.approx(expected, abs=1e-9) for value in results.values()), (results, expected)


@pytest.mark.parametrize('swap', SWAPS)
def test_the_default_models_logits_change_under_a_swap(swap):
    model = _model()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        stored = model(x)
        with memory_swapped(model, swap):
            swapped = model(x)
        assert torch.equal(model(x), stored)
    assert (swapped - stored).abs().max() > 1e-3


@pytest.mark.parametrize('hopfield', [True, False])
def test_permuting_the_slots_leaves_eval_unchanged(hopfield):
    """Why there is no 'shuffled' swap: both reads are a sum over the slots, which has no order."""
    model = _model(hopfield=hopfield)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        stored = model(x)
        for memory in _memories(model):
            memory.copy_(memory[torch.randperm(memory.shape[0], generator=torch.Generator().manual_seed(4))])
        torch.testing.assert_close(model(x), stored, rtol=1e-5, atol=1e-5)


def test_misuse_is_refused_before_any_evaluation():
    model = _model(depth=1)

    class Loader(list):
        def __iter__(self):
            raise AssertionError('evaluated before refusing')
    with pytest.raises(ValueError, match="'other_layer' swap needs two"):
        memory_swap_accuracy(model, Loader(), swaps=['other_layer'])
    with pytest.raises(ValueError, match="unknown memory swap 'shuffled'"):
        memory_swap_accuracy(model, Loader(), swaps=['shuffled'])
    with pytest.raises(ValueError, match='has no GlobalWorkspaceLayer'):
        memory_swap_accuracy(timm.create_model('ait_small_patch4_32', gwl=False, **TINY), Loader())
    assert list(memory_swap_accuracy(model, _loader())) == ['stored', 'rotated', 'random_orthogonal', 'collapsed']
