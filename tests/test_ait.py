"""The AiT models as timm models: registry, sizes, timm API, state dicts, errors."""
import copy
from functools import partial

import pytest
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer

import timm_ait
from timm_ait.layers import GlobalWorkspaceLayer, LinearPatchEmbed
from timm_ait.models.ait import ABLATIONS, AssociativeTransformer, checkpoint_filter_fn
from timm_ait.train.task import DEFAULT_BALANCE_LOSS_COEF

# image-only models; the question-conditioned ones are tested in test_ait_relational.py
AIT_NAMES = timm.list_models('ait_*', exclude_filters=['*_patch5_75', '*_patch15_75'])

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
    # caught at construction, not at the first forward or as a ZeroDivisionError
    (dict(bottleneck=2.5), r"bottleneck must be >= 1 \(an integer, the top-k, or 'none' for dense attention\), got 2.5"),
    (dict(depth=0), r'depth must be >= 1 \(an integer\), got 0'),
    (dict(patch_size=0), r'patch_size must be >= 1 .*got 0'),
    (dict(beta=float('nan')), 'beta must be > 0 and finite, got nan'),
])
def test_configuration_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_bottleneck_none_string_is_the_dense_ablation_through_create_model():
    # the string survives timm.create_model (which drops None arguments) and a saved config.json
    for model in (tiny(bottleneck='none'), tiny(bottleneck='None'), tiny(ablation='no_bottleneck'),
                  timm.create_model('ait_small_patch4_32.cifar10', **{**TINY, 'bottleneck': 'none'}),
                  timm.create_model('ait_small_patch5_75', patch_size=15, embed_dim=32, num_heads=2, bottleneck='none')):
        assert all(blk.mlp.write_attn.bottleneck is None for blk in model.blocks)
    assert tiny(bottleneck='none')._model_args['bottleneck'] == 'none'
    assert tiny().blocks[0].mlp.write_attn.bottleneck == 10
    # None is "unset", as timm treats it: the variant's own k (512), not TINY's 10 and not dense
    assert tiny(bottleneck=None).blocks[0].mlp.write_attn.bottleneck == 512
    assert timm.create_model('ait_small_patch4_32', embed_dim=32, num_heads=2).blocks[0].mlp.write_attn.bottleneck == 512


def test_import_leaves_timm_create_model_as_timm_wrote_it():
    import timm.models._factory as factory
    assert timm.create_model is factory.create_model and timm.models.create_model is factory.create_model
    assert factory.create_model.__module__ == 'timm.models._factory'
    assert not hasattr(factory.create_model, '__wrapped__')


def test_bottleneck_none_built_directly_is_refused_naming_the_dense_value():
    with pytest.raises(ValueError, match="bottleneck='none' for the dense ablation"):
        AssociativeTransformer(img_size=16, patch_size=8, embed_dim=32, num_heads=2, num_slots=4, slot_dim=8,
                               gwl_heads=2, bottleneck=None)


@pytest.mark.parametrize('name', ['gwl', 'hopfield', 'self_attn', 'feed_forward', 'memory_l2norm', 'cap_bottleneck'])
@pytest.mark.parametrize('text, value', [('false', False), ('False', False), ('true', True), ('TRUE', True)])
def test_boolean_settings_given_as_words_mean_what_they_say(name, text, value):
    # --model-kwargs gwl=false and YAML/JSON strings arrive as text; 'false' is truthy in Python
    model, reference = tiny(**{name: text}), tiny(**{name: value})
    assert str(model) == str(reference)


@pytest.mark.parametrize('name', ['gwl', 'hopfield', 'memory_l2norm'])
def test_boolean_settings_that_are_not_booleans_are_refused(name):
    with pytest.raises(ValueError, match=f"{name} must be True or False, got 'maybe'"):
        tiny(**{name: 'maybe'})


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_input_dtype_the_model_cannot_run_is_named(dtype):
    model = tiny().eval()
    x = torch.zeros(2, 3, 16, 16, dtype=dtype)
    with pytest.raises(TypeError, match=rf'expected images of dtype torch.float32 .*got {dtype}'):
        model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # autocast casts half inputs, not float64 or integers
        if dtype in (torch.float16, torch.bfloat16):
            assert model(x).shape == (2, 10)
        else:
            with pytest.raises(TypeError, match=str(dtype)):
                model(x)
    # the question-answering AiT and the Mixers say the same
    qa = timm.create_model('ait_small_patch5_75', patch_size=15, embed_dim=32, num_heads=2).eval()
    with pytest.raises(TypeError, match=rf'images of dtype torch.float32 .*got {dtype}'):
        qa(torch.zeros(1, 3, 75, 75, dtype=dtype), torch.eye(11)[:1])
    mixer = timm.create_model('hmixer_parallel_s4_32', embed_dim=32, num_blocks=1).eval()
    with pytest.raises(TypeError, match=rf'images of dtype torch.float32 .*got {dtype}'):
        mixer(torch.zeros(1, 3, 32, 32, dtype=dtype))


def test_the_input_dtype_check_lets_torch_fx_trace():
    from timm_ait.layers.input_dtype import check_input_dtype

    class Scale(torch.nn.Module):
        def forward(self, x):
            check_input_dtype(x, torch.float32)
            return 2 * x

    traced = torch.fx.symbolic_trace(Scale())
    assert torch.equal(traced(torch.ones(2)), torch.full((2,), 2.0))


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


@pytest.mark.parametrize('write', [{}, dict(memory_decorrelation=0.05)], ids=['paper', 'decorrelating'])
def test_grad_checkpointing_gives_the_same_step(write):
    torch.manual_seed(0)
    ref = tiny(**write).train()
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


@pytest.mark.parametrize('wrapper', ['state_dict', 'model'])
def test_checkpoint_filter_unwraps_training_checkpoints(wrapper):
    # the weights of another model (another seed, memory written), unwrapped against a fresh one: every
    # value is the checkpoint's, and the loaded model computes what the saved one did
    torch.manual_seed(1)
    saved = tiny().train()
    saved(torch.randn(2, 3, 16, 16))
    saved_sd = saved.state_dict()
    torch.manual_seed(2)
    model = tiny()
    wrapped = {wrapper: {f'module.{k}': v.clone() for k, v in saved_sd.items()}, 'epoch': 3}
    out = checkpoint_filter_fn(wrapped, model)
    assert out.keys() == saved_sd.keys()
    for k, v in out.items():
        assert torch.equal(v, saved_sd[k]), k
    memory = 'blocks.0.mlp.memory.memory'
    assert not torch.equal(model.state_dict()[memory], saved_sd[memory])  # so the values tell them apart
    model.load_state_dict(out)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.eval()(x), saved.eval()(x))


def test_pretrained_from_a_local_file_resets_classifier(tmp_path):
    model = tiny()
    path = tmp_path / 'w.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('ait_small_patch4_32', pretrained=True, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert loaded.num_classes == 3
    assert torch.equal(loaded.blocks[0].mlp.memory.memory, model.blocks[0].mlp.memory.memory)


def test_is_a_vision_transformer():
    """An AiT is timm's ViT with GWLs as the blocks' MLP: a timm VisionTransformer built from the same
    arguments, given the GWL as mlp_layer, loads the AiT's state dict strictly and computes the same
    tokens, in eval and in a training forward (with the same memory written)."""
    torch.manual_seed(0)
    model = tiny(num_classes=0)
    assert isinstance(model, AssociativeTransformer) and isinstance(model, VisionTransformer)
    assert all(isinstance(b, Block) for b in model.blocks)
    with torch.no_grad():  # random norms and biases too, so that swapped or skipped layers show
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    vit = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0, global_pool='',
        qkv_bias=False, class_token=False, final_norm=False, embed_layer=LinearPatchEmbed,
        norm_layer=partial(timm.layers.LayerNorm, eps=1e-5),
        mlp_layer=partial(GlobalWorkspaceLayer, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10))
    vit.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vit.eval()(x))
        torch.testing.assert_close(model.train()(x), vit.train()(x))
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)


# --- the authors' checkpoints (github.com/yuweisunn/associative-transformer) ----------------------
# The reference below follows THEIR code (vit_hn.py, ait.py, MHA.py): their module and key names, their
# layouts and eps values, written from their source and never from this project's modules.

# Their AiT-Small with ait.py's CIFAR-10 defaults: vit_hn.ViT(image_size=32, patch_size=4, dim=768, depth=2,
# heads=12, mlp_dim=3072; dim_head=64), each feed-forward replaced by ait.ModularNN (memory_head=8,
# memory_dim=32, pattern_size=32, bottleneck=512).
THEIR_SMALL = dict(image=32, patch=4, channels=3, dim=768, depth=2, heads=12, dim_head=64, mlp_dim=3072,
                   slots=32, memory_dim=32, memory_heads=8, bottleneck=512, classes=10)
# the same layout at a size for quick checks, and our kwargs for it
THEIR_TINY = dict(THEIR_SMALL, dim=64, heads=2, dim_head=32, mlp_dim=128, slots=8, memory_dim=16,
                  memory_heads=2, bottleneck=10)
OUR_TINY = dict(embed_dim=64, num_heads=2, num_slots=8, slot_dim=16, gwl_heads=2, bottleneck=10)


def authors_checkpoint(t=THEIR_SMALL, seed=0):
    """A random ``net.state_dict()`` of their model: their keys and shapes, the unused ones included.

    Scales are chosen so that every LayerNorm's eps shows: the patch embedding's last norm has gains
    of 0.01, so the residual stream, and the blocks' pre-norm inputs, have a variance near 1e-4, where
    eps 1e-5 against 1e-6 changes the output by percents. The write's norm LN_m sees fc(out) + M per
    slot: fc(out) is small (its patches come from a norm of gain 0.01), so its variance is about that of
    a memory row, |row|^2 / m. Unit rows (as after any of their writes) give 1/32 there, where the eps
    moves LN_m by (1e-5 - 1e-6) / (2 * 0.03) = 1.5e-4 and the written memory by under the float32
    tolerance; rows of norm 0.1 give about 4e-4, where it moves LN_m by about 1%.
    """
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    linear = lambda out, inp, gain=1.0: randn(out, inp) * gain / inp ** 0.5
    norm = lambda n, gain=1.0: {'weight': gain * (1 + 0.1 * randn(n)), 'bias': gain * 0.1 * randn(n)}
    D, N = t['dim'], (t['image'] // t['patch']) ** 2
    patch_dim, inner = t['channels'] * t['patch'] ** 2, t['heads'] * t['dim_head']
    H, m, S = t['memory_heads'], t['memory_dim'], t['slots']
    modules = {
        'to_patch_embedding.1': norm(patch_dim),
        'to_patch_embedding.2': {'weight': linear(D, patch_dim), 'bias': 0.1 * randn(D)},
        'to_patch_embedding.3': norm(D, gain=0.01),
        'to_patch_embedding_cnn.0': {'weight': randn(768, 3, 5, 5), 'bias': randn(768)},  # built, never called
        'mlp_head.0': norm(N * D),
        'mlp_head.1': {'weight': linear(t['classes'], N * D), 'bias': 0.1 * randn(t['classes'])},
    }
    for i in range(t['depth']):
        layer, fn = f'transformer.layers.{i}', f'transformer.layers.{i}.1.fn'
        memory = randn(S, m)
        modules.update({
            f'{layer}.0.norm': norm(D),
            f'{layer}.0.fn.to_qkv': {'weight': linear(3 * inner, D)},
            f'{layer}.0.fn.to_out.0': {'weight': linear(D, inner, gain=0.01), 'bias': 0.001 * randn(D)},
            f'{layer}.1.norm': norm(D),
            f'{fn}.memoryupdate': {'memory': 0.1 * memory / memory.norm(dim=1, keepdim=True),
                                   'beta': torch.tensor(0.9)},
            f'{fn}.memoryupdate.mha.w_qs': {'weight': linear(H * m, m)},
            f'{fn}.memoryupdate.mha.w_ks': {'weight': linear(H * m, D)},
            f'{fn}.memoryupdate.mha.w_vs': {'weight': linear(H * m, D)},
            f'{fn}.memoryupdate.mha.fc': {'weight': linear(m, H * m)},
            f'{fn}.memoryupdate.mha.layer_norm': norm(m),
            f'{fn}.fc1': {'weight': linear(t['mlp_dim'], D), 'bias': 0.1 * randn(t['mlp_dim'])},
            f'{fn}.fc2': {'weight': linear(D, t['mlp_dim']), 'bias': 0.1 * randn(D)},
            f'{fn}.fc3': {'weight': linear(D, m), 'bias': 0.1 * randn(D)},
            f'{fn}.norm': norm(D, gain=0.01),
        })
    sd = {f'{module}.{leaf}': value for module, leaves in modules.items() for leaf, value in leaves.items()}
    sd.update(cls_token=randn(1, 1, D), pos_embedding=randn(1, N + 1, D))  # built, never used in forward
    return sd


def _their_cv_squared(x):
    # MHA.ScaledDotProductAttention.cv_squared
    if x.shape[0] == 1:
        return torch.tensor([0], dtype=x.dtype)
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


def authors_training_forward(sd, img, t=THEIR_SMALL):
    """vit_hn.ViT.forward with ait.ModularNN feed-forwards, as their training loop calls it, dropout off.

    Returns the logits, their ``aux_loss`` (the balance loss, already times 1e-2) and each layer's
    memory after its write.
    """
    F = torch.nn.functional

    def ln(x, name, eps=1e-5):  # nn.LayerNorm(dim), PyTorch's default eps, unless they set one
        return F.layer_norm(x, x.shape[-1:], sd[f'{name}.weight'], sd[f'{name}.bias'], eps)

    def linear(x, name):
        return F.linear(x, sd[f'{name}.weight'], sd.get(f'{name}.bias'))

    B, C, Hi, Wi = img.shape
    p = t['patch']
    # Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')
    x = img.reshape(B, C, Hi // p, p, Wi // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)
    x = ln(linear(ln(x, 'to_patch_embedding.1'), 'to_patch_embedding.2'), 'to_patch_embedding.3')
    N, D = x.shape[1:]  # ViT.forward adds no cls token and no position embedding
    aux_loss, memories = 0, []
    for i in range(t['depth']):
        layer, fn = f'transformer.layers.{i}', f'transformer.layers.{i}.1.fn'
        # PreNorm(dim, Attention): x = attn(x) + x
        q, k, v = linear(ln(x, f'{layer}.0.norm'), f'{layer}.0.fn.to_qkv').chunk(3, dim=-1)
        q, k, v = (u.reshape(B, N, t['heads'], -1).transpose(1, 2) for u in (q, k, v))  # 'b n (h d) -> b h n d'
        attn = torch.softmax(q @ k.transpose(-1, -2) * t['dim_head'] ** -0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)  # 'b h n d -> b n (h d)'
        x = linear(out, f'{layer}.0.fn.to_out.0') + x
        # PreNorm(dim, ModularNN): h, aux = ff(x); x = h + x
        out_moe = ln(linear(F.gelu(linear(ln(x, f'{layer}.1.norm').reshape(-1, D), f'{fn}.fc1')), f'{fn}.fc2'),
                     f'{fn}.norm')
        memory, loss = _their_memory_update(sd, f'{fn}.memoryupdate', out_moe, t)
        memories.append(memory)
        aux_loss = aux_loss + loss
        out_moe = out_moe.reshape(-1, N, D)
        y = linear(memory, f'{fn}.fc3')
        # hflayers.Hopfield with static patterns, scaling beta = 1, no norms or projections
        out_hf = torch.softmax(out_moe @ y.transpose(0, 1), dim=-1) @ y
        x = (out_hf + out_moe) + x
    return linear(ln(x.reshape(B, -1), 'mlp_head.0'), 'mlp_head.1'), aux_loss, memories


def _their_memory_update(sd, prefix, moe, t):
    """ait.MemoryUpdate.forward: MHA.MultiHeadAttention(memory, patches, patches, bottleneck), the EWMA
    through .data and the row normalisation."""
    F = torch.nn.functional
    mha, H, d, k = f'{prefix}.mha', t['memory_heads'], t['memory_dim'], t['bottleneck']
    mem = sd[f'{prefix}.memory']
    S, T = mem.shape[0], moe.shape[0]
    # MultiHeadAttention.forward, batch of one: b x lq x n x dv, then b x n x lq x dv
    q = F.linear(mem, sd[f'{mha}.w_qs.weight']).view(1, S, H, d).transpose(1, 2)
    key = F.linear(moe, sd[f'{mha}.w_ks.weight']).view(1, T, H, d).transpose(1, 2)
    v = F.linear(moe, sd[f'{mha}.w_vs.weight']).view(1, T, H, d).transpose(1, 2)
    # ScaledDotProductAttention.forward: one head at a time
    loss, output = 0, []
    for i in range(H):
        attn = torch.matmul(q / d ** 0.5, key.transpose(2, 3))[0][i]
        top_logits, top_indices = attn.topk(min(k + 1, attn.size(1)), dim=-1)
        gate = torch.zeros_like(attn).scatter(1, top_indices[:, :k], F.softmax(top_logits[:, :k], dim=-1))
        output.append(torch.matmul(gate, v[0, i, :, :]))
        loss += (_their_cv_squared(gate.sum(0)) + _their_cv_squared((gate > 0).sum(0))) * 1e-2
    output = torch.stack(output, dim=1)                        # (slots, heads, head_dim)
    out = output.transpose(1, 2).contiguous().view(1, S, -1)   # (1, slots, head_dim * heads): index d * H + h
    out = F.linear(out, sd[f'{mha}.fc.weight']) + mem          # self.dropout(self.fc(q)) + residual
    out = F.layer_norm(out, (d,), sd[f'{mha}.layer_norm.weight'], sd[f'{mha}.layer_norm.bias'], 1e-6)
    momentum = sd[f'{prefix}.beta']
    memory = mem * momentum + out.squeeze(0) * (1 - momentum)
    return memory / memory.pow(2).sum(1, keepdim=True).pow(0.5), loss


def _load_theirs(tmp_path, sd, name='ait_small_patch4_32', **kwargs):
    path = tmp_path / 'ait_cifar10_small_aitTrue_100.pth'  # the name their ait.py saves under
    torch.save(sd, path)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             memory_l2norm=True, **kwargs)


def test_norm_eps_and_write_dropout_defaults_and_overrides():
    # the defaults are what the authors trained (see AssociativeTransformer); each can be set
    model = tiny()
    assert {blk.norm1.eps for blk in model.blocks} | {blk.norm2.eps for blk in model.blocks} == {1e-5}
    assert model.blocks[0].mlp.write_norm.eps == 1e-6 and model.blocks[0].mlp.write_drop.p == 0.0
    other = tiny(norm_layer=partial(timm.layers.LayerNorm, eps=1e-6), gwl_write_norm_eps=1e-5, gwl_write_drop=0.1)
    assert other.blocks[1].norm2.eps == 1e-6 and other.blocks[1].mlp.write_norm.eps == 1e-5
    assert other.blocks[1].mlp.write_drop.p == 0.1


def test_their_checkpoint_has_the_papers_size():
    sd = authors_checkpoint()
    count = sum(v.numel() for k, v in sd.items() if not k.endswith('.beta'))  # beta is a buffer there
    assert round(count / 1e6, 1) == 15.8, count  # the paper's AiT-Small


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_authors_checkpoint_computes_their_training_forward(tmp_path, dtype):
    """Loaded through timm's pretrained path, our training forward is theirs: logits, written memory and
    balance loss. Batch 16 of 64 patches pools 1,024 > k = 512, so the top-k really selects.

    float32 is what users run: logits and memory to 1e-5, which the write norm's eps 1e-5 in place of
    1e-6 already breaks at this checkpoint's memory scale (see authors_checkpoint). Its rounding can
    flip a top-k choice between two near-equal scores (that moves one patch's load count by one, about
    5e-5 of the balance loss), so the balance loss, and a check tighter than any other eps or layout
    difference could pass, are made in float64, where no choice flips.
    """
    sd = authors_checkpoint()
    model = _load_theirs(tmp_path, sd).to(dtype).train()
    assert torch.equal(model.pos_embed, torch.zeros_like(model.pos_embed))  # their forward adds none
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert images.shape[0] * model.patch_embed.num_patches > model.blocks[0].mlp.write_attn.bottleneck

    expected, their_aux_loss, memories = authors_training_forward({k: v.to(dtype) for k, v in sd.items()}, images)
    logits = model(images)
    tol = 1e-5 if dtype == torch.float32 else 1e-7
    torch.testing.assert_close(logits, expected, rtol=tol, atol=tol)
    for block, memory in zip(model.blocks, memories):
        torch.testing.assert_close(block.mlp.memory.memory, memory, rtol=tol, atol=tol)
    # their aux_loss is the balance loss times 1e-2, summed over heads and layers (both in float32)
    balance = DEFAULT_BALANCE_LOSS_COEF * model.balance_loss()
    rtol = 1e-3 if dtype == torch.float32 else 1e-5
    torch.testing.assert_close(balance, their_aux_loss.reshape(()).to(balance.dtype), rtol=rtol, atol=0)


def test_authors_checkpoint_of_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r'missing: blocks\.2\.'):
        _load_theirs(tmp_path, authors_checkpoint(THEIR_TINY), **OUR_TINY, depth=3)


def test_authors_checkpoint_with_another_smoothing_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r'smoothing 0\.9, the model has smoothing=0\.8'):
        _load_theirs(tmp_path, authors_checkpoint(THEIR_TINY), **OUR_TINY, smoothing=0.8)


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


@pytest.mark.parametrize('name', ['ait_small_patch4_32', 'ait_small_patch5_75'])
def test_pretrained_weights_load_into_a_model_built_without_classes(tmp_path, name):
    # timm's feature-extractor idiom: create_model(..., pretrained=True, num_classes=0)
    kwargs = dict(TINY, img_size=15, patch_size=5) if name.endswith('_75') else TINY
    source = timm.create_model(name, num_classes=3, **kwargs).eval()
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path)),
                              **kwargs).eval()
    inputs = (torch.randn(2, 3, kwargs['img_size'], kwargs['img_size']),)
    if name.endswith('_75'):
        inputs += (torch.eye(11)[:2],)  # one-hot questions of the default question_dim
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), source.forward_features(*inputs), rtol=0, atol=0)
