"""Plain ``torch.fx.symbolic_trace``, as torchvision's feature extraction and FX graph-mode quantization call it,
on every registered model of timm_ait: no timm tracer, no leaf registry.

The reference is the eager model itself: the traced graph must give its logits bit for bit, and a wrong input
must raise the eager model's error, word for word (the input checks stay in the graph as leaves).
"""
import pytest
import timm
import torch

import timm_ait  # noqa: F401
from timm_ait.layers import GlobalWorkspaceLayer
from timm_ait.models.ait_relational import RelationalAssociativeTransformer

MODELS = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith('timm_ait.'))


def _inputs(model, images):
    """The model's inputs: the images, and for a question-answering model a question per image."""
    if not isinstance(model, RelationalAssociativeTransformer):
        return (images,)
    return images, torch.nn.functional.one_hot(torch.arange(images.shape[0]), model.question_dim).float()


def _error(run, *inputs) -> str:
    with pytest.raises(ValueError) as info:
        run(*inputs)
    return str(info.value)


def test_every_model_family_is_traced():
    assert {n.split('_')[0] for n in MODELS} == {'ait', 'hmixer'}
    assert 'ait_small_patch5_75' in MODELS  # the question-answering AiT, two inputs


# the logits are compared on real weights for the models under this size; the larger ones are traced with their
# weights on the meta device (tracing runs no kernel), which keeps the test to seconds
NUMERIC_MAX_PARAMS = 20e6


@pytest.mark.parametrize('name', MODELS)
def test_symbolic_trace_gives_the_eager_logits_and_keeps_the_input_check(name):
    torch.manual_seed(0)
    with torch.device('meta'):
        model = timm.create_model(name).eval()
    numeric = sum(p.numel() for p in model.parameters()) < NUMERIC_MAX_PARAMS
    if numeric:
        model = timm.create_model(name).eval()
    C, H, W = model.pretrained_cfg['input_size']
    inputs = _inputs(model, torch.randn(1, C, H, W))

    traced = torch.fx.symbolic_trace(model)
    if numeric:
        with torch.no_grad():
            assert torch.equal(traced(*inputs), model(*inputs))

    # the checks run before any weight is touched, so they raise on meta weights too
    one_channel = _inputs(model, torch.randn(2, 1, H, W))
    assert _error(traced, *one_channel) == _error(model, *one_channel)
    smaller = _inputs(model, torch.randn(2, C, H // 2, W // 2))
    assert _error(traced, *smaller) == _error(model, *smaller)

    if name.endswith('_s4_32'):
        # one hmixer of each block type: nothing but dropout (off here) differs in training, and plain FX traces
        # that too. Not the AiTs: plain FX traces into the GWL, whose training write is a leaf only for tracers
        # told so (timm's, or torchvision's with leaf_modules=[GlobalWorkspaceLayer])
        assert not any(isinstance(m, GlobalWorkspaceLayer) for m in model.modules())
        model.train()
        assert torch.equal(torch.fx.symbolic_trace(model)(*inputs), model(*inputs))


def test_the_question_check_stays_in_the_traced_graph():
    model = timm.create_model('ait_small_w256_patch15_75', depth=1).eval()
    images, questions = _inputs(model, torch.randn(2, 3, 75, 75))
    traced = torch.fx.symbolic_trace(model)
    for bad in (questions[:1], questions[:, :5]):
        assert _error(traced, images, bad) == _error(model, images, bad)
