"""The question-conditioned AiT (Sort-of-CLEVR): registry, inputs, timm API, state dicts, errors."""
import copy

import pytest
import timm
import timm.optim
import torch

import timm_ait
from timm_ait.data import sort_of_clevr
from timm_ait.models.ait import AssociativeTransformer, checkpoint_filter_fn
from timm_ait.models.ait_relational import (
    SORT_OF_CLEVR_ANSWERS, SORT_OF_CLEVR_QUESTION_DIM, RelationalAssociativeTransformer)
from timm_ait.train.task import AiTClassificationTask

NAMES = ('ait_small_patch5_75', 'ait_base_patch5_75')
CPU_SCALE_NAMES = ('ait_small_w256_patch15_75',)  # narrowed for Sort-of-CLEVR runs on a CPU
QD = SORT_OF_CLEVR_QUESTION_DIM
# a tiny model with the structure of the real ones: 15x15 images, patch 5 -> 9 patches + 1 question
TINY = dict(embed_dim=32, num_heads=2, num_slots=6, slot_dim=8, gwl_heads=2, bottleneck=10, img_size=15)
N_TOKENS = 9 + 1


def tiny(name='ait_small_patch5_75', **kwargs):
    return timm.create_model(name, **{**TINY, **kwargs})


def questions(*specs):
    """One-hot questions from (colour 0-5, relational 0/1, subtype 0-2) triples, as the data encodes them."""
    q = torch.zeros(len(specs), QD)
    for i, (color, relational, subtype) in enumerate(specs):
        q[i, color] = q[i, 6 + relational] = q[i, 8 + subtype] = 1.
    return q


def inputs(batch=4, size=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = [(i % 6, (i // 6) % 2, i % 3) for i in range(batch)]
    return torch.rand(batch, 3, size, size, generator=g), questions(*specs)


def test_names_and_pretrained_cfgs():
    assert set(timm.list_models('ait_*_75')) == set(NAMES + CPU_SCALE_NAMES)
    assert set(timm.list_pretrained('ait_*_75*')) == {f'{n}.sort_of_clevr' for n in NAMES + CPU_SCALE_NAMES}
    for name in NAMES + CPU_SCALE_NAMES:
        cfg = timm.models.get_pretrained_cfg(f'{name}.sort_of_clevr').to_dict()
        assert cfg['hf_hub_id'] == timm_ait.hub.hf_hub_id(name, 'sort_of_clevr')
        assert cfg['input_size'] == (3, 75, 75) and cfg['num_classes'] == 10
        assert cfg['mean'] == (0., 0., 0.) and cfg['std'] == (1., 1., 1.)
        assert cfg['label_names'] == SORT_OF_CLEVR_ANSWERS


def test_the_model_reads_the_generated_data_and_names_its_answers(tmp_path):
    """A generated item goes through the registered model, and the cfg's label names are the data's answers:
    a count question's answer is named by the number of objects sharing the asked object's shape, counted
    in the scene here."""
    from timm_ait.data.sort_of_clevr import SortOfClevr, decode_question
    data = SortOfClevr(root=str(tmp_path), split='test', num_images=4, progress=False)
    model = timm.create_model('ait_small_patch5_75', embed_dim=32, num_heads=2).eval()
    names = model.pretrained_cfg['label_names']
    (image, question), answer = data[0]
    assert model(image[None], question[None]).shape == (1, len(names))
    checked = 0
    for i in range(len(data)):
        color, relational, subtype = decode_question(data.questions[i])
        if relational and subtype == 2:  # "how many objects have the shape of the <color> object?"
            shapes = data.shapes[data.image_index[i]]
            assert names[int(data.answers[i])] == str(int((shapes == shapes[color]).sum()))
            checked += 1
    assert checked > 0


@pytest.mark.parametrize('name', NAMES)
def test_full_size_models_build_train_and_answer(name):
    # on the meta device: the full-size graph (train forward, backward, eval) without the arithmetic
    with torch.device('meta'):
        model = timm.create_model(name)
        assert isinstance(model, RelationalAssociativeTransformer)
        assert model.patch_embed.num_patches == 225 and model.question_dim == 11 and model.num_classes == 10
        gwl = model.blocks[0].mlp
        assert gwl.write_attn.bottleneck == 256 and gwl.memory.num_slots == 32
        assert len(model.blocks) == {'ait_small_patch5_75': 2, 'ait_base_patch5_75': 12}[name]
        assert model.head_hidden_size == 226 * 768
        x, q = torch.empty(2, 3, 75, 75), torch.empty(2, QD)
        y = model.train()(x, q)
        assert y.shape == (2, 10)
        (y.sum() + model.balance_loss()).backward()
        assert model.question_embed.proj.weight.grad.shape == (768, QD)
        assert model.eval()(x, q).shape == (2, 10)


def test_cpu_scale_model_is_ait_small_narrowed_with_the_papers_share_of_the_pool():
    small, narrow = timm.create_model('ait_small_patch5_75'), timm.create_model('ait_small_w256_patch15_75')
    assert isinstance(narrow, RelationalAssociativeTransformer)
    assert len(narrow.blocks) == len(small.blocks) == 2
    assert narrow.embed_dim == 256 and narrow.blocks[0].attn.num_heads == 4  # heads of 64, as the paper's 768 / 12
    assert narrow.patch_embed.num_patches == 25 and narrow.head_hidden_size == 26 * 256
    gwl, paper_gwl = narrow.blocks[0].mlp, small.blocks[0].mlp
    assert gwl.memory.num_slots == paper_gwl.memory.num_slots == 32
    assert gwl.memory.slot_dim == paper_gwl.memory.slot_dim and gwl.write_attn.num_heads == paper_gwl.write_attn.num_heads
    # k / (batch 64 x tokens): 256 / (64 x 226) = 1.8% in the paper, 32 / (64 x 26) = 1.9% here
    assert abs(gwl.write_attn.bottleneck / (64 * 26) - paper_gwl.write_attn.bottleneck / (64 * 226)) < 0.002
    twin = timm.create_model('ait_small_w256_patch15_75', gwl=False)
    assert not any(isinstance(m, timm_ait.layers.GlobalWorkspaceLayer) for m in twin.modules())
    x, q = inputs(batch=2, size=75)
    assert narrow.train()(x, q).shape == twin.train()(x, q).shape == (2, 10)


def test_full_size_small_model_answers_on_cpu():
    """The full-size model's logits as the paper's section 4.7 composes them: the question through
    LN -> Linear -> LN, one token after the 225 position-embedded patches, the blocks, then the head over
    all 226 tokens, LN((N + 1) D) -> Linear. Written with torch's functions from the state dict; only the
    patch embedding and the blocks are the model's modules."""
    F = torch.nn.functional
    torch.manual_seed(0)
    model = timm.create_model('ait_small_patch5_75').eval()
    with torch.no_grad():  # norms with random gains and biases, so that a missing or misplaced one shows
        for name, p in model.named_parameters():
            if name.startswith(('question_embed.', 'fc_norm.')):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith('norm_in.weight') else 0.0))
    x, _ = inputs(batch=1, size=75)
    x, q = x.expand(2, -1, -1, -1), questions((0, 0, 0), (3, 1, 2))  # one image, two questions
    sd = model.state_dict()
    with torch.no_grad():
        y = model(x, q)
        token = F.layer_norm(q, (QD,), sd['question_embed.norm_in.weight'], sd['question_embed.norm_in.bias'])
        token = F.linear(token, sd['question_embed.proj.weight'], sd['question_embed.proj.bias'])
        token = F.layer_norm(token, (768,), sd['question_embed.norm.weight'], sd['question_embed.norm.bias'])
        tokens = torch.cat([model.patch_embed(x) + sd['pos_embed'], token[:, None]], dim=1)
        assert tokens.shape == (2, 226, 768)
        for blk in model.blocks:
            tokens = blk(tokens)
        flat = F.layer_norm(tokens.flatten(1), (226 * 768,), sd['fc_norm.weight'], sd['fc_norm.bias'])
        expected = F.linear(flat, sd['head.weight'], sd['head.bias'])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y[0], y[1], atol=1e-3)  # the question decides the answer


@pytest.mark.parametrize('name,gwl', [
    ('ait_small_patch5_75', True), ('ait_small_patch5_75', False), ('ait_base_patch5_75', True)])
def test_parameters_are_the_image_models_plus_question_embed_and_one_head_token(name, gwl):
    with torch.device('meta'):
        model = timm.create_model(name, gwl=gwl)
        image_only = AssociativeTransformer(
            img_size=75, patch_size=5, num_classes=10, embed_dim=768, depth=len(model.blocks),
            num_heads=12, bottleneck=256, gwl=gwl)
    D, classes = 768, 10
    question_embed = 2 * QD + QD * D + D + 2 * D
    one_more_head_token = 2 * D + D * classes
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in image_only.parameters()) + question_embed + one_more_head_token


def test_forward_backward_train():
    model = tiny().train()
    x, q = inputs()
    y = model(x, q)
    assert y.shape == (4, 10)
    (y.square().mean() + 1e-2 * model.balance_loss()).backward()
    for p in (model.question_embed.proj.weight, model.patch_embed.proj.weight, model.head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_question_changes_the_answer():
    torch.manual_seed(0)
    model = tiny().eval()
    x, _ = inputs(batch=1)
    q = questions((0, 0, 0), (3, 1, 2))
    with torch.no_grad():
        y = model(x.expand(2, -1, -1, -1), q)
    assert not torch.allclose(y[0], y[1], atol=1e-4)


def test_eval_is_batch_independent_and_does_not_write():
    torch.manual_seed(0)
    model = tiny().train()
    model(*inputs(seed=1))
    model.eval()
    memory = [blk.mlp.memory.memory.clone() for blk in model.blocks]
    x, q = inputs(batch=6)
    with torch.no_grad():
        batch = model(x, q)
        single = torch.cat([model(x[i:i + 1], q[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(m, blk.mlp.memory.memory) for m, blk in zip(memory, model.blocks))
    assert model.balance_loss() is None


def test_vit_twin():
    torch.manual_seed(0)
    model = tiny(gwl=False)
    assert not any(isinstance(m, timm_ait.layers.GlobalWorkspaceLayer) for m in model.modules())
    x, q = inputs()
    y = model(x, q)
    assert y.shape == (4, 10)
    y.sum().backward()
    assert model.question_embed.proj.weight.grad is not None
    assert model.balance_loss() is None
    model.eval()
    with torch.no_grad():
        y = model(x[:1].expand(2, -1, -1, -1), questions((0, 0, 0), (3, 1, 2)))
    assert not torch.allclose(y[0], y[1], atol=1e-4)


@pytest.mark.parametrize('q,error,match', [
    (torch.zeros(2, 10), ValueError, r'questions of shape \(B, 11\).*got \(2, 10\)'),
    (torch.zeros(11), ValueError, r'questions of shape \(B, 11\).*got \(11,\)'),
    (torch.zeros(2, 1, 11), ValueError, r'got \(2, 1, 11\)'),
    (torch.zeros(3, 11), ValueError, '2 images but 3 questions'),
    (torch.zeros(2, 11, dtype=torch.long), TypeError, 'floating point.*torch.int64'),
    (torch.zeros(2, 11, dtype=torch.bool), TypeError, 'floating point.*torch.bool'),
    ([[0.] * 11] * 2, TypeError, 'tensor.*got list'),
])
def test_question_errors(q, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        model(torch.rand(2, 3, 15, 15), q)


def test_image_errors_and_missing_questions():
    model = tiny()
    with pytest.raises(ValueError, match=r'\(B, 3, 15, 15\).*got \(2, 3, 75, 75\)'):
        model(torch.rand(2, 3, 75, 75), questions((0, 0, 0), (1, 0, 0)))
    with pytest.raises(TypeError, match='questions'):
        model(torch.rand(2, 3, 15, 15))
    with pytest.raises(ValueError, match='question_dim must be >= 1'):
        tiny(question_dim=0)


def test_other_question_sizes_and_dtypes():
    model = tiny(question_dim=5).eval()
    x, _ = inputs(batch=2)
    assert model(x, torch.rand(2, 5)).shape == (2, 10)
    torch.testing.assert_close(model(x, torch.eye(5)[:2].double()), model(x, torch.eye(5)[:2]))


def test_timm_api():
    model = tiny(num_classes=7).eval()
    x, q = inputs(batch=2)
    feats = model.forward_features(x, q)
    assert feats.shape == (2, N_TOKENS, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, N_TOKENS * 32)
    torch.testing.assert_close(model.forward_head(feats), model(x, q))
    # the question token is last, so the patch tokens do not depend on it before the first block
    torch.testing.assert_close(model._embed(x, q)[:, -1:], model.embed_question(q))

    assert 'pos_embed' in model.no_weight_decay()
    groups = timm.models.group_parameters(model, model.group_matcher())
    stem = next(g for g in groups.values() if 'patch_embed.proj.weight' in g)
    assert {'question_embed.proj.weight', 'question_embed.norm.bias'} <= set(stem)
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-4, weight_decay=0.01)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    assert id(model.question_embed.proj.weight) in decayed
    assert id(model.question_embed.norm.bias) not in decayed and id(model.pos_embed) not in decayed

    final, inter = model.forward_intermediates(x, q)
    # feature levels as the image-only AiT's: the embedded tokens, then each block's output
    assert final.shape == (2, N_TOKENS, 32) and [t.shape for t in inter] == [(2, 32, 3, 3)] * 3
    embedded = model._embed(x, q)
    torch.testing.assert_close(inter[0], embedded[:, :9].reshape(2, 3, 3, 32).permute(0, 3, 1, 2))
    inter = model.forward_intermediates(x, q, indices=1, output_fmt='NLC', return_prefix_tokens=True,
                                        intermediates_only=True)
    (patches, extra), = inter
    torch.testing.assert_close(torch.cat([patches, extra], 1), feats)
    assert len(model.get_intermediate_layers(x, q, n=2)) == 2
    with pytest.raises(ValueError, match='features_only is not supported'):
        tiny(features_only=True)

    pooled = tiny(global_pool='avg', num_classes=4)
    assert pooled(x, q).shape == (2, 4)
    assert pooled.forward_head(pooled.forward_features(x, q), pre_logits=True).shape == (2, 32)


def test_reset_classifier():
    model = tiny().eval()
    x, q = inputs(batch=2)
    model.reset_classifier(3)
    assert model(x, q).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x, q).shape == (2, N_TOKENS * 32)
    model.reset_classifier(5, '')
    assert model(x, q).shape == (2, N_TOKENS, 5)


def test_grad_checkpointing_gives_the_same_step():
    torch.manual_seed(0)
    ref = tiny().train()
    ckpt = copy.deepcopy(ref)
    ckpt.set_grad_checkpointing(True)
    x, q = inputs(batch=3)
    for model in (ref, ckpt):
        torch.manual_seed(1)
        (model(x, q).square().mean() + 1e-2 * model.balance_loss()).backward()
    for (k, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)  # memory written exactly once
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_state_dict_round_trips_bit_for_bit(tmp_path):
    model = tiny().train()
    model(*inputs())  # memory moved away from its initial value
    assert {'question_embed.norm_in.weight', 'question_embed.proj.weight', 'question_embed.norm.bias'} \
        <= set(model.state_dict())
    path = tmp_path / 'ait.pth'
    torch.save(model.state_dict(), path)
    other = tiny()
    other.load_state_dict(torch.load(path))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    x, q = inputs(batch=2)
    assert torch.equal(model.eval()(x, q), other.eval()(x, q))


def test_checkpoint_filter_fn(tmp_path):
    model = tiny()
    wrapped = {'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}
    assert checkpoint_filter_fn(wrapped, model).keys() == model.state_dict().keys()
    # an image-only AiT checkpoint of the same size lacks the question embedding and a head token
    image_only = AssociativeTransformer(patch_size=5, num_classes=10, depth=2, **TINY)
    with pytest.raises(ValueError, match=r'missing: question_embed\..*fc_norm\.bias: checkpoint \(288,\), '
                                         r'model \(320,\)'):
        checkpoint_filter_fn(image_only.state_dict(), model)

    path = tmp_path / 'w.pth'
    torch.save(model.state_dict(), path)
    loaded = timm.create_model('ait_small_patch5_75', pretrained=True, num_classes=3,
                               pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert loaded.num_classes == 3
    assert torch.equal(loaded.question_embed.proj.weight, model.question_embed.proj.weight)


def test_trains_on_sort_of_clevr_items_with_the_task(tmp_path):
    dataset = sort_of_clevr.SortOfClevr(root=str(tmp_path), split='test', num_images=2, progress=False)
    (images, qs), answers = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    model = timm.create_model('ait_small_patch5_75', **{**TINY, 'img_size': 75})
    task = AiTClassificationTask(model, criterion=torch.nn.CrossEntropyLoss(), verbose=False)
    out = task((images, qs), answers)
    assert out['output'].shape == (8, 10) and out['balance_loss'] > 0
    out['loss'].backward()
    assert model.question_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('config,gwl', [
    ('ait_small_patch5_75', True), ('ait_base_patch5_75', True), ('vit_small_patch5_75', False)])
def test_training_configs(config, gwl):
    yaml = pytest.importorskip('yaml')
    from pathlib import Path
    path = Path(__file__).parents[1] / 'train_scripts' / 'configs' / f'{config}-sort_of_clevr.yaml'
    cfg = yaml.safe_load(path.read_text())
    paper = dict(dataset='sort-of-clevr', sort_of_clevr_questions='all', num_classes=10, img_size=75,
                 epochs=100, batch_size=64, opt='adamw', lr=1e-4, weight_decay=0.01, sched='cosine',
                 warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-6)
    assert {k: cfg[k] for k in paper} == paper
    with torch.device('meta'):
        model = timm.create_model(cfg['model'], num_classes=cfg['num_classes'], img_size=cfg['img_size'],
                                  **cfg['model_kwargs'])
    assert model.has_gwl == gwl and model.pretrained_cfg['mean'] == tuple(cfg['mean'])
    if gwl:  # the paper's lambda is the model's own balance term
        assert {blk.mlp.balance_loss_coef for blk in model.blocks} == {0.01}


def test_set_input_size_keeps_the_question_token_of_the_flatten_head():
    model = tiny().eval()
    D = model.embed_dim
    question_weight = model.head.weight[:, -D:].clone()
    model.set_input_size(img_size=30)
    assert model.patch_embed.grid_size == (6, 6) and model.head.in_features == (36 + 1) * D
    torch.testing.assert_close(model.head.weight[:, -D:], question_weight, rtol=0, atol=0)
    x, q = inputs(batch=2, size=30)
    assert model(x, q).shape == (2, 10)
