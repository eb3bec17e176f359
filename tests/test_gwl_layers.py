"""Properties of the GWL building blocks, checked against direct, unvectorised computations."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from timm_ait.layers import (
    BottleneckAttention, ExplicitMemory, GlobalWorkspaceLayer, HopfieldRetrieval, balance_loss_from_gates,
    hopfield_energy, skipped_memory_writes,
)


def reference_bottleneck(attn: BottleneckAttention, memory, patches):
    """The bottleneck attention written out head by head, as the paper's equations 1-3 state it."""
    H, d = attn.num_heads, attn.head_dim
    q = memory @ attn.q.weight.t()
    k = patches @ attn.k.weight.t()
    v = patches @ attn.v.weight.t()
    outs, gates = [], []
    for h in range(H):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.t() / math.sqrt(d)
        if attn.bottleneck is None:
            g = scores.softmax(-1)
        else:
            kk = min(attn.bottleneck, scores.shape[1])
            top, idx = scores.topk(kk, dim=-1)
            g = torch.zeros_like(scores).scatter(-1, idx, top.softmax(-1))
        gates.append(g)
        outs.append(g @ vh)
    return torch.cat(outs, -1) @ attn.proj.weight.t(), torch.stack(gates)


def reference_balance_loss(gates, eps=1e-10):
    total = 0.
    for g in gates:  # per head, g: (S, T)
        importance = g.sum(0)
        load = (g > 0).float().sum(0)
        for x in (importance, load):
            total = total + x.var() / (x.mean() ** 2 + eps)
    return total


def reference_bottleneck_with_bias(attn: BottleneckAttention, memory, patches):
    """As reference_bottleneck, with the key bias of ``qkv_bias=True`` (a constant per slot and head)."""
    H, d = attn.num_heads, attn.head_dim
    q = memory @ attn.q.weight.t() + attn.q.bias
    k = patches @ attn.k.weight.t() + attn.k.bias
    v = patches @ attn.v.weight.t() + attn.v.bias
    outs, gates = [], []
    for h in range(H):
        qh, kh, vh = (t[:, h * d:(h + 1) * d] for t in (q, k, v))
        scores = qh @ kh.t() / math.sqrt(d)
        top, idx = scores.topk(min(attn.bottleneck, scores.shape[1]), dim=-1)
        g = torch.zeros_like(scores).scatter(-1, idx, top.softmax(-1))
        gates.append(g)
        outs.append(g @ vh)
    return torch.cat(outs, -1) @ attn.proj.weight.t(), torch.stack(gates)


# (k, T): k/T of 1/8 and more pools through dense products, less (3 of 40, 7 of 200) through gathers,
# with the top-k's gradient taken at the kept scores only
@pytest.mark.parametrize('bottleneck,num_patches,qkv_bias', [
    (5, 40, False), (64, 40, False), (None, 40, False), (3, 40, False), (7, 200, False), (7, 200, True), (5, 40, True)])
def test_bottleneck_matches_reference_values_and_gradients(bottleneck, num_patches, qkv_bias):
    torch.manual_seed(0)
    attn = BottleneckAttention(dim=24, slot_dim=8, num_heads=4, bottleneck=bottleneck, qkv_bias=qkv_bias)
    memory = torch.randn(6, 8, requires_grad=True)
    patches = torch.randn(num_patches, 24, requires_grad=True)
    out, gates = attn(memory, patches)
    reference = reference_bottleneck_with_bias if qkv_bias else reference_bottleneck
    ref_out, ref_gates = reference(attn, memory, patches)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates.dense(), ref_gates, rtol=1e-5, atol=1e-6)

    # the gradient through the output and through the gates (the balance loss takes that path)
    params = [patches, memory] + [p for p in attn.parameters()]
    w, w_gates = torch.randn_like(out), torch.randn_like(ref_gates)
    grads = torch.autograd.grad((out * w).sum() + (gates.dense() * w_gates).sum(), params)
    ref_grads = torch.autograd.grad((ref_out * w).sum() + (ref_gates * w_gates).sum(), params)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('num_patches,k', [(100, 7), (10, 7), (7, 7), (3, 7)])
def test_topk_keeps_exactly_min_k_pool_patches_per_slot_and_head(num_patches, k):
    attn = BottleneckAttention(dim=16, slot_dim=8, num_heads=3, bottleneck=k)
    _, gates = attn(torch.randn(5, 8), torch.randn(num_patches, 16))
    kept = (gates.dense() > 0).sum(-1)
    assert kept.shape == (3, 5)
    assert torch.all(kept == min(k, num_patches))
    # the kept weights of a slot are a softmax: they sum to one
    torch.testing.assert_close(gates.dense().sum(-1), torch.ones(3, 5))


def test_dense_ablation_gives_every_patch_weight():
    attn = BottleneckAttention(dim=16, slot_dim=8, num_heads=2, bottleneck=None)
    _, gates = attn(torch.randn(4, 8), torch.randn(50, 16))
    assert torch.all(gates.dense() > 0)


def test_bottleneck_larger_than_pool_is_an_error_when_not_capped():
    attn = BottleneckAttention(dim=16, slot_dim=8, num_heads=2, bottleneck=64, cap_bottleneck=False)
    with pytest.raises(ValueError, match=r'k=64.*pool of 20 patches'):
        attn(torch.randn(4, 8), torch.randn(20, 16))


@pytest.mark.parametrize('bottleneck', [3, None])
def test_balance_loss_matches_direct_computation(bottleneck):
    torch.manual_seed(1)
    attn = BottleneckAttention(dim=12, slot_dim=4, num_heads=2, bottleneck=bottleneck)
    _, gates = attn(torch.randn(5, 4), torch.randn(9, 12))
    expected = reference_balance_loss(gates.dense())
    torch.testing.assert_close(balance_loss_from_gates(gates), expected)
    if bottleneck is None:  # every patch is loaded by every slot: only the importance term remains
        imp = gates.dense().sum(1)
        torch.testing.assert_close(balance_loss_from_gates(gates), (imp.var(-1) / imp.mean(-1) ** 2).sum())


def test_balance_loss_by_hand():
    # one head, two slots, three patches: slot 0 keeps (0, 1), slot 1 keeps (1, 2)
    from timm_ait.layers import BottleneckGates
    gates = BottleneckGates(torch.tensor([[[0.75, 0.25], [0.5, 0.5]]]), torch.tensor([[[0, 1], [1, 2]]]), 3)
    importance = torch.tensor([0.75, 0.75, 0.5])
    load = torch.tensor([1., 2., 1.])
    cv2 = lambda x: x.var() / (x.mean() ** 2 + 1e-10)  # noqa: E731
    torch.testing.assert_close(balance_loss_from_gates(gates), cv2(importance) + cv2(load))


@pytest.mark.parametrize('beta,steps', [(1.0, 1), (2.5, 1), (0.5, 2)])
def test_hopfield_read_with_a_residual_is_the_residual_plus_the_paper_update(beta, steps):
    """The read sums the residual inside its last product; the result is h + xi', xi' by the paper's update."""
    torch.manual_seed(3)
    read = HopfieldRetrieval(48, slot_dim=8, beta=beta, steps=steps)
    memory, h = torch.randn(6, 8), torch.randn(4, 9, 48)
    xi, y = h, read.up(memory)
    for _ in range(steps):  # Ramsauer et al. eq. (2), written out on (B, N, D)
        xi = torch.softmax(beta * torch.einsum('bnd,sd->bns', xi, y), dim=-1) @ y
    torch.testing.assert_close(read(h, memory), xi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(read(h, memory, residual=h), h + xi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(read(h, memory, residual=h), h + read(h, memory), rtol=1e-6, atol=1e-7)
    # in float32 the same bits as h + read(h); under bfloat16 autocast (float32 h, or bfloat16 h) and for a
    # bfloat16 layer the dtype and the bits of h + read(h) too, not a sum rounded once in bfloat16
    assert torch.equal(read(h, memory, residual=h), h + read(h, memory))
    for dtype, autocast in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)):
        layer, x = (read, h.to(dtype)) if autocast else (copy.deepcopy(read).to(dtype), h.to(dtype))
        m = memory.to(dtype) if not autocast else memory
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            fused, plain = layer(x, m, residual=x), x + layer(x, m)
        assert fused.dtype == plain.dtype and torch.equal(fused, plain), (dtype, autocast)


def test_hopfield_step_never_increases_energy():
    torch.manual_seed(2)
    for trial in range(300):
        S, D = torch.randint(1, 40, ()).item(), torch.randint(1, 64, ()).item()
        beta = float(torch.empty(()).uniform_(0.05, 4.0))
        scale = float(torch.empty(()).uniform_(0.1, 3.0))
        read = HopfieldRetrieval(D, slot_dim=8, beta=beta).double()
        memory = torch.randn(S, 8, dtype=torch.float64) * scale
        xi = torch.randn(16, D, dtype=torch.float64) * scale
        y = read.attractors(memory)
        e0 = hopfield_energy(xi, y, beta)
        e1 = hopfield_energy(read(xi, memory), y, beta)
        assert torch.all(e1 <= e0 + 1e-9), (trial, (e1 - e0).max())


def test_hopfield_energy_formula_by_hand():
    y = torch.tensor([[1., 0.], [0., 2.]])
    xi = torch.tensor([0.5, 0.5])
    expected = -torch.logsumexp(torch.tensor([0.5, 1.0]), 0) + 0.25 + math.log(2) + 0.5 * 4
    torch.testing.assert_close(hopfield_energy(xi, y, 1.0), expected)


def test_hopfield_update_is_softmax_retrieval():
    read = HopfieldRetrieval(6, slot_dim=4, beta=0.5, steps=2)
    memory, xi = torch.randn(5, 4), torch.randn(2, 3, 6)
    y = read.up(memory)
    expected = xi
    for _ in range(2):
        expected = F.softmax(0.5 * expected @ y.t(), -1) @ y
    torch.testing.assert_close(read(xi, memory), expected)


@pytest.mark.parametrize('init', ['gaussian', 'uniform', 'identity'])
def test_memory_initialisations(init):
    torch.manual_seed(3)
    mem = ExplicitMemory(num_slots=40, slot_dim=24, init=init)
    m = mem.memory
    if init == 'identity':
        assert torch.equal(m[:24], torch.eye(24)) and torch.all(m[24:] == 0)
    elif init == 'uniform':
        bound = 1 / math.sqrt(40 + 24)
        assert m.abs().max() <= bound and m.abs().max() > 0.8 * bound
    else:
        assert abs(m.mean()) < 0.1 and abs(m.std() - 1) < 0.1
    before = m.clone()
    mem.reset()
    assert (init == 'identity') == torch.equal(mem.memory, before)


def test_memory_is_a_buffer_in_the_state_dict():
    mem = ExplicitMemory(4, 3)
    assert 'memory' in mem.state_dict()
    assert not list(mem.parameters())


def _gwl(**kwargs):
    kwargs = {**dict(num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=5), **kwargs}
    return GlobalWorkspaceLayer(16, 32, **kwargs)


def test_training_forward_writes_memory_by_the_ewma_rule():
    torch.manual_seed(4)
    layer = _gwl(smoothing=0.9).train()
    x = torch.randn(3, 7, 16)
    old = layer.memory.memory.clone()
    h = layer.norm(layer.fc2(layer.act(layer.fc1(x)))).reshape(-1, 16)
    out, _ = reference_bottleneck(layer.write_attn, old, h)
    # the authors' write LayerNorm has eps 1e-6 (MHA.py)
    candidate = F.layer_norm(out + old, (8,), layer.write_norm.weight, layer.write_norm.bias, eps=1e-6)
    y = layer(x)
    torch.testing.assert_close(layer.memory.memory, 0.9 * old + 0.1 * candidate, rtol=1e-5, atol=1e-6)
    # the read of this step used the new memory, with its gradient to the write path
    expected = h.view(3, 7, 16) + layer.read(h.view(3, 7, 16), 0.9 * old + 0.1 * candidate)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert layer.write_attn.q.weight.grad.abs().sum() > 0
    # kept for logging without its graph (the layer adds the term to the backward itself)
    assert layer.balance_loss is not None and not layer.balance_loss.requires_grad


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_a_non_finite_write_never_reaches_the_memory(bad):
    torch.manual_seed(6)
    layer = _gwl().train()
    layer(torch.randn(2, 5, 16))
    before = layer.memory.memory.clone()
    x = torch.randn(2, 5, 16)
    x[1, 3, 7] = bad  # one bad value in one sample
    layer(x)
    assert torch.equal(layer.memory.memory, before)  # the write was skipped whole
    assert skipped_memory_writes(layer) == 1
    # so every later forward, on any input, is as good as before the bad one
    y = layer(torch.randn(2, 5, 16))
    assert torch.isfinite(y).all() and torch.isfinite(layer.memory.memory).all()
    assert not torch.equal(layer.memory.memory, before) and skipped_memory_writes(layer) == 1
    layer.eval()
    assert torch.isfinite(layer(torch.randn(3, 5, 16))).all()


def test_a_training_forward_on_an_empty_batch_writes_nothing():
    layer = _gwl().train()
    before = layer.memory.memory.clone()
    y = layer(torch.randn(0, 5, 16))
    assert y.shape == (0, 5, 16)
    assert torch.equal(layer.memory.memory, before)
    # no patches: nothing is imbalanced, and the loss must not turn the step's loss into NaN
    assert layer.balance_loss.item() == 0.0
    assert skipped_memory_writes(layer) == 0


def test_l2_normalised_write():
    layer = _gwl(memory_l2norm=True).train()
    layer(torch.randn(2, 5, 16))
    torch.testing.assert_close(layer.memory.memory.norm(dim=-1), torch.ones(6))


def test_l2_normalised_memory_starts_from_raw_gaussian():
    # the authors' memory is torch.randn(S, m), normalised only after each write
    torch.manual_seed(7)
    raw = ExplicitMemory(40, 24).memory
    torch.manual_seed(7)
    mem = ExplicitMemory(40, 24, l2_normalize=True)
    assert torch.equal(mem.memory, raw)
    mem.reset()
    assert not torch.allclose(mem.memory.norm(dim=-1), torch.ones(40))


def test_write_dropout_acts_on_the_projection_before_the_residual():
    torch.manual_seed(8)
    layer = _gwl(write_drop=1.0).train()  # drops every element: the candidate is LN_m(0 + M)
    old = layer.memory.memory.clone()
    layer(torch.randn(2, 5, 16))
    candidate = F.layer_norm(old, (8,), layer.write_norm.weight, layer.write_norm.bias, eps=1e-6)
    torch.testing.assert_close(layer.memory.memory, 0.9 * old + 0.1 * candidate)
    assert _gwl().write_drop.p == 0.0  # the default, see AssociativeTransformer


def test_eval_never_writes_and_is_independent_of_the_batch():
    torch.manual_seed(5)
    layer = _gwl().train()
    layer(torch.randn(4, 7, 16))  # a trained memory, not the initial one
    layer.eval()
    before = layer.memory.memory.clone()
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        batch = layer(x)
        single = torch.cat([layer(x[i:i + 1]) for i in range(5)])
    assert torch.equal(layer.memory.memory, before)
    assert layer.balance_loss is None
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(bottleneck=0), r"bottleneck must be >= 1 \(an integer, the top-k, or 'none' for dense attention\), got 0"),
    (dict(bottleneck='dense'), r"bottleneck must be >= 1 .*got 'dense'"),
    (dict(num_slots=0), r'num_slots must be >= 1 \(an integer\), got 0'),
    (dict(gwl_heads=0), r'gwl_heads must be >= 1 \(an integer\), got 0'),
    (dict(hopfield_steps=2.5), r'hopfield_steps must be >= 1 \(an integer\), got 2.5'),
    (dict(hopfield='no way'), r"hopfield must be True or False, got 'no way'"),
    (dict(memory_init='zeros'), "unknown memory_init 'zeros'"),
    (dict(beta=0.), 'beta must be > 0'),
    (dict(hopfield_steps=0), 'steps must be >= 1'),
    (dict(smoothing=1.5), 'smoothing must be in'),
])
def test_misconfigured_layer_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _gwl(**kwargs)
