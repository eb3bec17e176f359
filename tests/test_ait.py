"""The AiT models as timm models: registry, sizes, timm API, state dicts, errors."""
import copy

import pytest
import timm
import torch

import timm_ait
from timm_ait.models.ait import ABLATIONS, AssociativeTransformer, checkpoint_filter_fn

# image-only models; the question-conditioned ones are tested in test_ait_relational.py
AIT_NAMES = timm.list_models('ait_*', exclude_filters=['*_patch5_75'])

# a tiny AiT with the structure of the real ones, for tests that do not need their size
TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=16)


def tiny(name='ait_small_patch4_32', **kwargs):
    return timm.create_model(name, **{**TINY, **kwargs})


def test_all_names_registered():
    expected = {f'ait_{s}_{p}' for s in ('small', 'medium', 'base')
                for p in ('patch4_32', 'patch32_64', 'patch16_224')} | {'ait_small', 'ait_medium', 'ait_base'}
    assert expected <= set(AIT_NAMES)


@pytest.mark.parametrize('name', AIT_NAMES)
def test_every_model_builds_runs_forward_backward(name):
    model = timm.create_model(name, num_classes=5)
    C, H, W = model.pretrained_cfg['input_size']
    x = torch.randn(2, C, H, W)
    y = model(x)
    assert y.shape == (2, 5)
    (y.sum() + model.balance_loss()).backward()
    assert model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize('name,paper', [
    ('ait_small_patch4_32', 15.8e6), ('ait_medium_patch4_32', 45.9e6), ('ait_base_patch4_32', 91.0e6)])
def test_parameter_counts_match_the_paper(name, paper):
    with torch.device('meta'):
        model = timm.create_model(name, num_classes=10)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - paper) / paper < 0.01, count


def test_vit_twin_has_no_gwl_and_the_papers_vit_sizes():
    with torch.device('meta'):
        vit_s = timm.create_model('ait_small_patch4_32', gwl=False)
        vit_b = timm.create_model('ait_base_patch4_32', gwl=False)
    assert not any(isinstance(m, timm_ait.layers.GlobalWorkspaceLayer) for m in vit_s.modules())
    for model, paper in ((vit_s, 14.9e6), (vit_b, 85.7e6)):
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - paper) / paper < 0.01


def test_variant_settings():
    cifar, tri, pet = (timm.create_model(n) for n in ('ait_small', 'ait_small_patch32_64', 'ait_small_patch16_224'))
    for model, k, slots, classes in ((cifar, 512, 32, 10), (tri, 64, 32, 2), (pet, 512, 128, 37)):
        gwl = model.blocks[0].mlp
        assert gwl.write_attn.bottleneck == k and gwl.memory.num_slots == slots
        assert model.num_classes == classes
    assert len(timm.create_model('ait_medium').blocks) == 6
    assert timm.create_model('ait_small_patch4_32.cifar100').num_classes == 100


def test_balance_loss_api():
    model = tiny().train()
    x = torch.randn(2, 3, 16, 16)
    model(x)
    per_layer = [blk.mlp.balance_loss for blk in model.blocks]
    torch.testing.assert_close(timm_ait.balance_loss(model), sum(per_layer))
    torch.testing.assert_close(model.balance_loss(), sum(per_layer))
    model.eval()
    model(x)
    assert model.balance_loss() is None
    assert timm_ait.balance_loss(tiny(gwl=False)) is None


def test_eval_model_is_batch_independent_and_does_not_write():
    torch.manual_seed(0)
    model = tiny().train()
    model(torch.randn(4, 3, 16, 16))
    model.eval()
    memory = {k: v.clone() for k, v in model.state_dict().items() if k.endswith('memory.memory')}
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    for k, v in memory.items():
        assert torch.equal(model.state_dict()[k], v)


def test_training_writes_every_layers_memory():
    model = tiny().train()
    before = [blk.mlp.memory.memory.clone() for blk in model.blocks]
    model(torch.randn(2, 3, 16, 16))
    assert all(not torch.equal(b, blk.mlp.memory.memory) for b, blk in zip(before, model.blocks))


@pytest.mark.parametrize('ablation', sorted(ABLATIONS))
def test_ablations(ablation):
    model = tiny(ablation=ablation)
    y = model(torch.randn(2, 3, 16, 16))
    y.sum().backward()
    gwl = model.blocks[0].mlp
    if ablation == 'no_memory':
        assert not isinstance(gwl, timm_ait.layers.GlobalWorkspaceLayer)
    elif ablation == 'no_hopfield':
        assert isinstance(gwl.read, timm_ait.layers.CrossAttentionRetrieval)
    elif ablation == 'no_bottleneck':
        assert gwl.write_attn.bottleneck is None
    elif ablation == 'no_self_attn':
        assert model.blocks[0].attn is None
    elif ablation == 'no_feed_forward':
        assert isinstance(gwl.fc1, torch.nn.Identity)
    assert model.memory_reset_each_epoch == (ablation == 'reset_memory')


def test_memory_init_keyword_and_reset():
    model = tiny(memory_init='identity')
    mem = model.blocks[0].mlp.memory
    assert torch.equal(mem.memory[:6], torch.eye(6, 8))
    model.train()(torch.randn(2, 3, 16, 16))
    model.reset_memory()
    assert torch.equal(mem.memory[:6], torch.eye(6, 8))


@pytest.mark.parametrize('kwargs,match', [
    (dict(ablation='no_gwl'), "unknown ablation 'no_gwl'"),
    (dict(memory_init='orthogonal'), "unknown memory_init 'orthogonal'"),
    (dict(bottleneck=0), 'bottleneck must be >= 1'),
    (dict(num_slots=0), 'num_slots must be >= 1'),
    (dict(gwl_heads=0), 'gwl_heads must be >= 1'),
    (dict(num_heads=3), 'embed_dim 32 is not divisible by num_heads 3'),
])
def test_configuration_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_input_errors_name_expected_and_received():
    model = tiny()
    with pytest.raises(ValueError, match=r'\(B, 3, 16, 16\).*got \(2, 1, 16, 16\)'):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r'\(B, 3, 16, 16\).*got \(2, 3, 32, 32\)'):
        model(torch.randn(2, 3, 32, 32))


def test_timm_api():
    model = tiny(num_classes=7).eval()
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 16 * 32)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 16 * 32)
    assert 'pos_embed' in model.no_weight_decay()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert any(n.startswith('blocks.1') for g in groups.values() for n in g)

    final, inter = model.forward_intermediates(x)
    assert final.shape == (2, 16, 32) and len(inter) == 3 and inter[0].shape == (2, 32, 4, 4)
    fm = timm.create_model('ait_small_patch4_32', features_only=True, out_indices=(0, 1), **TINY)
    assert [f.shape for f in fm(x)] == [(2, 32, 4, 4)] * 2


def grid(tokens):
    return tokens.reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize('depth', [1, 2, 3])
def test_feature_levels_are_the_embedding_then_each_block(depth):
    # level 0: the tokens entering the first block; level i: the output of block i - 1, so a 2-block AiT
    # has the 3 levels timm's features_only takes by default
    model = tiny(depth=depth, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    assert len(model.feature_info) == depth + 1
    assert [f['module'] for f in model.feature_info] == ['norm_pre'] + [f'blocks.{i}' for i in range(depth)]
    with torch.no_grad():
        tokens = [model.norm_pre(model._pos_embed(model.patch_embed(x)))]
        for blk in model.blocks:
            tokens.append(blk(tokens[-1]))
        final, levels = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(levels) == depth + 1
        for level, expected in zip(levels, tokens):
            torch.testing.assert_close(level, grid(expected))
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        torch.testing.assert_close(last[0], grid(tokens[-1]))

        features = timm.create_model('ait_small_patch4_32', features_only=True, depth=depth, **TINY).eval()
        features.model.load_state_dict(model.state_dict(), strict=False)  # the head is pruned
        taken = tokens[-3:]  # the last 3 levels by default
        assert len(features(x)) == len(taken) == min(3, depth + 1)
        for feature, expected in zip(features(x), taken):
            torch.testing.assert_close(feature, grid(expected))
        # pruning keeps the blocks up to the last level taken: none for level 0
        model.prune_intermediate_layers([0])
        assert len(model.blocks) == 0
        torch.testing.assert_close(model.forward_intermediates(x, indices=[0], intermediates_only=True)[0],
                                   grid(tokens[0]))

    pooled = tiny(global_pool='avg', num_classes=4)
    assert pooled(x).shape == (2, 4)
    assert pooled.forward_head(pooled.forward_features(x), pre_logits=True).shape == (2, 32)


def test_flatten_head_starts_with_small_logits():
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch4_32').eval()
    with torch.no_grad():
        logits = model(torch.randn(8, 3, 32, 32))
    assert logits.std() < 1.0  # a plain std-0.02 init over 64*768 inputs gives about 4


def test_drop_path_rate():
    model = tiny(drop_path_rate=0.2)
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)


def test_grad_checkpointing_gives_the_same_step():
    torch.manual_seed(0)
    ref = tiny().train()
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(3, 3, 16, 16)
    for model in (ref, ckpt):
        torch.manual_seed(1)
        (model(x).square().mean() + model.balance_loss()).backward()
    for (k, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)  # memory written exactly once
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_state_dict_round_trips_bit_for_bit(tmp_path):
    model = tiny().train()
    model(torch.randn(2, 3, 16, 16))  # memory moved away from its initial value
    path = tmp_path / 'ait.pth'
    torch.save(model.state_dict(), path)
    other = tiny()
    other.load_state_dict(torch.load(path))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_state_dict_of_another_variant_names_the_keys():
    small = tiny()
    deeper = tiny(depth=3)
    with pytest.raises(RuntimeError, match=r'blocks\.2\.'):
        small.load_state_dict(deeper.state_dict())
    with pytest.raises(ValueError, match=r'unexpected: blocks\.2\.'):
        checkpoint_filter_fn(deeper.state_dict(), small)
    wide = tiny(num_slots=9)
    with pytest.raises(ValueError, match=r'blocks\.0\.mlp\.memory\.memory: checkpoint \(9, 8\), model \(6, 8\)'):
        checkpoint_filter_fn(wide.state_dict(), small)


def test_checkpoint_filter_unwraps_training_checkpoints():
    model = tiny()
    wrapped = {'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}, 'epoch': 3}
    out = checkpoint_filter_fn(wrapped, model)
    assert out.keys() == model.state_dict().keys()


def test_pretrained_from_a_local_file_resets_classifier(tmp_path):
    model = tiny()
    path = tmp_path / 'w.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('ait_small_patch4_32', pretrained=True, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert loaded.num_classes == 3
    assert torch.equal(loaded.blocks[0].mlp.memory.memory, model.blocks[0].mlp.memory.memory)


def test_is_a_vision_transformer():
    assert isinstance(tiny(), (AssociativeTransformer, timm.models.VisionTransformer))


# --- the authors' checkpoints (github.com/yuweisunn/associative-transformer) ----------------------

AUTHORS = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_slots=8, slot_dim=16,
               gwl_heads=2, bottleneck=10, memory_l2norm=True, num_classes=10)


def authors_state_dict(model):
    """``model``'s weights under the names of the authors' vit_hn.py + ait.py, with their unused extras."""
    names = {'patch_embed.norm_in': 'to_patch_embedding.1', 'patch_embed.proj': 'to_patch_embedding.2',
             'patch_embed.norm': 'to_patch_embedding.3', 'fc_norm': 'mlp_head.0', 'head': 'mlp_head.1'}
    for i in range(len(model.blocks)):
        layer, fn = f'transformer.layers.{i}', f'transformer.layers.{i}.1.fn'
        names.update({
            f'blocks.{i}.norm1': f'{layer}.0.norm', f'blocks.{i}.attn.qkv': f'{layer}.0.fn.to_qkv',
            f'blocks.{i}.attn.proj': f'{layer}.0.fn.to_out.0', f'blocks.{i}.norm2': f'{layer}.1.norm',
            f'blocks.{i}.mlp.fc1': f'{fn}.fc1', f'blocks.{i}.mlp.fc2': f'{fn}.fc2', f'blocks.{i}.mlp.norm': f'{fn}.norm',
            f'blocks.{i}.mlp.read.up': f'{fn}.fc3', f'blocks.{i}.mlp.memory': f'{fn}.memoryupdate',
            f'blocks.{i}.mlp.write_attn.q': f'{fn}.memoryupdate.mha.w_qs',
            f'blocks.{i}.mlp.write_attn.k': f'{fn}.memoryupdate.mha.w_ks',
            f'blocks.{i}.mlp.write_attn.v': f'{fn}.memoryupdate.mha.w_vs',
            f'blocks.{i}.mlp.write_attn.proj': f'{fn}.memoryupdate.mha.fc',
            f'blocks.{i}.mlp.write_norm': f'{fn}.memoryupdate.mha.layer_norm',
        })
    out = {}
    for key, value in model.state_dict().items():
        if key == 'pos_embed':
            continue  # their forward has none
        module, leaf = key.rsplit('.', 1)
        out[f'{names[module]}.{leaf}'] = value.clone()
    D, N = model.embed_dim, model.patch_embed.num_patches
    out.update({'cls_token': torch.randn(1, 1, D), 'pos_embedding': torch.randn(1, N + 1, D),
                'to_patch_embedding_cnn.0.weight': torch.randn(D, 3, 5, 5), 'to_patch_embedding_cnn.0.bias': torch.randn(D)})
    for i in range(len(model.blocks)):
        out[f'transformer.layers.{i}.1.fn.memoryupdate.beta'] = torch.tensor(0.9)
    return out


def authors_forward(sd, images, depth, heads, gwl_heads, bottleneck, patch=8):
    """A training step's forward as the authors' code computes it, from their state dict.

    Returns the logits and each layer's memory after the write.
    """
    F = torch.nn.functional
    ln = lambda t, name, eps=1e-5: F.layer_norm(t, t.shape[-1:], sd[f'{name}.weight'], sd[f'{name}.bias'], eps)
    linear = lambda t, name: F.linear(t, sd[f'{name}.weight'], sd.get(f'{name}.bias'))
    B, C, H, W = images.shape
    # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
    x = images.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)
    x = x.reshape(B, (H // patch) * (W // patch), patch * patch * C)
    x = ln(linear(ln(x, 'to_patch_embedding.1'), 'to_patch_embedding.2'), 'to_patch_embedding.3')
    N, D = x.shape[1:]
    memories = []
    for i in range(depth):
        layer, fn = f'transformer.layers.{i}', f'transformer.layers.{i}.1.fn'
        q, k, v = linear(ln(x, f'{layer}.0.norm'), f'{layer}.0.fn.to_qkv').chunk(3, dim=-1)
        q, k, v = (t.reshape(B, N, heads, -1).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        x = x + linear(a.transpose(1, 2).reshape(B, N, -1), f'{layer}.0.fn.to_out.0')

        h = ln(linear(F.gelu(linear(ln(x, f'{layer}.1.norm'), f'{fn}.fc1')), f'{fn}.fc2'), f'{fn}.norm')
        s = h.reshape(B * N, D)  # every patch of the batch competes
        M = sd[f'{fn}.memoryupdate.memory']
        S, m = M.shape
        heads_of = lambda t: t.reshape(t.shape[0], gwl_heads, m).transpose(0, 1)
        Q = heads_of(linear(M, f'{fn}.memoryupdate.mha.w_qs'))
        K, V = heads_of(linear(s, f'{fn}.memoryupdate.mha.w_ks')), heads_of(linear(s, f'{fn}.memoryupdate.mha.w_vs'))
        scores = Q @ K.transpose(-1, -2) / m ** 0.5
        top, index = scores.topk(bottleneck, dim=-1)
        gates = torch.zeros_like(scores).scatter(-1, index, top.softmax(-1))
        O = linear((gates @ V).transpose(0, 1).reshape(S, gwl_heads * m), f'{fn}.memoryupdate.mha.fc')
        candidate = ln(O + M, f'{fn}.memoryupdate.mha.layer_norm', eps=1e-6)
        M = 0.9 * M + 0.1 * candidate
        M = M / M.norm(dim=1, keepdim=True)
        memories.append(M)
        Y = linear(M, f'{fn}.fc3')
        x = x + torch.softmax(h @ Y.T, dim=-1) @ Y + h  # static Hopfield read, beta 1, plus its skip
    return linear(ln(x.reshape(B, -1), 'mlp_head.0'), 'mlp_head.1'), memories


def test_authors_checkpoint_converts_and_computes_what_their_code_computes():
    torch.manual_seed(0)
    source = timm.create_model('ait_small_patch4_32', **AUTHORS)
    with torch.no_grad():  # weights far from their init, so that a swapped name cannot go unnoticed
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        for block in source.blocks:
            block.mlp.memory.memory.normal_()
    theirs = authors_state_dict(source)

    model = timm.create_model('ait_small_patch4_32', **AUTHORS)
    model.load_state_dict(checkpoint_filter_fn(theirs, model))
    assert torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))  # their forward adds none

    images = torch.randn(3, 3, 32, 32)
    expected, memories = authors_forward(theirs, images, depth=2, heads=2, gwl_heads=2, bottleneck=10)
    logits = model.train()(images)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    for block, memory in zip(model.blocks, memories):
        torch.testing.assert_close(block.mlp.memory.memory, memory, rtol=1e-5, atol=1e-5)


def test_authors_checkpoint_of_another_size_is_refused():
    theirs = authors_state_dict(timm.create_model('ait_small_patch4_32', **AUTHORS))
    model = timm.create_model('ait_small_patch4_32', **{**AUTHORS, 'depth': 3})
    with pytest.raises(ValueError, match=r'missing: blocks\.2\.'):
        checkpoint_filter_fn(theirs, model)


def test_set_input_size_resamples_the_flatten_head_per_token():
    # A head whose weights are the same at every token, on a constant image (identical tokens: attention,
    # the GWL read and the flatten LayerNorm see the same token N or 4N times), gives the same logits at
    # twice the size once the classifier is scaled by old / new token count: the resampling keeps a
    # constant field and the scale keeps the sum over tokens.
    torch.manual_seed(0)
    model = tiny(pos_embed='none', num_classes=4).eval()
    D, T = model.embed_dim, model.head_hidden_size // model.embed_dim
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(4, 1, D).expand(-1, T, -1).reshape(4, -1))
        model.fc_norm.weight.copy_(torch.randn(D).repeat(T))
        model.fc_norm.bias.copy_(torch.randn(D).repeat(T))
        x = torch.ones(2, 3, 16, 16) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1)
        before = model(x)
        model.requires_grad_(False)
        model.set_input_size(img_size=32)
        after = model(torch.ones(2, 3, 32, 32) * torch.tensor([0.3, -1.0, 2.0]).view(1, 3, 1, 1))
    assert model.patch_embed.grid_size == (8, 8) and model.head.in_features == 64 * D == model.head_hidden_size
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())  # frozen weights stay frozen
    with pytest.raises(ValueError, match='cannot change its patch size'):
        model.set_input_size(patch_size=8)


def test_a_model_built_without_classes_returns_its_tokens():
    model = tiny(num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model.global_pool == '' and model.num_features == model.head_hidden_size == 32
    torch.testing.assert_close(model(x), model.forward_features(x))
    assert 'fc_norm.weight' not in model.state_dict()
    # reset_classifier(0) on a classifier keeps its flatten head: pre-logits of N * D
    with_head = tiny(num_classes=3).eval()
    with_head.reset_classifier(0)
    assert with_head(x).shape == (2, 16 * 32)


def test_meta_device_builds_put_the_head_there_too():
    model = tiny(num_classes=3, device='meta')
    assert {p.device.type for p in model.parameters()} == {'meta'}
    model.reset_classifier(5)
    assert model.head.weight.device.type == 'meta'
