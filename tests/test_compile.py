"""torch.compile gives the eager outputs, memory write included, also for a whole fullgraph training step."""
import copy
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_ait  # noqa: F401

from tools import check_deployment as deploy

TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)


def test_compiled_model_matches_eager_in_train_and_eval():
    torch.manual_seed(0)
    eager = timm.create_model('ait_small_patch4_32', num_classes=5, depth=1, **TINY)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(4, 3, 16, 16)

    eager.train(), compiled.train()
    y_eager, y_comp = eager(x), compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_model.balance_loss(), eager.balance_loss(), rtol=1e-4, atol=1e-5)
    for blk_e, blk_c in zip(eager.blocks, compiled_model.blocks):
        torch.testing.assert_close(blk_c.mlp.memory.memory, blk_e.mlp.memory.memory, rtol=1e-5, atol=1e-6)

    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    assert compiled_model.balance_loss() is None


def test_a_training_step_with_the_non_finite_guard_captures_in_one_graph():
    """The guard of the memory write is in the graph (torch.where), not a Python branch on a value."""
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32', num_classes=5, depth=1, **TINY).train()

    def loss_of(x, target):
        return torch.nn.functional.cross_entropy(model(x), target) + 1e-2 * model.balance_loss()

    x, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    explained = torch._dynamo.explain(loss_of)(x, target)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    step = torch.compile(loss_of, fullgraph=True, backend='aot_eager')
    memory = model.blocks[0].mlp.memory.memory
    before = memory.clone()
    bad = x.clone()
    bad[2, 1, 5, 5] = float('nan')
    step(bad, target).backward()
    assert torch.equal(memory, before) and timm_ait.skipped_memory_writes(model) == 1
    step(x, target).backward()
    assert torch.isfinite(memory).all() and not torch.equal(memory, before)


# a training step under torch.compile(fullgraph=True): forward with the memory write, cross-entropy plus the
# balance loss, backward; an AiT, an hmixer and the question-answering AiT with both inputs
@pytest.mark.parametrize('name', ['ait_small_patch4_32', 'hmixer_symbreak_s4_32', 'ait_small_patch5_75'])
def test_fullgraph_training_step_gives_the_eager_loss_gradients_and_memory(name):
    model = deploy.create_model(name)
    deploy.check_compiled_train_step(model, deploy.example_inputs(model), backend='aot_eager')


def test_fullgraph_training_step_captures_one_graph():
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32', num_classes=5, depth=1, **TINY).train()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(deploy.loss_of)(model, (x,), y)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_a_training_step_with_the_decorrelating_write_captures_in_one_graph_and_matches_eager():
    model = deploy.create_model('ait_small_patch4_32', num_classes=5, depth=1, memory_decorrelation=0.05, **TINY)
    x = (torch.randn(4, 3, 16, 16),)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(deploy.loss_of)(copy.deepcopy(model), x, torch.arange(4))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    # loss, gradients and the written memory (EWMA and decorrelation step) as in eager mode
    deploy.check_compiled_train_step(model, x, backend='aot_eager')


def test_a_training_step_that_gathers_the_kept_patches_captures_in_one_graph_and_matches_eager():
    """16 images of 17 tokens: k = 10 of 272 patches, so the pooling and the scores' gradient take the gathers."""
    model = deploy.create_model('ait_small_patch4_32', num_classes=5, depth=1, **TINY)
    x = (torch.randn(16, 3, 16, 16),)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(deploy.loss_of)(copy.deepcopy(model), x, torch.arange(16) % 5)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    deploy.check_compiled_train_step(model, x, backend='aot_eager')
