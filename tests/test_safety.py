"""The safety basis (VC): the knob's mask, exact orthogonal projection, principal angles with known answers, the knob
at λ = 0 against the model without the block, best-of-k targets scored by the real violation scorer."""
import math

import pytest
import torch

from bem import bem_layers
from bem.safety import best_of_k, knob_mask, orthonormal_basis, principal_angles, project_out
from conftest import routed_tiny


def test_knob_mask_is_one_on_the_skill_block_and_lambda_on_the_safety_block():
    m = knob_mask(3, 2, 0.75, batch=2)
    assert m.shape == (2, 5) and torch.equal(m[1], torch.tensor([1, 1, 1, 0.75, 0.75]))
    assert torch.equal(knob_mask(2, 2, 0.0)[0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    for bad in (-0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite number ≥ 0"):
            knob_mask(2, 2, bad)


def test_principal_angles_known_answers():
    theta = 0.3
    e1 = torch.tensor([[1.0], [0.0], [0.0]])
    rotated = torch.tensor([[math.cos(theta)], [math.sin(theta)], [0.0]])
    assert principal_angles(e1, rotated).tolist() == pytest.approx([math.degrees(theta)], abs=1e-5)  # fp32 input
    plane = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert principal_angles(plane, plane * 3.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert principal_angles(plane, torch.tensor([[0.0], [0.0], [2.0]])).tolist() == pytest.approx([90.0])
    assert principal_angles(plane, torch.zeros(3, 2)).numel() == 0  # a zero block spans nothing
    assert orthonormal_basis(torch.tensor([[1.0, 2.0], [2.0, 4.0]])).shape == (2, 1)  # rank 1


def test_project_out_makes_the_block_orthogonal_to_the_skill_directions():
    gen = torch.Generator().manual_seed(0)
    skill, block = torch.randn(64, 4, generator=gen), torch.randn(64, 4, generator=gen)
    assert principal_angles(skill, block).min() < 80  # random 4-dim subspaces of R^64 are not orthogonal
    project_out(block, orthonormal_basis(skill))
    angles = principal_angles(skill, block)
    assert len(angles) == 4 and angles.min() > 90 - 1e-6
    assert (skill.T @ block).abs().max() < 1e-5
    before = block.clone()
    project_out(block, orthonormal_basis(skill))  # idempotent
    assert torch.allclose(block, before, atol=1e-6)


def test_knob_at_zero_equals_the_model_without_the_block():
    """Rank 8 = a skill block of 4 + a safety block of 4; with m = [1]*4 + [0]*4 the logits are those of the rank-4
    model holding the skill block alone."""
    full = routed_tiny("llama", rank=8, controller="static", side_dim=0)
    skill = routed_tiny("llama", rank=4, controller="static", side_dim=0)
    with torch.no_grad():
        for name, layer in bem_layers(full).items():
            small = bem_layers(skill)[name]
            small.U.copy_(layer.U[:, :4])
            small.V.copy_(layer.V[:, :4])
            small.scaling = layer.scaling  # s = alpha / r of the full model
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = skill(ids).logits
        off = full(ids, bem_mask=knob_mask(4, 4, 0.0, batch=2)).logits
        on = full(ids, bem_mask=knob_mask(4, 4, 1.0, batch=2)).logits
    assert (off - want).abs().max() <= 1e-6 * want.abs().max()  # bit-identical here; BLAS may sum zeros in another order
    assert (on - want).abs().max() > 1e-3  # the block does change the model when it is on


def test_best_of_k_keeps_the_least_violating_reply_and_is_seeded():
    from bem.models import load_base, tiny

    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer)).eval()
    prompts = ["Say something about cats.", "Describe the weather.", "Tell me a story."]
    picks = best_of_k(model, tokenizer, prompts, k=3, max_new_tokens=6, seed=5, batch_size=2)
    assert [p["prompt"] for p in picks] == prompts
    for p in picks:
        assert len(p["k_probs"]) == 3 and p["violation_prob"] == min(p["k_probs"])
        assert all(0.0 <= q <= 1.0 for q in p["k_probs"])
    assert best_of_k(model, tokenizer, prompts, k=3, max_new_tokens=6, seed=5, batch_size=2) == picks
