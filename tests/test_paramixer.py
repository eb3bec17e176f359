"""Tests for the parallelized MLP-Mixer family (timm_ait.models.paramixer)."""
import argparse
import csv
import json
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm
from timm.models import get_pretrained_cfg, group_parameters
from timm.optim import create_optimizer_v2

import timm_ait  # noqa: F401  (registers the models)
from timm_ait.checkpoint import model_state_dict
from timm_ait.checkpoint import read_checkpoint as load_training_checkpoint
from timm_ait.run_model import check_checkpoint_arch
from timm_ait.hub import HF_HUB_ORG, hf_hub_id
from timm_ait.models.paramixer import (
    AUTHORS_MODELS, HamMixer, MixerBlock, SymmetricMlp, SymmetryBreakingMlp,
    checkpoint_filter_fn,
)
from timm_ait.train.task import AiTClassificationTask

BLOCK_TYPES = ('serial', 'parallel', 'symmetric', 'symbreak')
# size tag -> (embed_dim, num_blocks, patch_size, img_size)
SIZES = {
    's16_224': (512, 8, 16, 224),
    's32_224': (512, 8, 32, 224),
    'b16_224': (768, 12, 16, 224),
    'b32_224': (768, 12, 32, 224),
    's4_32': (512, 8, 4, 32),
}
NAMES = [f'hmixer_{b}_{s}' for b in BLOCK_TYPES for s in SIZES]


def _tiny(block_type='parallel', **kwargs):
    """3 blocks of width 32 on 16x16 images with patch 4: 16 tokens."""
    torch.manual_seed(kwargs.pop('seed', 0))
    return HamMixer(
        num_classes=5, img_size=16, patch_size=4, num_blocks=3, embed_dim=32, block_type=block_type, **kwargs)


def _numel(model):
    return sum(p.numel() for p in model.parameters())


def _expected_params(block_type, embed_dim, num_blocks, patch_size, img_size, num_classes, bias=False):
    """Parameter count from the architecture's dimensions alone."""
    n = (img_size // patch_size) ** 2
    tokens_dim, channels_dim = embed_dim // 2, 4 * embed_dim

    def mlp(d, h, tied):
        return (1 if tied else 2) * d * h + (h + d if bias else 0)

    tied = block_type == 'symmetric'
    num_norms = 2 if block_type == 'serial' else 1
    block = num_norms * 2 * n * embed_dim + mlp(n, tokens_dim, tied) + mlp(embed_dim, channels_dim, tied)
    stem = 3 * patch_size ** 2 * embed_dim + embed_dim
    return stem + num_blocks * block + 2 * embed_dim + embed_dim * num_classes + num_classes


def _random_head(model):
    # the head is zero-initialised (as timm's Mixer), which would zero every gradient below it
    nn.init.normal_(model.head.weight, std=0.02)


def _forward_backward(model, batch_size):
    _, h, w = model.pretrained_cfg['input_size']
    out = model(torch.randn(batch_size, 3, h, w))
    assert out.shape == (batch_size, model.num_classes)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    # every parameter takes part in the forward pass, so none is left without a gradient
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f'parameters without gradient: {no_grad}'


# --- registry and pretrained cfgs -------------------------------------------------------------------------


def test_registered_names():
    assert sorted(timm.list_models('hmixer_*')) == sorted(NAMES)


@pytest.mark.parametrize('name', NAMES)
def test_default_cfg(name):
    cfg = get_pretrained_cfg(name)
    cifar = name.endswith('_32')
    tag = 'cifar10' if cifar else 'in1k'
    assert cfg.tag == tag
    assert cfg.hf_hub_id == hf_hub_id(name, tag) == f'{HF_HUB_ORG}/{name}.{tag}'
    assert cfg.num_classes == (10 if cifar else 1000)
    assert cfg.input_size == ((3, 32, 32) if cifar else (3, 224, 224))
    if cifar:
        assert cfg.mean == (0.4914, 0.4822, 0.4465) and cfg.std == (0.2470, 0.2435, 0.2616)
    assert cfg.fixed_input_size
    assert (cfg.first_conv, cfg.classifier) == ('stem.proj', 'head')
    assert cfg.paper_ids == 'arXiv:2406.12220' and cfg.license == 'apache-2.0'


# --- every registered model builds, runs forward and backward ---------------------------------------------


@pytest.mark.parametrize('name', [n for n in NAMES if n.endswith('_32')])
def test_build_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name)
    _random_head(model)
    _forward_backward(model, 2)


@pytest.mark.parametrize('name', [n for n in NAMES if n.endswith('_224')])
def test_build_forward_backward_224_on_meta(name):
    # the 224 models build and their forward and backward run on the meta device: every shape and
    # every gradient path without the CPU time; one of them runs for real below
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=3)
        out = model(torch.randn(1, 3, 224, 224))
        assert out.shape == (1, 3)
        out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    block_type, size = name.split('_')[1], name.split('_')[2][0]
    embed_dim, num_blocks = (512, 8) if size == 's' else (768, 12)
    assert _numel(model) == _expected_params(block_type, embed_dim, num_blocks, int(name.split('_')[2][1:]), 224, 3)


def test_forward_backward_b16():
    # the slowest size runs forward/backward once; symbreak exercises both the tied and the free matrix
    torch.manual_seed(0)
    model = timm.create_model('hmixer_symbreak_b16_224', num_classes=3)
    _random_head(model)
    _forward_backward(model, 1)


# --- parameter counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('mlp_bias', [False, True])
def test_param_counts(size, mlp_bias):
    # every registered name (on the meta device: counts only), with and without MLP biases
    embed_dim, num_blocks, patch_size, img_size = SIZES[size]
    n = (img_size // patch_size) ** 2
    models = {b: timm.create_model(f'hmixer_{b}_{size}', mlp_bias=mlp_bias, device='meta') for b in BLOCK_TYPES}
    counts = {b: _numel(m) for b, m in models.items()}
    for b, m in models.items():
        # with biases every MLP, tied or not, has a hidden bias and one output bias
        assert counts[b] == _expected_params(b, *SIZES[size], m.num_classes, bias=mlp_bias)
    # per block: the token MLP's W2 (n x D/2) and the channel MLP's W2 (D x 4D) are W1^T instead
    tied = num_blocks * (n * (embed_dim // 2) + embed_dim * 4 * embed_dim)
    assert counts['parallel'] - counts['symmetric'] == tied
    assert counts['symbreak'] == counts['parallel']
    # the serial block has a second (N, D) LayerNorm
    assert counts['serial'] - counts['parallel'] == num_blocks * 2 * n * embed_dim


# --- the symmetric and symmetry-breaking MLPs ----------------------------------------------------------------


def test_symmetric_mlp_has_one_matrix_used_both_ways():
    torch.manual_seed(0)
    mlp = SymmetricMlp(6, 10)
    assert [n for n, _ in mlp.named_parameters()] == ['fc1.weight']
    assert mlp.fc1.weight.shape == (10, 6)
    z = torch.randn(4, 6)
    w = mlp.fc1.weight
    torch.testing.assert_close(mlp(z), F.gelu(z @ w.t()) @ w)

    with_bias = SymmetricMlp(6, 10, bias=True)
    assert sorted(n for n, _ in with_bias.named_parameters()) == ['bias_out', 'fc1.bias', 'fc1.weight']


def test_symmetric_mlp_gradient_sums_both_uses():
    torch.manual_seed(0)
    mlp = SymmetricMlp(5, 7, act_layer=nn.Tanh).double()
    z = torch.randn(3, 5, dtype=torch.float64)
    c = torch.randn(3, 5, dtype=torch.float64)
    (c * mlp(z)).sum().backward()

    # L = sum(C * tanh(Z W^T) W): W as the output matrix gives H^T C, W as the input matrix gives the rest
    w = mlp.fc1.weight.detach()
    h = torch.tanh(z @ w.t())
    grad_as_output = h.t() @ c
    grad_as_input = ((c @ w.t()) * (1 - h ** 2)).t() @ z
    torch.testing.assert_close(mlp.fc1.weight.grad, grad_as_output + grad_as_input)
    assert grad_as_output.abs().max() > 1e-3 and grad_as_input.abs().max() > 1e-3


@pytest.mark.parametrize('bias', [False, True])
def test_symmetry_breaking_is_symmetric_plus_breaking_term(bias):
    torch.manual_seed(0)
    sb = SymmetryBreakingMlp(6, 10, bias=bias)
    if bias:
        nn.init.normal_(sb.bias_out)
    sym = SymmetricMlp(6, 10, bias=bias)
    missing, unexpected = sym.load_state_dict(sb.state_dict(), strict=False)
    assert missing == [] and unexpected == ['fc2.weight']

    z = torch.randn(4, 3, 6)
    breaking = sb.fc2(sb.act(sb.fc1(z)))
    assert breaking.abs().max() > 1e-3
    assert torch.equal(sb(z), sym(z) + breaking)
    nn.init.zeros_(sb.fc2.weight)
    assert torch.equal(sb(z), sym(z))


# --- blocks -------------------------------------------------------------------------------------------------


def _randomize_norms(module):
    for m in module.modules():
        if isinstance(m, nn.LayerNorm):
            nn.init.normal_(m.weight, mean=1., std=0.2)
            nn.init.normal_(m.bias, std=0.2)


def test_parallel_block_is_token_plus_channel_mixing_of_one_norm():
    torch.manual_seed(0)
    n, d = 16, 24
    blk = MixerBlock(d, n, parallel=True)
    _randomize_norms(blk)
    assert [m.normalized_shape for m in blk.modules() if isinstance(m, nn.LayerNorm)] == [(n, d)]
    x = torch.randn(2, n, d)

    # one LayerNorm over the whole (tokens, channels) map of each sample
    mu = x.mean(dim=(1, 2), keepdim=True)
    var = x.var(dim=(1, 2), unbiased=False, keepdim=True)
    z = (x - mu) / torch.sqrt(var + blk.norm.eps) * blk.norm.weight + blk.norm.bias
    torch.testing.assert_close(blk.norm(x), z)

    token_mixing = blk.mlp_tokens(z.transpose(1, 2)).transpose(1, 2)
    channel_mixing = blk.mlp_channels(z)
    torch.testing.assert_close(blk(x), x + token_mixing + channel_mixing)

    serial = MixerBlock(d, n)
    serial.load_state_dict({
        k.replace('norm.', 'norm1.'): v for k, v in blk.state_dict().items()} | {
        k.replace('norm.', 'norm2.'): v for k, v in blk.state_dict().items() if k.startswith('norm.')})
    x1 = x + serial.mlp_tokens(serial.norm1(x).transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(serial(x), x1 + serial.mlp_channels(serial.norm2(x1)))
    assert (serial(x) - blk(x)).abs().max() > 1e-2


@pytest.mark.parametrize('block_type, parallel, mlp_cls', [
    ('serial', False, 'Mlp'),
    ('parallel', True, 'Mlp'),
    ('symmetric', True, 'SymmetricMlp'),
    ('symbreak', True, 'SymmetryBreakingMlp'),
])
def test_block_type_wiring(block_type, parallel, mlp_cls):
    model = _tiny(block_type)
    assert model.block_type == block_type
    for blk in model.blocks:
        assert type(blk) is MixerBlock and blk.parallel is parallel
        norms = [n for n, m in blk.named_children() if isinstance(m, nn.LayerNorm)]
        assert norms == (['norm'] if parallel else ['norm1', 'norm2'])
        assert type(blk.mlp_tokens).__name__ == type(blk.mlp_channels).__name__ == mlp_cls
    assert model.blocks[0].mlp_tokens.fc1.weight.shape == (16, 16)  # tokens -> D/2 = 16
    assert model.blocks[0].mlp_channels.fc1.weight.shape == (128, 32)  # D -> 4D


@pytest.mark.parametrize('block_type', BLOCK_TYPES)
def test_dropout_and_drop_path_only_in_training(block_type):
    model = _tiny(block_type, drop_path_rate=0.5, proj_drop_rate=0.2, drop_rate=0.2)
    _random_head(model)
    x = torch.randn(4, 3, 16, 16)
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


# --- timm model API -----------------------------------------------------------------------------------------


def test_forward_intermediates():
    model = _tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    final, inter = model.forward_intermediates(x)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 3 and all(t.shape == (2, 32, 4, 4) for t in inter)

    nlc = model.forward_intermediates(x, indices=[0, 2], output_fmt='NLC', intermediates_only=True)
    assert [t.shape for t in nlc] == [(2, 16, 32)] * 2
    torch.testing.assert_close(nlc[0].reshape(2, 4, 4, 32).permute(0, 3, 1, 2), inter[0])

    early = model.forward_intermediates(x, indices=[1], stop_early=True, norm=True, intermediates_only=True)
    normed = model.norm(inter[1].flatten(2).transpose(1, 2))
    torch.testing.assert_close(early[0], normed.transpose(1, 2).reshape(2, 32, 4, 4))

    assert model.prune_intermediate_layers(indices=[1]) == [1]
    assert len(model.blocks) == 2 and isinstance(model.head, nn.Identity)


def test_features_only():
    model = timm.create_model(
        'hmixer_symmetric_s4_32', features_only=True, out_indices=(1, 3), num_blocks=4, embed_dim=32)
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 32, 8, 8)] * 2
    assert model.feature_info.channels() == [32, 32] and model.feature_info.reduction() == [4, 4]


def test_reset_classifier_and_pre_logits():
    model = _tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 5) and model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 16, 32)


@pytest.mark.parametrize('block_type', BLOCK_TYPES)
def test_state_dict_round_trip(block_type):
    src = _tiny(block_type, seed=1).eval()
    dst = _tiny(block_type, seed=2).eval()
    _random_head(src)
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(src(x), dst(x))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    assert torch.equal(src(x), dst(x))


# --- the authors' checkpoints (github.com/Toshihiro-Ota/paramixer) ---------------------------------------
# Written from THEIR code (models/mixers.py MlpMixer, models/layers.py vMlp / sMlp / aMlp, vMixerBlock /
# pMixerBlock): their key names and shapes, and their forward with torch's functions, never this project's.

# our block type -> their MLP's matrices: vMlp and aMlp have fc1 (hidden, in) and fc2 (out, hidden); sMlp
# has one matrix, named fc2 but built as Linear(in, hidden), so (hidden, in), used as W and as W.T
_THEIR_MLP_KEYS = dict(serial=('fc1', 'fc2'), parallel=('fc1', 'fc2'), symmetric=('fc2',), symbreak=('fc1', 'fc2'))


def their_checkpoint(block_type, embed_dim=32, num_blocks=3, patch_size=4, img_size=16, num_classes=5, seed=0):
    """A random ``state_dict()`` of their MlpMixer, their defaults (no MLP biases, no stem norm).

    Scales are chosen so that every LayerNorm's eps (their 1e-6) shows: the stem has gains of 0.01 and
    every MLP matrix 0.1, so the stream the norms see keeps a variance near 1e-4, where eps 1e-5 in
    place of 1e-6 changes a norm's output by about 4%.
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    D, N, p = embed_dim, (img_size // patch_size) ** 2, patch_size
    sd = {'stem.proj.weight': randn(D, 3, p, p) * 0.01 / (3 * p * p) ** 0.5, 'stem.proj.bias': 0.01 * randn(D)}
    for i in range(num_blocks):
        for norm in (('norm1', 'norm2') if block_type == 'serial' else ('norm',)):  # over (tokens, channels)
            sd[f'blocks.{i}.{norm}.weight'] = 1 + 0.2 * randn(N, D)
            sd[f'blocks.{i}.{norm}.bias'] = 0.2 * randn(N, D)
        for mlp, width, hidden in (('mlp_tokens', N, D // 2), ('mlp_channels', D, 4 * D)):  # mlp_ratio (0.5, 4)
            for fc in _THEIR_MLP_KEYS[block_type]:
                shape = (width, hidden) if fc == 'fc2' and block_type != 'symmetric' else (hidden, width)
                sd[f'blocks.{i}.{mlp}.{fc}.weight'] = randn(*shape) * 0.1 / shape[1] ** 0.5
    sd.update({'norm.weight': 1 + 0.2 * randn(D), 'norm.bias': 0.2 * randn(D),
               'head.weight': randn(num_classes, D) / D ** 0.5, 'head.bias': 0.1 * randn(num_classes)})
    return sd


def their_forward(sd, x, block_type, num_blocks=3, patch_size=4):
    """Their MlpMixer.forward in eval: PatchEmbed, the blocks, LayerNorm(D), mean over tokens, head."""
    def ln(z, name, dims):
        return F.layer_norm(z, z.shape[-dims:], sd[f'{name}.weight'], sd[f'{name}.bias'], 1e-6)

    def mlp(z, name):
        if block_type == 'symmetric':  # sMlp: F.linear(x, fc2.weight), act, F.linear(x, fc2.weight.T)
            w = sd[f'{name}.fc2.weight']
            return F.linear(F.gelu(F.linear(z, w)), w.T)
        h = F.gelu(F.linear(z, sd[f'{name}.fc1.weight']))
        if block_type == 'symbreak':  # aMlp: F.linear(x, fc1.weight.T) + fc2(x)
            return F.linear(h, sd[f'{name}.fc1.weight'].T) + F.linear(h, sd[f'{name}.fc2.weight'])
        return F.linear(h, sd[f'{name}.fc2.weight'])  # vMlp

    x = F.conv2d(x, sd['stem.proj.weight'], sd['stem.proj.bias'], stride=patch_size).flatten(2).transpose(1, 2)
    for i in range(num_blocks):
        b = f'blocks.{i}'
        if block_type == 'serial':  # vMixerBlock
            x = x + mlp(ln(x, f'{b}.norm1', 2).transpose(1, 2), f'{b}.mlp_tokens').transpose(1, 2)
            x = x + mlp(ln(x, f'{b}.norm2', 2), f'{b}.mlp_channels')
        else:  # pMixerBlock: both MLPs from the same norm(x)
            z = ln(x, f'{b}.norm', 2)
            x = x + mlp(z.transpose(1, 2), f'{b}.mlp_tokens').transpose(1, 2) + mlp(z, f'{b}.mlp_channels')
    return F.linear(ln(x, 'norm', 1).mean(dim=1), sd['head.weight'], sd['head.bias'])


@pytest.mark.parametrize('block_type', BLOCK_TYPES)
def test_authors_checkpoint_computes_their_forward(block_type):
    theirs = their_checkpoint(block_type)
    model = _tiny(block_type, seed=2).eval()
    model.load_state_dict(checkpoint_filter_fn(dict(theirs), model))  # strict: every key, every shape
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = their_forward(theirs, x, block_type)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 0.1  # logits that differ, not a constant the head's bias alone would give


def test_grad_checkpointing_matches():
    model = _tiny('symbreak')
    _random_head(model)
    x = torch.randn(2, 3, 16, 16)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])


def test_norms_excluded_from_weight_decay():
    model = _tiny('serial')
    decayed = {id(p) for g in create_optimizer_v2(model, 'adamw', weight_decay=0.05).param_groups
               if g['weight_decay'] > 0 for p in g['params']}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    # only matrices and the stem's kernel decay; the (N, D) LayerNorm gains are 2-D but must not
    assert names == {n for n, p in model.named_parameters() if n.endswith('weight') and 'norm' not in n}
    grouped = group_parameters(model, model.group_matcher())
    assert sorted(n for names in grouped.values() for n in names) == sorted(n for n, _ in model.named_parameters())


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_input_errors():
    model = _tiny()
    expected = r'expected images of shape \(B, 3, 16, 16\) \(batch, channels, height, width\), got '
    with pytest.raises(ValueError, match=expected + r'\(1, 1, 16, 16\)$'):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=expected + r'\(1, 3, 20, 20\)$'):
        model(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match=expected + r'\(3, 16, 16\)$'):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=expected + r'\(1, 3, 32, 32\)$'):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 16, 16), output_fmt='NHWC')
    with pytest.raises(ValueError, match="Unknown block_type 'vanilla'"):
        _tiny('vanilla')
    with pytest.raises(ValueError, match='not divisible by patch_size'):
        HamMixer(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match=r'expected images of shape \(B, 3, 32, 32\)'):
        timm.create_model('hmixer_parallel_s4_32', num_blocks=1, embed_dim=16)(torch.randn(1, 3, 224, 224))


# --- n_iter and lcoeff, the authors' *_ni2..4 and asymmixer_*_lXX models ---------------------------

def _write_checkpoint(path, model, arch, **model_kwargs):
    """A checkpoint as timm's CheckpointSaver writes it (theirs and ours): 'arch' is args.model."""
    args = argparse.Namespace(model=arch, model_kwargs=model_kwargs, num_classes=model.num_classes)
    torch.save({'epoch': 299, 'arch': arch, 'state_dict': model.state_dict(), 'version': 2, 'args': args}, path)
    return str(path)


@pytest.mark.parametrize('block_type', BLOCK_TYPES)
def test_n_iter_applies_each_block_n_times_with_shared_weights(block_type):
    once = _tiny(block_type, seed=3, drop_path_rate=0.3)
    thrice = _tiny(block_type, seed=4, drop_path_rate=0.3, n_iter=3)
    _randomize_norms(once)
    thrice.load_state_dict(once.state_dict())  # the same keys and shapes: n_iter adds no weights
    assert _numel(thrice) == _numel(once)
    x = torch.randn(2, 3, 16, 16)
    once.eval()
    with torch.no_grad():
        expected = once.stem(x)
        for block in once.blocks:
            for _ in range(3):
                expected = block(expected)
        torch.testing.assert_close(thrice.eval().forward_features(x), once.norm(expected))
    # training: every application draws its own drop_path masks, as in the authors' loop
    once.train(), thrice.train()
    h = torch.randn(2, 16, 32)
    torch.manual_seed(5)
    expected = once.blocks[0](once.blocks[0](once.blocks[0](h)))
    torch.manual_seed(5)
    torch.testing.assert_close(thrice.blocks[0](h), expected)


def test_authors_entry_points_are_reached():
    # every function of their models/mixers.py, with the settings it passes
    assert len(AUTHORS_MODELS) == 36
    expected_lcoeff = {'l00': 0., 'l01': 0.1, 'l02': 1e-2, 'l03': 1e-3, 'l035': 5e-4, 'l04': 1e-4, 'l05': 1e-5,
                       'l06': 1e-6, 'l10': 1.0}
    block_of = dict(vanillamixer='serial', paramixer='parallel', symmixer='symmetric', asymmixer='symbreak')
    for theirs, (name, kwargs) in AUTHORS_MODELS.items():
        prefix, size, _, *suffix = theirs.split('_')
        with torch.device('meta'):
            model = timm.create_model(name, **kwargs)
        assert model.block_type == block_of[prefix], theirs
        width, depth, patch = dict(s=(512, 8), b=(768, 12), l=(1024, 24))[size[0]] + (int(size[1:]),)
        assert (model.embed_dim, len(model.blocks), model.stem.patch_size[0]) == (width, depth, patch), theirs
        n_iter = int(suffix[0][2:]) if suffix and suffix[0].startswith('ni') else 1
        assert model.n_iter == n_iter and all(b.n_iter == n_iter for b in model.blocks), theirs
        assert model.lcoeff == (expected_lcoeff[suffix[0]] if prefix == 'asymmixer' else 0.), theirs


def test_their_ni2_checkpoint_builds_the_n_iter_2_model_or_is_refused(tmp_path):
    kwargs = dict(img_size=32, num_blocks=2, embed_dim=32, num_classes=10)  # paramixer_s16_224 layout, small
    source = timm.create_model('hmixer_parallel_s16_224', n_iter=2, **kwargs)
    path = _write_checkpoint(tmp_path / 'model_best.pth.tar', source, 'paramixer_s16_224_ni2')
    overlay = dict(file=path)
    with pytest.raises(ValueError, match=r"trained as 'paramixer_s16_224_ni2'.*n_iter=2 times; this model has n_iter=1"):
        timm.create_model('hmixer_parallel_s16_224', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    with pytest.raises(ValueError, match=r"block_type='parallel'; this model has block_type='symbreak'"):
        timm.create_model('hmixer_symbreak_s16_224', pretrained=True, pretrained_cfg_overlay=overlay, n_iter=2,
                          **kwargs)
    model = timm.create_model('hmixer_parallel_s16_224', pretrained=True, pretrained_cfg_overlay=overlay, n_iter=2,
                              **kwargs)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), source.eval()(x))
    # the scripts' path (validate.py, train.py --initial-checkpoint / --resume) asks the model the same
    one = timm.create_model('hmixer_parallel_s16_224', **kwargs)
    with pytest.raises(ValueError, match='n_iter=2'):
        check_checkpoint_arch(load_training_checkpoint(path), one)
    check_checkpoint_arch(load_training_checkpoint(path), model)


def test_our_checkpoint_with_n_iter_in_its_model_kwargs_is_checked(tmp_path):
    source = _tiny('symbreak', n_iter=3)
    path = _write_checkpoint(tmp_path / 'last.pth.tar', source, 'hmixer_symbreak_s4_32', n_iter=3)
    with pytest.raises(ValueError, match=r"trained as 'hmixer_symbreak_s4_32', each block applied n_iter=3"):
        check_checkpoint_arch(load_training_checkpoint(path), _tiny('symbreak'))
    check_checkpoint_arch(load_training_checkpoint(path), _tiny('symbreak', n_iter=3))
    check_checkpoint_arch({'state_dict': source.state_dict()}, _tiny('symbreak'))  # a bare state dict says nothing


@pytest.mark.parametrize('block_type', BLOCK_TYPES)
def test_lcoeff_penalty_is_their_reg_weight2_and_reaches_only_w2(block_type):
    model = _tiny(block_type, lcoeff=0.1)
    _random_head(model)
    # their util/utils.py reg_weight2: lcoeff * sum over blocks of ||mlp_tokens.fc2||^2 + ||mlp_channels.fc2||^2,
    # fc2 being the matrix their symmetric MLP also names fc2 (our tied fc1)
    w2 = 'fc1' if block_type == 'symmetric' else 'fc2'
    expected = 0.1 * sum(getattr(getattr(blk, mlp), w2).weight.detach().pow(2).sum()
                         for blk in model.blocks for mlp in ('mlp_tokens', 'mlp_channels'))
    task = AiTClassificationTask(model, verbose=False).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    result = task(x, y)
    torch.testing.assert_close(result['aux_loss'], expected)
    torch.testing.assert_close(result['loss'], result['task_loss'] + expected)
    model.zero_grad()
    model.aux_loss().backward()
    for name, p in model.named_parameters():
        if name.endswith(f'.{w2}.weight'):
            torch.testing.assert_close(p.grad, 2 * 0.1 * p.detach())
        else:
            assert p.grad is None, name
    assert task.eval()(x, y)['aux_loss'] == 0  # a training loss only, as theirs
    assert _tiny(block_type).aux_loss() is None  # lcoeff 0


def test_n_iter_and_lcoeff_errors():
    with pytest.raises(ValueError, match=r'n_iter .* must be an int >= 1, got 0'):
        _tiny(n_iter=0)
    with pytest.raises(ValueError, match=r'lcoeff .* must be >= 0, got -0.1'):
        _tiny(lcoeff=-0.1)


def _run_script(name, *args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, os.path.join(repo, 'train_scripts', name), *map(str, args)],
                          capture_output=True, text=True, cwd=repo, env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_train_logs_the_lcoeff_penalty_to_summary_csv(tmp_path):
    small = ['patch_size=16', 'embed_dim=32', 'num_blocks=2', 'lcoeff=0.1']
    proc = _run_script('train.py', '--model', 'hmixer_symbreak_s4_32', '--dataset', 'triangle', '--num-classes', 2,
                       '--img-size', 64, '--train-num-samples', 32, '--val-num-samples', 16, '-b', 16, '--workers', 0,
                       '--epochs', 1, '--warmup-epochs', 0, '--lr', 1e-5, '--data-dir', tmp_path / 'data',
                       '--output', tmp_path, '--experiment', 'run', '--model-kwargs', *small)
    assert proc.returncode == 0, proc.stderr
    assert ' aux ' in proc.stderr + proc.stdout  # the per-interval log line
    with open(tmp_path / 'run' / 'summary.csv') as f:
        row = next(csv.DictReader(f))
    model = timm.create_model('hmixer_symbreak_s4_32', num_classes=2, img_size=64, patch_size=16, embed_dim=32,
                              num_blocks=2, lcoeff=0.1)
    model.load_state_dict(model_state_dict(load_training_checkpoint(str(tmp_path / 'run' / 'last.pth.tar'))))
    # the epoch's mean over two steps of lr 1e-5, against the penalty of the final weights
    assert float(row['train_aux_loss']) == pytest.approx(model.aux_loss().item(), rel=1e-3)


def test_validate_rebuilds_their_ni2_checkpoint_with_n_iter_2_and_refuses_n_iter_1(tmp_path):
    size = dict(img_size=32, num_blocks=2, embed_dim=32)
    source = timm.create_model('hmixer_parallel_s16_224', n_iter=2, num_classes=2, **size)
    nn.init.normal_(source.head.weight)  # timm's Mixer head starts at zero: every model would score ln 2
    path = _write_checkpoint(tmp_path / 'model_best.pth.tar', source, 'paramixer_s16_224_ni2', **size)
    common = ('--checkpoint', path, '--dataset', 'triangle', '--data-dir', tmp_path / 'data', '--num-samples', 8,
              '-j', 0)
    proc = _run_script('validate.py', '--model', 'hmixer_parallel_s16_224', '--model-kwargs', 'n_iter=1', *common)
    assert proc.returncode == 2, proc.stderr
    assert 'model setting n_iter' in proc.stderr and 'n_iter=2' in proc.stderr, proc.stderr
    # their entry point's name is rebuilt as the model that computes it here: n_iter=2, not a silent n_iter=1
    def validate(checkpoint, name):
        out = tmp_path / f'{name}.json'
        proc = _run_script('validate.py', *common[:1], checkpoint, *common[2:], '--results-file', out)
        assert proc.returncode == 0, proc.stderr
        return json.loads(out.read_text())

    theirs = validate(path, 'theirs')
    ours = validate(_write_checkpoint(tmp_path / 'ours.pth.tar', source, 'hmixer_parallel_s16_224', n_iter=2, **size),
                    'ours')
    once = validate(_write_checkpoint(tmp_path / 'once.pth.tar', source, 'hmixer_parallel_s16_224', **size), 'once')
    assert theirs['model'] == 'hmixer_parallel_s16_224'
    assert theirs['loss'] == ours['loss'] != once['loss']
