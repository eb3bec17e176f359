"""The explicit memory's diagnostics, and the write that keeps its priors distinct."""
import math
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import timm_ait  # noqa: F401
from timm_ait.layers import (
    ExplicitMemory, GlobalWorkspaceLayer, decorrelation_step, mean_abs_slot_cosine, mean_slot_cosine, memory_by_layer,
    memory_participation_rank, memory_slot_similarity,
)


def test_slot_similarity_is_the_mean_cosine_of_distinct_slot_pairs():
    memory = ExplicitMemory(num_slots=4, slot_dim=3, init='identity')  # rows e0, e1, e2 and 0
    assert memory.slot_similarity() == 0.0
    with torch.no_grad():
        memory.memory.copy_(torch.tensor([[1., 0, 0], [2., 0, 0], [0, 3., 0], [-1., 0, 0]]))
    # pairs: (0,1) 1, (0,2) 0, (0,3) -1, (1,2) 0, (1,3) -1, (2,3) 0 -> mean -1/6
    assert memory.slot_similarity() == pytest.approx(-1 / 6)
    with torch.no_grad():
        memory.memory.copy_(torch.randn(1, 3).expand(4, 3) * torch.tensor([[1.], [2.], [3.], [4.]]))
    assert memory.slot_similarity() == pytest.approx(1.0)
    model = torch.nn.Sequential(memory, ExplicitMemory(num_slots=4, slot_dim=3, init='identity'))
    assert memory_slot_similarity(model) == pytest.approx(0.5)
    assert memory_slot_similarity(torch.nn.Linear(2, 2)) is None


def _tool():
    from tools import memory_collapse
    return memory_collapse


def test_memory_collapse_tool_write_variants():
    """The experiments' candidate writes: 'polar' at full strength gives the polar factor's orthonormal rows at
    the stored lengths; 'centre' adds nothing common to all slots."""
    tool = _tool()
    memory = torch.randn(5, 7, dtype=torch.float64) + 1.0
    new = memory + tool.polar_step(memory, 1.0)
    torch.testing.assert_close(new @ new.T, torch.diag(memory.norm(dim=-1) ** 2))
    layer = GlobalWorkspaceLayer(16, num_slots=5, slot_dim=7, gwl_heads=1, bottleneck=4).train()
    tool.use_variant(layer, 'centre')
    before = layer.memory.memory.clone()
    layer(torch.randn(2, 6, 16))
    torch.testing.assert_close((layer.memory.memory - before).mean(0), torch.zeros(7), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match='unknown write variant'):
        tool.use_variant(layer, 'whiten=0.1')


def test_memory_collapse_tool_measures_the_write_pulling_slots_together():
    """tools/memory_collapse.py at toy size: the default write's slots drift together, the unit-row write's faster."""
    import argparse
    tool = _tool()
    args = argparse.Namespace(dim=32, pool=64, k=8, slots=8, slot_dim=8, heads=2, writes=200, report=[1, 200], seed=0)
    default = [cos for _, cos, _ in tool.ours(args, l2=False)]
    unit_rows = [cos for _, cos, _ in tool.ours(args, l2=True)]
    assert default[0] < 0.1 and default[1] > 0.8, default
    assert unit_rows[1] > 0.99, unit_rows


# --- measures that a +-v split cannot fool -------------------------------------------------------------------

def _plus_minus_v(num_slots=32, slot_dim=32, noise=1e-3, seed=0):
    """Half the slots along +v, half along -v, with lengths of their own and a little noise."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(slot_dim, generator=g)
    signs = torch.tensor([1., -1.]).repeat_interleave(num_slots // 2)
    lengths = 1 + torch.rand(num_slots, generator=g)
    return (signs * lengths)[:, None] * v + noise * torch.randn(num_slots, slot_dim, generator=g)


def test_a_plus_minus_v_memory_is_collapsed_though_its_mean_cosine_is_about_zero():
    memory = _plus_minus_v()
    # 16 x 15 pairs with cosine +1 and 16 x 16 with -1 among the 32 x 31 ordered pairs: -1/31
    assert mean_slot_cosine(memory) == pytest.approx(-1 / 31, abs=1e-3)
    assert mean_abs_slot_cosine(memory) == pytest.approx(1.0, abs=1e-3)
    assert memory_participation_rank(memory) == pytest.approx(1.0, abs=1e-3)


def test_participation_rank_by_first_principles():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(1)))
    assert memory_participation_rank(q[:20]) == pytest.approx(20.0, rel=1e-6)  # 20 orthonormal rows
    assert mean_abs_slot_cosine(q[:20]) == pytest.approx(0.0, abs=1e-6)
    # orthogonal rows of lengths r: the singular values are r, so the rank is (sum r^2)^2 / sum r^4
    lengths = torch.tensor([1., 2., 3., 4.], dtype=torch.float64)
    expected = float(lengths.pow(2).sum() ** 2 / lengths.pow(4).sum())
    assert memory_participation_rank(lengths[:, None] * q[:4].double()) == pytest.approx(expected, rel=1e-6)
    # any rank-one memory: exactly one direction, whatever the lengths and signs of its rows
    assert memory_participation_rank(torch.randn(12, 1) * torch.randn(1, 7)) == pytest.approx(1.0, rel=1e-6)
    assert memory_participation_rank(torch.zeros(4, 3)) == 0.0


def test_a_random_gaussian_memory_is_not_collapsed():
    """N(0, 1) rows, S = m = 32: E sum s^2 = S m, E sum s^4 = S m (S + m + 1) (Wishart moments), so the rank is
    about S m / (S + m + 1) = 15.75; independent directions in m dimensions have E|cos| = Gamma(m/2) /
    (sqrt(pi) Gamma((m + 1)/2)), 0.1421 for m = 32. Averaged over 20 memories."""
    g = torch.Generator().manual_seed(2)
    memories = [torch.randn(32, 32, generator=g) for _ in range(20)]
    ranks = torch.tensor([memory_participation_rank(m) for m in memories])
    cosines = torch.tensor([mean_abs_slot_cosine(m) for m in memories])
    assert ranks.mean().item() == pytest.approx(32 * 32 / 65, rel=0.05)
    expected_cos = math.exp(math.lgamma(16) - math.lgamma(16.5)) / math.sqrt(math.pi)
    assert cosines.mean().item() == pytest.approx(expected_cos, rel=0.03)


def test_memory_by_layer_names_every_memory():
    model = torch.nn.Sequential(ExplicitMemory(4, 3, init='identity'), torch.nn.Linear(2, 2),
                                ExplicitMemory(4, 3, init='identity'))
    with torch.no_grad():
        model[2].memory.copy_(_plus_minus_v(4, 3))
    ranks = memory_by_layer(model)
    assert list(ranks) == ['0', '2']
    assert ranks['0'] == pytest.approx(3.0) and ranks['2'] == pytest.approx(1.0, abs=1e-3)
    cosines = memory_by_layer(model, mean_abs_slot_cosine)
    assert cosines['0'] == 0.0 and cosines['2'] == pytest.approx(1.0, abs=1e-3)
    assert memory_by_layer(torch.nn.Linear(2, 2)) == {}


# --- the decorrelating write --------------------------------------------------------------------------------

def _reference_decorrelation(memory, eta):
    """The issue's formula, one slot at a time: M_i - eta |M_i| (I - u_i u_i^T) sum_{j != i} c_ij u_j."""
    out = memory.clone()
    unit = [row / row.norm() for row in memory]
    for i, u_i in enumerate(unit):
        push = sum((u_i @ u_j) * u_j for j, u_j in enumerate(unit) if j != i)
        projector = torch.eye(len(u_i), dtype=memory.dtype) - torch.outer(u_i, u_i)
        out[i] = memory[i] - eta * memory[i].norm() * projector @ push
    return out


def test_decorrelation_step_is_the_orthogonal_iteration_step():
    g = torch.Generator().manual_seed(3)
    memory = torch.randn(6, 5, generator=g, dtype=torch.float64) + 2.0  # correlated rows
    step = decorrelation_step(memory, 0.1)
    torch.testing.assert_close(memory + step, _reference_decorrelation(memory, 0.1))
    # a descent step on the squared cosines: its direction is minus the gradient of
    # 1/4 sum_{i != j} c_ij^2 with respect to u_i, projected on the sphere, scaled by |M_i|
    unit = (memory / memory.norm(dim=-1, keepdim=True)).requires_grad_()
    cos = unit @ unit.T
    (0.25 * (cos.pow(2).sum() - cos.diagonal().pow(2).sum())).backward()
    u = unit.detach()
    riemannian = unit.grad - (unit.grad * u).sum(-1, keepdim=True) * u
    torch.testing.assert_close(step, -0.1 * memory.norm(dim=-1, keepdim=True) * riemannian)
    # nothing to do for orthogonal rows
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    assert decorrelation_step(3 * q, 0.1).abs().max() < 1e-12


def test_a_decorrelating_write_is_the_ewma_then_the_step_with_the_gradient_of_the_ewma():
    torch.manual_seed(4)
    memory = ExplicitMemory(6, 5, decorrelation=0.2)
    current = memory.read()
    candidate = torch.randn(6, 5, requires_grad=True)
    new = memory.write(candidate, current)
    ewma = 0.9 * current + 0.1 * candidate.detach()
    torch.testing.assert_close(memory.memory, _reference_decorrelation(ewma, 0.2))
    torch.testing.assert_close(new.detach(), memory.memory)
    weights = torch.randn(6, 5)
    (new * weights).sum().backward()
    # straight through: the gradient to the candidate is that of the EWMA alone
    torch.testing.assert_close(candidate.grad, 0.1 * weights)


def test_a_decorrelating_write_with_unit_rows_normalises_before_and_after_the_step():
    torch.manual_seed(5)
    memory = ExplicitMemory(6, 5, l2_normalize=True, decorrelation=0.2)
    current, candidate = memory.read(), torch.randn(6, 5)
    memory.write(candidate, current)
    unit = torch.nn.functional.normalize
    expected = unit(_reference_decorrelation(unit(0.9 * current + 0.1 * candidate, dim=-1), 0.2), dim=-1)
    torch.testing.assert_close(memory.memory, expected)
    torch.testing.assert_close(memory.memory.norm(dim=-1), torch.ones(6))


@pytest.mark.parametrize('bad', [-0.1, 1.5, float('nan'), '1e-2', True])
def test_decorrelation_strength_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match='decorrelation must be in'):
        ExplicitMemory(4, 3, decorrelation=bad)


def test_with_frozen_weights_the_paper_write_collapses_and_the_decorrelating_write_does_not():
    """A small GWL writes 200 pools of Gaussian patches (no training): the paper's EWMA drives its 8 slots to
    one direction; one decorrelation step per write keeps most of the 8 directions (8 orthogonal rows of equal
    length would give exactly 8)."""
    def after_writes(decorrelation):
        torch.manual_seed(0)
        layer = GlobalWorkspaceLayer(32, num_slots=8, slot_dim=8, gwl_heads=2, bottleneck=8,
                                     memory_decorrelation=decorrelation).train()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _ in range(200):
                layer(torch.randn(1, 64, 32, generator=gen))
        return memory_participation_rank(layer.memory.memory), mean_abs_slot_cosine(layer.memory.memory)

    paper_rank, paper_cos = after_writes(0.0)
    rank, cos = after_writes(0.05)
    assert paper_rank < 1.5 and paper_cos > 0.8, (paper_rank, paper_cos)
    assert rank > 6 and cos < 0.2, (rank, cos)


def test_the_model_keyword_reaches_every_memory_and_leaves_eval_as_it_was():
    kwargs = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)
    torch.manual_seed(0)
    paper = timm.create_model('ait_small_patch4_32', num_classes=3, **kwargs)
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32', num_classes=3, memory_decorrelation=0.05, **kwargs)
    assert [b.mlp.memory.decorrelation for b in model.blocks] == [0.05, 0.05]
    assert [b.mlp.memory.decorrelation for b in paper.blocks] == [0.0, 0.0]  # the registered default
    x = torch.randn(4, 3, 16, 16)
    paper.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), paper(x))  # eval reads the stored memory and writes nothing
    paper.train(), model.train()
    with torch.no_grad():
        paper(x), model(x)
    assert not torch.equal(model.blocks[0].mlp.memory.memory, paper.blocks[0].mlp.memory.memory)


class _Writer(torch.nn.Module):
    """A memory written inside a DDP forward, the only place where its writes are averaged over ranks."""

    def __init__(self, memory):
        super().__init__()
        self.memory, self.gain = memory, torch.nn.Parameter(torch.ones(()))

    def forward(self, current, candidate):
        return self.memory.write(candidate * self.gain, current)


def _write_on_rank(rank, world_size, rdzv, out_dir):
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rdzv}', rank=rank, world_size=world_size)
    try:
        memory = ExplicitMemory(6, 5, decorrelation=0.2)
        current, candidate = _rank_inputs(rank)
        DistributedDataParallel(_Writer(memory))(current, candidate)
        torch.save(memory.memory, os.path.join(out_dir, f'rank{rank}.pth'))
    finally:
        dist.destroy_process_group()


def _rank_inputs(rank):
    g = torch.Generator().manual_seed(10 + rank)  # a memory and a candidate of each rank's own
    return torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) + 1.0


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_the_decorrelation_step_runs_on_the_rank_average(tmp_path):
    mp.spawn(_write_on_rank, args=(2, str(tmp_path / 'rdzv'), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f'rank{r}.pth') for r in (0, 1))
    assert torch.equal(a, b)
    ewmas = [0.9 * current + 0.1 * candidate for current, candidate in map(_rank_inputs, (0, 1))]
    torch.testing.assert_close(a, _reference_decorrelation((ewmas[0] + ewmas[1]) / 2, 0.2))
