"""The explicit memory's diagnostics."""
import pytest
import torch

from timm_ait.layers import ExplicitMemory, memory_slot_similarity


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


def test_memory_collapse_tool_measures_the_write_pulling_slots_together():
    """tools/memory_collapse.py at toy size: the default write's slots drift together, the unit-row write's faster."""
    import argparse
    from tools import memory_collapse as tool
    args = argparse.Namespace(dim=32, pool=64, k=8, slots=8, slot_dim=8, heads=2, writes=200, report=[1, 200], seed=0)
    default = [cos for _, cos, _ in tool.ours(args, l2=False)]
    unit_rows = [cos for _, cos, _ in tool.ours(args, l2=True)]
    assert default[0] < 0.1 and default[1] > 0.8, default
    assert unit_rows[1] > 0.99, unit_rows
