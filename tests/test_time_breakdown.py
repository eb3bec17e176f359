"""Where a step's time goes: operators charged to the module whose forward made them, backward included."""
import json

import pytest
import torch
from torch import nn

from timm_ait.time_breakdown import OUTSIDE, format_breakdown, module_ranges, time_breakdown


class TwoBranches(nn.Module):
    """A wide product (``wide``) and a narrow one (``narrow``) on the same input, summed."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(256, 1024)
        self.narrow = nn.Linear(256, 2)
        self.blocks = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))

    def forward(self, x):
        x = self.blocks(x)
        return self.wide(x).sum(-1) + self.narrow(x).sum(-1)


def profiled_step(model, x):
    model(x).pow(2).mean().backward()  # first calls initialise kernels: not what a step costs
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, module_ranges(model):
        loss = model(x).pow(2).mean()
        loss.backward()
    return time_breakdown(prof.events())


def test_forward_and_backward_operators_are_charged_to_their_module():
    torch.manual_seed(0)
    model = TwoBranches()
    breakdown = profiled_step(model, torch.randn(512, 256))
    modules = breakdown['modules']
    # each layer's products: forward addmm, and in the backward the products for its weight and input
    # (times are not compared: a test checks where time is charged, not how much a shared machine gives)
    for name in ('wide', 'narrow'):
        ops = modules[name]['ops']
        assert 'aten::addmm (forward)' in ops and 'aten::mm (backward)' in ops, (name, list(ops))
        assert modules[name]['backward_ms'] > 0 and modules[name]['forward_ms'] > 0
    # the layers of a stack are one row; the loss (outside any module) is its own row, backward included
    assert 'blocks.*' in modules and 'blocks.0' not in modules
    assert not any(op.startswith('aten::mm') for op in modules[OUTSIDE]['ops'])
    assert any(op.endswith('(backward)') for op in modules[OUTSIDE]['ops'])  # the loss's pow and mean
    assert not any(op.startswith('aten::pow') for m in ('wide', 'narrow', 'blocks.*') for op in modules[m]['ops'])
    # a partition of the operators' time
    assert sum(m['total_ms'] for m in modules.values()) == pytest.approx(breakdown['total_ms'])
    assert sum(o['self_ms'] for o in breakdown['ops'].values()) == pytest.approx(breakdown['total_ms'])
    json.dumps(breakdown)  # written by train.py --profile


def test_layers_are_kept_apart_when_asked_and_the_hooks_go_away():
    model = TwoBranches()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, module_ranges(model):
        model(torch.randn(8, 256)).sum().backward()
    assert {'blocks.0', 'blocks.1'} <= set(time_breakdown(prof.events(), group_layers=False)['modules'])
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_the_table_lists_both_models_and_their_difference():
    model = TwoBranches()
    a = profiled_step(model, torch.randn(64, 256))
    b = profiled_step(model, torch.randn(64, 256))
    table = format_breakdown([a, b], ['A', 'B'], 'modules', steps=1)
    assert table.splitlines()[0] == '| module | A ms/step | B ms/step | difference |'
    assert '| wide |' in table and table.splitlines()[-1].startswith('| all operators |')
