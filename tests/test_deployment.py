"""Deployment paths against eager PyTorch, on the small variants: ONNX through onnxruntime, torch.export,
and for the question-answering AiT (two inputs, outside timm's one-input suite) TorchScript and FX.

The checks are tools/check_deployment.py's, which runs them on every model. timm's own suite
(tests/test_timm_suite.py) covers TorchScript and FX of the image models; compiled training is in
tests/test_compile.py.
"""
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_ait  # noqa: F401
from timm_ait.layers import GlobalWorkspaceLayer

from tools import check_deployment as deploy

# an AiT, an hmixer, and the question-answering AiT with both inputs
MODELS = ('ait_small_patch4_32', 'hmixer_symbreak_s4_32', 'ait_small_patch5_75')


def create(name):
    model = deploy.create_model(name)
    return model, deploy.example_inputs(model)


@pytest.mark.parametrize('name', MODELS)
def test_onnx_runs_in_onnxruntime_with_the_eager_logits(name):
    model, inputs = create(name)
    assert deploy.check_onnx(model, inputs) <= 1e-4


@pytest.mark.parametrize('name', MODELS)
def test_torch_export_gives_the_eager_logits_and_writes_no_memory(name):
    model, inputs = create(name)
    deploy.check_export(model, inputs)


def test_question_answering_model_scripts_and_traces_with_both_inputs():
    model, inputs = create('ait_small_patch5_75')
    assert len(inputs) == 2
    deploy.check_torchscript(model, inputs)
    deploy.check_fx(model, inputs)


def test_a_scripted_gwl_refuses_to_train():
    model = torch.jit.script(timm.create_model('ait_tiny_patch32_64').eval())
    model.train()
    with pytest.raises(Exception, match='runs in eval only'):
        model(torch.randn(2, 3, 64, 64))


def test_traced_and_scripted_models_keep_the_input_errors():
    model, (images, questions) = create('ait_small_patch5_75')
    model.eval()
    scripted = torch.jit.script(model)
    traced = deploy.fx_feature_extractor(model)
    for run in (model, scripted, traced):
        with pytest.raises(Exception, match=r'expected images of shape \(B, 3, 75, 75\).*got \(2, 1, 75, 75\)'):
            run(images[:, :1], questions)
        with pytest.raises(Exception, match=r'got 2 images but 1 questions'):
            run(images, questions[:1])
    mixer = timm.create_model('hmixer_symbreak_s4_32', num_blocks=1, embed_dim=16).eval()
    for run in (mixer, torch.jit.script(mixer), deploy.fx_feature_extractor(mixer)):
        with pytest.raises(Exception, match=r'expected images of shape \(B, 3, 32, 32\).*got \(1, 3, 16, 16\)'):
            run(torch.randn(1, 3, 16, 16))


def test_the_checks_catch_an_eval_that_writes_memory(monkeypatch):
    # the property the checks guard: break it and they fail
    forward = GlobalWorkspaceLayer.forward

    def writing_forward(self, x):
        self.memory.memory.add_(1.0)
        return forward(self, x)

    monkeypatch.setattr(GlobalWorkspaceLayer, 'forward', writing_forward)
    model, inputs = create('ait_tiny_patch32_64')
    with pytest.raises(AssertionError, match='the eval program writes buffers'):
        deploy.check_export(model, inputs)
    with pytest.raises(AssertionError, match='fx: evaluation wrote blocks.0.mlp.memory.memory'):
        deploy.check_fx(model, inputs)
