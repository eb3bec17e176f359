"""GMACs and activations as timm's model cards count them (timm_ait.profiling)."""
import pytest
import timm
import torch

import timm_ait  # noqa: F401  (registers the models)
from timm_ait.profiling import ActivationCounter, example_inputs, flop_counter, profile_model


@pytest.mark.parametrize('name,gmacs,activations_m', [
    # the figures on these models' cards on the Hugging Face Hub (timm/...), rounded as there
    ('vit_small_patch16_224', 4.6, 11.9),
    ('resnet18', 1.8, 2.5),
])
def test_matches_the_figures_timm_publishes(name, gmacs, activations_m):
    cost = profile_model(timm.create_model(name))
    assert round(cost['gmacs'], 1) == gmacs and round(cost['activations_m'], 1) == activations_m


def test_fused_attention_counts_like_the_unfused_products():
    q, k, v = (torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4))
    with flop_counter() as fused_flops, ActivationCounter() as fused:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with flop_counter() as plain_flops, ActivationCounter() as plain:
        (q @ k.transpose(-1, -2)).softmax(-1) @ v
    assert fused.total == plain.total == 2 * 3 * 7 * (5 + 4)
    assert fused_flops.get_total_flops() == plain_flops.get_total_flops() > 0


def test_ait_eval_costs_about_one_percent_more_than_its_vit_twin_and_writes_nothing():
    # the paper: eval is ViT plus LN_g and the Hopfield read, about 1% more FLOPs
    ait, vit = (timm.create_model('ait_small_patch4_32', gwl=gwl).train() for gwl in (True, False))
    memory = ait.blocks[0].mlp.memory.memory.clone()
    ratio = profile_model(ait)['gmacs'] / profile_model(vit)['gmacs']
    assert 1.0 < ratio < 1.03
    assert ait.training and torch.equal(ait.blocks[0].mlp.memory.memory, memory)


def test_question_answering_models_get_their_questions():
    model = timm.create_model('ait_small_patch5_75', patch_size=15, embed_dim=32, num_heads=2, depth=1)
    images, questions = example_inputs(model, (3, 75, 75), batch_size=2)
    assert images.shape == (2, 3, 75, 75) and questions.shape == (2, 11)
    # the multiply-adds of the architecture's products for one image: 25 patches of 15 * 15 * 3 values and
    # one question token (T = 26) of width D = 32, one block with 2 heads of 16, a GWL with 32 slots of 32
    # (eval: no write, the Hopfield read only) and the flatten head over T * D for 10 answers
    T, D, N, S, m = 26, 32, 25, 32, 32
    expected = (N * 675 * D + 11 * D  # patch and question embeddings
                + T * D * 3 * D + 2 * (2 * T * T * 16) + T * D * D  # qkv, scores and their sum over v, proj
                + 2 * T * D * 4 * D  # the GWL's fc1 and fc2
                + S * m * D + 2 * T * S * D  # the read: priors up to D, patch-attractor scores and their sum
                + T * D * 10)  # classifier
    assert profile_model(model)['gmacs'] * 1e9 == pytest.approx(expected, rel=1e-9)
