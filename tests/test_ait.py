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
    assert final.shape == (2, 16, 32) and len(inter) == 2 and inter[0].shape == (2, 32, 4, 4)
    fm = timm.create_model('ait_small_patch4_32', features_only=True, out_indices=(0, 1), **TINY)
    assert [f.shape for f in fm(x)] == [(2, 32, 4, 4)] * 2

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
