"""The model carries its balance term: a generic training loop that computes only its task loss gets, in one step,
the gradient of the explicit ``CE + 1e-2 * balance``, however the trainer scales or splits that loss.

References come from outside the code under test: a loop that knows nothing of AiT, a model built with the term
off (``balance_loss_coef=0``), and the balance loss recomputed from the gates by its definition (AiT eq. 4-6: per
head, the squared coefficient of variation of each patch's importance plus that of its load), read by a forward
hook on the bottleneck attention. Each step's *share* of the term is the projection of the model's gradient
change (against CE alone) on the reference's: 1 means the term counted once, 0 not at all, 2 twice.
"""
import copy
import os

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt
from torch.nn.parallel import DistributedDataParallel

import timm_ait
from timm_ait.layers import BottleneckAttention

COEF = 1e-2
# 8 images of 4 patches pool 32 patches, of which the top-k keeps 16: the gates really select
MODEL = dict(model_name='ait_tiny_patch32_64', num_classes=3, bottleneck=16)


def build(coef: float) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights and memory for every coefficient
    return timm.create_model(**MODEL, balance_loss_coef=coef).train()


def micro_batches(n: int, seed: int = 1, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


def reference_balance(weights, indices, num_patches, eps=1e-10):
    """Eq. 4-6 from the gates of one layer: weights (H, S, k) of the patches ``indices`` (H, S, k) that each slot
    kept (all T patches, in order, when indices is None)."""
    weights = weights.float()
    if indices is None:
        indices = torch.arange(num_patches).expand_as(weights)
    kept = F.one_hot(indices, num_patches).float()                   # H, S, k, T
    importance = (weights.unsqueeze(-1) * kept).sum((1, 2))          # H, T
    load = kept.sum((1, 2))                                          # H, T: slots that kept the patch

    def cv2(v):
        return v.var(-1) / (v.mean(-1) ** 2 + eps)
    return (cv2(importance) + cv2(load)).sum()


class GateRecorder:
    """Keeps the gates of every bottleneck attention of a model; :meth:`take` is their balance loss since last."""

    def __init__(self, model):
        self.gates = []
        for m in model.modules():
            if isinstance(m, BottleneckAttention):
                m.register_forward_hook(lambda mod, args, out: self.gates.append(out[1]))

    def take(self):
        gates, self.gates = self.gates, []
        return sum(reference_balance(g.weights, g.indices, g.num_patches) for g in gates)


def flat_grad(model):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().float()
                      for p in model.parameters()])


def one_step(model, batches, term=None, divide=False, dtype=None, scaler=None, before=None):
    """One optimizer step of a generic loop: per micro-batch ``CE(model(x), y)`` (plus ``term()``), divided by the
    number of micro-batches if ``divide`` (timm's train.py), through ``scaler`` if given; returns the gradient."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        if before is not None:
            before(model)
        with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
            if term is not None:
                loss = loss + term()
        if divide:
            loss = loss / len(batches)
        (loss if scaler is None else scaler.scale(loss)).backward()
    grad = flat_grad(model)
    return grad if scaler is None else grad / scaler.get_scale()


def share(grad, ce_only, explicit):
    """How much of the explicit term's gradient ``grad`` holds: 1 once, 0 none, 2 twice."""
    term = explicit - ce_only
    return float((grad - ce_only) @ term / (term @ term))


def compare(step, rtol=1e-4, atol=1e-6, share_tol=1e-3):
    """Run ``step(model, term)`` on the model with its own term, and on coef-0 twins with CE alone and with the
    explicit term; the model's gradient must be the explicit one, and its share of the term 1."""
    model, ce_only, explicit = build(COEF), build(0), build(0)
    recorder = GateRecorder(explicit)
    g_model = step(model, None)
    g_ce = step(ce_only, None)
    g_explicit = step(explicit, lambda: COEF * recorder.take())
    term = (g_explicit - g_ce).norm() / g_explicit.norm()
    assert term > 1e-4, f'the balance term is {term:.1e} of the gradient: too small to be seen'
    s = share(g_model, g_ce, g_explicit)
    print(f'share of the balance term: {s:.6f} (term {term:.1e} of the gradient)')
    assert abs(s - 1) < share_tol, s
    torch.testing.assert_close(g_model, g_explicit, rtol=rtol, atol=atol)
    return model


def test_float32_one_step():
    batches = micro_batches(1)
    compare(lambda m, term: one_step(m, batches, term))


def test_bfloat16_autocast_one_step():
    batches = micro_batches(1)
    compare(lambda m, term: one_step(m, batches, term, dtype=torch.bfloat16), rtol=2e-2, atol=1e-4, share_tol=1e-2)


def test_float16_autocast_is_refused_before_any_work_unless_the_loss_scale_is_declared():
    model = build(COEF)
    memory = [blk.mlp.memory.memory.clone() for blk in model.blocks]
    with pytest.raises(RuntimeError, match='float16 autocast with balance_loss_coef=0.01.*--amp-dtype bfloat16'):
        one_step(model, micro_batches(1), dtype=torch.float16)
    assert all(torch.equal(blk.mlp.memory.memory, m) for blk, m in zip(model.blocks, memory))
    build(0)(micro_batches(1)[0][0])  # with the term off there is nothing to scale
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        model(micro_batches(1)[0][0])  # nor without a backward to come


def test_float16_autocast_with_a_gradient_scaler_and_the_declared_scale():
    batches = micro_batches(1)

    def step(model, term):
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 12)
        return one_step(model, batches, term, dtype=torch.float16, scaler=scaler,
                        before=lambda m: timm_ait.set_balance_loss_scale(m, scaler.scale(torch.ones(()))))
    compare(step, rtol=2e-2, atol=1e-3, share_tol=1e-2)


def test_undeclared_gradient_accumulation_is_refused_at_the_second_backward():
    with pytest.raises(RuntimeError, match='two backwards carried the balance term.*--grad-accum-steps'):
        one_step(build(COEF), micro_batches(2), divide=True)


@pytest.mark.parametrize('divide', [True, False], ids=['divided_by_k', 'summed'])
def test_gradient_accumulation_with_the_declared_scale(divide):
    batches = micro_batches(3)
    scale = 1 / len(batches) if divide else 1.0
    compare(lambda m, term: one_step(m, batches, term, divide=divide,
                                     before=lambda m: timm_ait.set_balance_loss_scale(m, scale)))


@pytest.mark.parametrize('reentrant', [False, True])
def test_gradient_checkpointing_counts_the_term_once(reentrant):
    batches = micro_batches(1)
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        def step(model, term):
            model.set_grad_checkpointing(term is None and model.blocks[0].mlp.balance_loss_coef > 0)
            return one_step(model, batches, term)
        compare(step)
    finally:
        set_reentrant_ckpt(before)


def test_compiled_fullgraph_step_in_one_graph():
    batches = micro_batches(1)
    torch._dynamo.reset()

    def step(model, term):
        if model.blocks[0].mlp.balance_loss_coef == 0:
            return one_step(model, batches, term)
        explained = torch._dynamo.explain(copy.deepcopy(model))(batches[0][0])  # a copy: the same memory after
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        return one_step(torch.compile(model, fullgraph=True, backend='aot_eager'), batches)
    compare(step, rtol=1e-3, atol=1e-5)


def test_two_forwards_before_one_backward_count_once_each():
    (x1, y1), (x2, y2) = micro_batches(2)

    def step(model, term):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x1), y1) + F.cross_entropy(model(x2), y2)
        if term is not None:
            loss = loss + term()  # the recorder holds the gates of both forwards
        loss.backward()
        return flat_grad(model)
    compare(step)


def test_a_forward_never_backpropagated_leaves_nothing_behind():
    unused, = micro_batches(1, seed=3)
    batches = micro_batches(1)

    def step(model, term):
        model(unused[0])  # a training forward whose output is dropped (it writes the memory)
        if term is not None:
            term()  # forget its gates
        other = torch.randn(3, requires_grad=True)
        other.square().sum().backward()  # an unrelated backward
        assert all(p.grad is None for p in model.parameters())
        return one_step(model, batches, term)
    compare(step)


def test_steps_with_an_optimizer_follow_the_explicit_loss():
    """Three AdamW (foreach) steps: parameter updates between backwards are no accumulation, and the trajectory
    is that of the explicit loss."""
    batches = micro_batches(3)
    models = {}
    for name, coef in (('model', COEF), ('explicit', 0)):
        model = models[name] = build(coef)
        recorder = GateRecorder(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            if name == 'explicit':
                loss = loss + COEF * recorder.take()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, p), q in zip(models['model'].named_parameters(), models['explicit'].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(flat_grad(models['model']), flat_grad(build(0)))


def test_eval_carries_no_term():
    x, y = micro_batches(1)[0]
    model, ce_only = build(COEF), build(0)
    for m in (model, ce_only):
        m.eval()
        F.cross_entropy(m(x), y).backward()
    assert model.balance_loss() is None
    assert torch.equal(flat_grad(model), flat_grad(ce_only))


def test_the_logged_value_is_detached_and_the_model_can_be_copied():
    x, y = micro_batches(1)[0]
    model = build(COEF)
    recorder = GateRecorder(model)
    F.cross_entropy(model(x), y).backward()
    value = model.balance_loss()
    assert not value.requires_grad and value.grad_fn is None
    torch.testing.assert_close(value, recorder.take().detach(), rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(model)  # an EMA or SWA copy made mid-training
    torch.testing.assert_close(twin.balance_loss(), value)


@pytest.mark.parametrize('coef', [-1e-2, float('nan'), '0.01', True])
def test_a_bad_coefficient_is_refused_at_construction(coef):
    with pytest.raises(ValueError, match='balance_loss_coef must be a number >= 0'):
        timm.create_model(**MODEL, balance_loss_coef=coef)


def _ddp_rank(rank, world_size, rdzv, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{rdzv}', rank=rank, world_size=world_size)
    try:
        batches = micro_batches(1, seed=10 + rank)  # different data on every rank
        grads = {}
        for name, coef in (('model', COEF), ('ce_only', 0), ('explicit', 0)):
            model = build(coef)
            recorder = GateRecorder(model)
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
            term = (lambda: COEF * recorder.take()) if name == 'explicit' else None
            grads[name] = one_step(ddp, batches, term)
        torch.save(grads, os.path.join(out_dir, f'grads{rank}.pth'))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason='torch.distributed is not available')
def test_ddp_two_gloo_ranks(tmp_path):
    mp.spawn(_ddp_rank, args=(2, str(tmp_path / 'rdzv'), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        g = torch.load(tmp_path / f'grads{rank}.pth')
        s = share(g['model'], g['ce_only'], g['explicit'])
        print(f'rank {rank}: share of the balance term: {s:.6f}')
        assert abs(s - 1) < 1e-3
        torch.testing.assert_close(g['model'], g['explicit'], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.load(tmp_path / 'grads0.pth')['model'],
                               torch.load(tmp_path / 'grads1.pth')['model'])  # DDP averaged them


@pytest.mark.parametrize('scale', [0.0, -1.0, torch.ones(2), torch.ones((), dtype=torch.long), 'half'])
def test_a_bad_declared_scale_is_refused(scale):
    with pytest.raises(ValueError, match='balance loss scale must be'):
        timm_ait.set_balance_loss_scale(build(COEF), scale)


def test_declaring_a_scale_needs_a_model_with_a_balance_term():
    with pytest.raises(ValueError, match='has no GlobalWorkspaceLayer'):
        timm_ait.set_balance_loss_scale(timm.create_model(**MODEL, gwl=False), 0.5)


def test_the_projects_train_py_accumulates_with_the_term_counted_once_per_update(tmp_path):
    """train.py --grad-accum-steps 2 declares its 1/k: with the model's refusal still armed for anyone who does
    not, the run must train (an undeclared k would be refused at the second backward)."""
    from timm_ait import train
    metrics = train.main(['--model', 'ait_tiny_patch32_64', '--dataset', 'triangle', '--data-dir', str(tmp_path / 'd'),
                          '--train-num-samples', '64', '--val-num-samples', '16', '-b', '16', '--epochs', '1',
                          '--warmup-epochs', '0', '--workers', '0', '--grad-accum-steps', '2',
                          '--output', str(tmp_path / 'o'), '--experiment', 'accum',
                          '--model-kwargs', 'embed_dim=32', 'num_heads=2'])
    assert 'top1' in metrics
