#!/usr/bin/env python3
"""Check the deployment paths of timm_ait's models against eager PyTorch.

    python tools/check_deployment.py                      # every model timm_ait registers
    python tools/check_deployment.py -m 'ait_small*' --paths onnx export

For each model (registered size, random weights, batch 2), in eval unless said otherwise:

* ``onnx``: ``torch.onnx.export`` (the default, dynamo-based exporter), run by onnxruntime: the
  logits match eager within 1e-4 relative (max abs difference / max abs logit), and the ONNX graph
  has one output and no input but the model's own: the memory is a constant, never written.
* ``export``: ``torch.export.export``: the program mutates no buffer and its module gives the eager
  logits.
* ``train``: a training step under ``torch.compile(fullgraph=True)`` (backend ``aot_eager``; forward
  with the memory write, cross-entropy and the model's own balance term, and backward) gives the eager
  loss, gradients and written memory.
* ``script``, ``fx``: TorchScript and timm's FX feature extraction (the image models get these, and
  more, from timm's own suite: tools/run_timm_suite.py; the question-answering models only here).

Every path also checks that evaluation wrote no memory. tests/test_deployment.py runs the same
checks on small variants in CI.
"""
import argparse
import copy
import fnmatch
import sys
import time
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import timm
import timm_ait
from timm.models import get_notrace_functions, get_notrace_modules, model_entrypoint

ONNX_RTOL = 1e-4
PATHS = ('onnx', 'export', 'train', 'script', 'fx')


def create_model(name: str, **kwargs) -> torch.nn.Module:
    """The model with random weights (seed 0). A classifier that timm's init leaves at zero (the Mixers')
    is drawn from N(0, 0.02): zero logits, and the zero gradients behind them, would compare equal anywhere."""
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    head = model.get_classifier()
    if isinstance(head, torch.nn.Linear) and not head.weight.any():
        torch.nn.init.normal_(head.weight, std=0.02)
    return model


def example_inputs(model: torch.nn.Module, batch_size: int = 2, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """Images of the model's input size, and for a question-answering model its one-hot questions."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, *model.pretrained_cfg['input_size'], generator=g)
    question_dim = getattr(model, 'question_dim', None)
    if question_dim is None:
        return (images,)
    answers = torch.randint(question_dim, (batch_size,), generator=g)
    return images, F.one_hot(answers, question_dim).float()


def memories(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of every GWL memory buffer (none for the ViT twins and the Mixers)."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith('memory.memory')}


def assert_memory_unchanged(before: Dict[str, torch.Tensor], model: torch.nn.Module, path: str) -> None:
    after = memories(model)
    assert after.keys() == before.keys(), f'{path}: memory buffers {sorted(after)} != {sorted(before)}'
    for name, value in before.items():
        assert torch.equal(after[name], value), f'{path}: evaluation wrote {name}'


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max()
    assert scale > 0, 'the eager reference is all zeros: a comparison with it would prove nothing'
    return ((actual - expected).abs().max() / scale).item()


def check_onnx(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Export with the default exporter, run in onnxruntime; returns the relative error of the logits."""
    import onnxruntime
    model.eval()
    before = memories(model)
    with torch.no_grad():
        expected = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, tuple(inputs), verbose=False)
    proto = program.model_proto
    assert len(proto.graph.output) == 1, f'onnx: {len(proto.graph.output)} outputs, expected the logits only'
    assert len(proto.graph.input) == len(inputs), f'onnx: inputs {[i.name for i in proto.graph.input]}'
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=['CPUExecutionProvider'])
    feeds = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    actual = torch.from_numpy(session.run(None, feeds)[0])
    assert actual.shape == expected.shape, f'onnx: logits of shape {tuple(actual.shape)}, eager {tuple(expected.shape)}'
    error = relative_error(actual, expected)
    assert error <= ONNX_RTOL, f'onnx: logits differ from eager by {error:.2e} relative (> {ONNX_RTOL})'
    assert_memory_unchanged(before, model, 'onnx')
    return error


def check_export(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """``torch.export.export`` in eval: no buffer mutated, the eager logits."""
    model.eval()
    before = memories(model)
    with torch.no_grad():
        expected = model(*inputs)
        program = torch.export.export(model, tuple(inputs))
        # export keeps in-place ops in its graph; the functional form lists every buffer they write
        mutated = program.run_decompositions({}).graph_signature.buffers_to_mutate
        assert not mutated, f'export: the eval program writes buffers {sorted(mutated.values())}'
        exported = program.module()
        actual = exported(*inputs)
    error = relative_error(actual, expected)
    assert error <= 1e-5, f'export: logits differ from eager by {error:.2e} relative'
    assert_memory_unchanged(before, model, 'export')
    assert_memory_unchanged(before, exported, 'export (exported module)')
    return error


def loss_of(model: torch.nn.Module, inputs: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """The training loss: cross-entropy (a GWL adds 1e-2 x its balance loss to the backward itself)."""
    return F.cross_entropy(model(*inputs), targets)


def train_step(model: torch.nn.Module, loss_fn: Callable, inputs, targets) -> Tuple[torch.Tensor, Dict, Dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, inputs, targets)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, memories(model)


def check_compiled_train_step(
        model: torch.nn.Module, inputs: Sequence[torch.Tensor], backend: str = 'aot_eager',
) -> float:
    """A training step whose forward and loss run under ``torch.compile(fullgraph=True)``.

    Compared with the same step in eager mode on a copy: loss, every gradient and the written memory.
    fullgraph=True makes a graph break an error. Returns the largest relative difference seen.
    """
    targets = torch.arange(inputs[0].shape[0]) % model.num_classes
    compiled_model = copy.deepcopy(model)
    start = memories(model)
    torch.manual_seed(0)
    loss, grads, memory = train_step(model, loss_of, inputs, targets)
    torch._dynamo.reset()
    compiled_loss = torch.compile(loss_of, fullgraph=True, backend=backend)
    torch.manual_seed(0)
    c_loss, c_grads, c_memory = train_step(compiled_model, compiled_loss, inputs, targets)
    errors = [relative_error(c_loss, loss)]
    assert grads.keys() == c_grads.keys(), f'train: gradients of {sorted(grads.keys() ^ c_grads.keys())} differ'
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=f'train: gradient of {name}')
        if grads[name].any():
            errors.append(relative_error(c_grads[name], grads[name]))
    trunk = [name for name, g in grads.items() if g.any() and not name.startswith('head.')]
    assert trunk, 'train: only the classifier got a gradient: the comparison would prove little'
    assert memory.keys() == c_memory.keys()
    for name in memory:
        assert not torch.equal(memory[name], start[name]), f'train: the step did not write {name}'
        torch.testing.assert_close(c_memory[name], memory[name], rtol=1e-5, atol=1e-6, msg=f'train: written {name}')
    torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6, msg='train: loss')
    return max(errors)


def check_torchscript(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """``torch.jit.script`` in eval: the eager logits, and no memory written."""
    model.eval()
    with torch.no_grad():
        expected = model(*inputs)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            scripted = torch.jit.script(model)
        before = memories(scripted)
        actual = scripted(*inputs)
    assert_memory_unchanged(before, scripted, 'script')
    error = relative_error(actual, expected)
    assert error <= 1e-5, f'script: logits differ from eager by {error:.2e} relative'
    return error


def fx_feature_extractor(model: torch.nn.Module, return_nodes: List[str] = None) -> torch.fx.GraphModule:
    """timm's FX feature extraction (its leaf modules and functions); the last node by default."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    if return_nodes is None:
        train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
        return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                        eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=return_nodes, tracer_kwargs=tracer_kwargs)


def check_fx(model: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """FX-traced in eval and in training: the eager logits; eval writes no memory, training does."""
    traced = fx_feature_extractor(model.eval()).eval()
    before = memories(traced)
    with torch.no_grad():
        expected = model(*inputs)
        actual, = traced(*inputs).values()
    assert_memory_unchanged(before, traced, 'fx')
    error = relative_error(actual, expected)
    assert error <= 1e-5, f'fx: logits differ from eager by {error:.2e} relative'

    twin = copy.deepcopy(model)
    traced = fx_feature_extractor(model).train()
    torch.manual_seed(0)
    expected = twin.train()(*inputs)
    torch.manual_seed(0)
    actual, = traced(*inputs).values()
    torch.testing.assert_close(actual, expected, msg='fx: training logits')
    for name, value in memories(twin).items():
        torch.testing.assert_close(memories(traced)[name], value, msg=f'fx: training write of {name}')
    return error


CHECKS = {
    'onnx': check_onnx,
    'export': check_export,
    'train': check_compiled_train_step,
    'script': check_torchscript,
    'fx': check_fx,
}


def all_models() -> List[str]:
    return [n for n in timm.list_models() if model_entrypoint(n).__module__.startswith('timm_ait.')]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-m', '--models', nargs='+', default=['*'], metavar='PATTERN',
                        help='fnmatch patterns of timm_ait model names (default: all)')
    parser.add_argument('--paths', nargs='+', default=list(PATHS), choices=PATHS)
    args = parser.parse_args(argv)
    names = [n for n in all_models() if any(fnmatch.fnmatch(n, p) for p in args.models)]
    if not names:
        parser.error(f'no timm_ait model matches {args.models}')
    failures = 0
    for name in names:
        model = create_model(name)
        inputs = example_inputs(model)
        for path in args.paths:
            start = time.perf_counter()
            try:
                error = CHECKS[path](model, inputs)
                result = f'ok, relative difference {error:.1e}'
            except Exception as e:  # report every model and path, then fail
                failures += 1
                result = f'FAILED: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}'
            print(f'{name:28s} {path:7s} {time.perf_counter() - start:6.1f}s  {result}', flush=True)
            torch._dynamo.reset()
    print(f'{failures} failed' if failures else f'all {len(names) * len(args.paths)} checks passed')
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
