"""Known-answer tests of the v1.3 variants (SPEC §3); causality and KV-cache equivalence of every
variant are in test_causality.py (parametrised by the `variant` fixture)."""
import numpy as np
import pytest
import torch

from bem import BEMConfig, attach_bem, bem_disabled, bem_layers, load_bem, save_bem
from bem.module.config import BEMConfigError
from bem.module.layer import KronLayer
from bem.models import tiny
from conftest import SITES, routed_tiny, variant_options


def _kron_layer(d_out=12, d_in=20, factor=(3, 4), terms=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = KronLayer(torch.nn.Linear(d_in, d_out), terms, factor, alpha=6.0, rank=4)
    with torch.no_grad():
        layer.A.copy_(torch.randn(layer.A.shape, generator=gen))
        layer.B.copy_(torch.randn(layer.B.shape, generator=gen))
    return layer


def test_pt3_kronecker_equals_the_dense_kronecker_product():
    layer = _kron_layer()
    code = torch.tensor([0.5, 1.5, -2.0])
    dense = sum(code[t] * torch.kron(layer.A[t], layer.B[t]) for t in range(3)) * layer.scaling  # 12 × 20
    x = torch.randn(2, 5, 20, generator=torch.Generator().manual_seed(1))

    class Fixed:  # a runtime that routes every token with one code
        config = BEMConfig(controller="static")
        mask = None
    layer._runtime = Fixed()
    with torch.no_grad():
        layer.B.mul_(1.0)
        static = layer.delta(x)  # static: c ≡ 1
        ones = sum(torch.kron(layer.A[t], layer.B[t]) for t in range(3)) * layer.scaling
        assert torch.allclose(static, x @ ones.T, atol=1e-5)
        assert torch.allclose(layer.delta_weight(code), dense, atol=1e-6)
        # the per-token path with the code as the coefficient of every token
        X = x.unflatten(-1, (4, 5))
        manual = torch.einsum("tik,...kl,tjl->...ij", layer.A * code[:, None, None], X, layer.B).flatten(-2) * layer.scaling
        assert torch.allclose(manual, x @ dense.T, atol=1e-5)


def test_pt3_kronecker_site_is_zero_at_init_and_never_builds_the_dense_matrix():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    attach_bem(model, BEMConfig(rank=4, sites=["down_proj"], kron_sites=["down_proj"], kron_factor=[4, 8],
                                controller="static"))
    layer = next(iter(bem_layers(model).values()))
    assert isinstance(layer, KronLayer) and layer.A.shape == (4, 4, 8) and layer.B.shape == (4, 8, 8)
    assert sum(p.numel() for p in layer.adapter_parameters().values()) == 4 * (4 * 8 + 8 * 8)  # not 32 × 64
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_pt3_factor_that_does_not_divide_names_the_layer():
    with pytest.raises(ValueError, match=r"kron_factor = \[5, 8\] does not divide layer model\.layers\.0\.mlp\.down_proj"):
        attach_bem(tiny("llama"), BEMConfig(rank=4, sites=["down_proj"], kron_sites=["down_proj"], kron_factor=[5, 8]))


def test_pt3_frobenius_trust_region_through_the_gram_matrices():
    layer = _kron_layer()
    code = torch.tensor([[0.5, 1.5, -2.0], [1.0, 0.0, 0.3]])
    layer.tau_fro = 1.0
    for row in code:
        dense = layer.delta_weight(row)
        assert torch.linalg.matrix_norm(dense).item() == pytest.approx(1.0, rel=1e-4)


def test_pt4_film_is_the_identity_at_init_and_clamped():
    model = tiny("llama")
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        base = model(ids).logits
    attach_bem(model, BEMConfig(rank=4, sites=["o_proj"], chunk_size=4, film=4))
    with torch.no_grad():
        assert torch.allclose(model(ids, bem_prompt_len=5).logits, base, atol=1e-6)
        film = model.bem_controller.film
        film.bias.fill_(100.0)  # saturate: γ → 1 + 0.5, β → 0.5
        values = model.bem_controller(torch.zeros(1, 32), None)
    offset, width = model.bem_controller.heads.spans["film"][0]
    gamma, beta = values[0, offset:offset + width].view(2, 4)
    assert torch.allclose(gamma, torch.full((4,), 1.5)) and torch.allclose(beta, torch.full((4,), 0.5))
    with torch.no_grad():
        film.bias.fill_(-100.0)
        values = model.bem_controller(torch.zeros(1, 32), None)
    gamma, beta = values[0, offset:offset + width].view(2, 4)
    assert torch.allclose(gamma, torch.full((4,), 0.5)) and torch.allclose(beta, torch.full((4,), -0.5))


def test_pt4_film_modulates_the_block_residual_per_channel_group():
    """With γ = 0 on every group the block adds nothing: block output = block input (+ β)."""
    model = routed_tiny("llama", film=2, film_gamma_max=1.0)
    seen = {}
    block = model.model.layers[1]
    block.register_forward_hook(lambda _m, args, out: seen.update(h=args[0], out=out))
    with torch.no_grad():
        model.bem_controller.film.weight.zero_()
        model.bem_controller.film.bias.copy_(torch.tensor([-1e4, -1e4, 0.0, 0.0] * 2))  # γ = 1 − tanh(∞) = 0, β = 0
        model(torch.randint(3, 128, (1, 9)), bem_prompt_len=4)
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert torch.allclose(out, seen["h"], atol=1e-6)


def test_pt2_mask_has_exactly_k_ones_and_gradients_reach_the_scorer():
    model = routed_tiny("llama", rank=6, dynamic_rank=2, kron_sites=["down_proj"], kron_factor=[4, 8], kron_terms=3)
    controller = model.bem_controller
    h = torch.randn(5, 7, controller.inp.in_features, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.gelu(controller.inp(h))
    mask = controller.rank_mask(controller.score(z))
    for offset, width in controller.heads.spans["code"]:
        m = mask[..., offset:offset + width]
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert (m.sum(-1) == (2 if width == 6 else 1)).all()  # k = 2 of r = 6; a 3-term site keeps round(2·3/6) = 1
    # different contexts keep different directions
    first = mask[..., :6].reshape(-1, 6)
    assert len({tuple(row.tolist()) for row in first}) > 1
    # the straight-through estimator: a loss of the masked codes sends gradients to the scorer
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids, bem_prompt_len=5, bem_side=torch.randn(2, 3)).loss.backward()
    assert controller.score.weight.grad is not None and controller.score.weight.grad.abs().sum() > 0
    layer = next(iter(bem_layers(model).values()))
    assert layer.U.shape[1] == 6  # GEMM shapes stay rank r


def test_pt1_head_group_gates_scale_whole_heads():
    model = routed_tiny("llama", head_groups=2)  # 4 heads of 8 channels: groups = channels 0..15, 16..31
    site = model.model.layers[1].self_attn.o_proj
    seen = {}
    site.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0]))
    site.base_layer.register_forward_pre_hook(lambda _m, args: seen.update(gated=args[0]))
    with torch.no_grad():
        gate = model.bem_controller.gate
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([-1e4, 0.0] * 2))  # group 0 off (2σ(−∞) = 0), group 1 unchanged (2σ(0) = 1)
        model(torch.randint(3, 128, (1, 9)), bem_prompt_len=4)
    assert seen["gated"][..., :16].abs().max() == 0
    assert torch.equal(seen["gated"][..., 16:], seen["x"][..., 16:])


def test_pt1_groups_must_hold_whole_heads():
    with pytest.raises(BEMConfigError, match=r"head_groups = 3 does not split layer .*o_proj.*allowed: a divisor of 4"):
        attach_bem(tiny("llama"), BEMConfig(rank=4, head_groups=3))


def test_v2_evidence_features_on_a_hand_made_evidence_set():
    """margin, entropy and agreement (consistency) from encoder similarities, by hand."""
    from bem.data.wordnet_qa import evidence_features

    query = np.array([1.0, 0.0, 0.0])
    docs = np.array([[0.9, np.sqrt(1 - 0.81), 0.0], [0.5, 0.0, np.sqrt(0.75)], [0.1, -np.sqrt(0.99), 0.0]])
    top1, margin, entropy, coverage, consistency = evidence_features(
        query, docs, "Which word means a large cat?", ["lion: a large cat", "tiger: big cat", "a dog"])
    assert top1 == pytest.approx(0.9, abs=1e-6) and margin == pytest.approx(0.4, abs=1e-6)
    assert 0.0 < entropy < 1.0
    assert coverage == pytest.approx(1.0)  # "large" and "cat" both appear in the passages
    sims = docs @ docs.T
    assert consistency == pytest.approx((sims.sum() - np.trace(sims)) / 6, abs=1e-6)
    # the same scores with the top two tied: zero margin and higher entropy
    tied = docs.copy()
    tied[1] = tied[0]
    _, margin_tied, entropy_tied, _, _ = evidence_features(query, tied, "q", ["a", "b", "c"])
    assert margin_tied == pytest.approx(0.0, abs=1e-6) and entropy_tied > entropy


def test_v2_gate_features_name_margin_entropy_and_agreement():
    from bem.data.wordnet_qa import FEATURES
    from bem.experiments.config import load_experiment
    from bem.tasks import side_layout

    config = load_experiment("v2_gateshaping")
    offset, _ = side_layout(config.tasks)["wordnet_qa"]
    assert [FEATURES[i - offset] for i in config.bem.gate_features] == ["margin", "entropy", "consistency"]


def test_v2_shaping_is_computed_once_per_sequence_and_has_a_temperature_per_head_group():
    model = routed_tiny("llama", head_groups=2, gate_features=[0, 2])
    controller = model.bem_controller
    assert controller.log_temperature.shape == (2 * 2,)  # 2 o_proj sites × 2 groups
    calls = []
    controller.shaping.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(3, 128, (2, 6))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0,
                   bem_prompt_len=6, bem_side=torch.randn(2, 3))
    assert len(calls) == 1
    # the evidence moves the gates: the same prompt with other evidence is routed differently
    with torch.no_grad():
        a = model(ids, bem_prompt_len=6, bem_side=torch.zeros(2, 3)).logits
        b = model(ids, bem_prompt_len=6, bem_side=torch.tensor([[3.0, 0.0, -3.0]] * 2)).logits
    assert (a - b).abs().max() > 1e-4


def test_every_variant_saves_and_loads_exactly(tmp_path, variant):
    model = routed_tiny("gpt2", **variant_options("gpt2", variant))
    ids = torch.randint(3, 128, (2, 10))
    side = torch.randn(2, 3)
    with torch.no_grad():
        want = model(ids, bem_prompt_len=4, bem_side=side).logits
    save_bem(model, tmp_path)
    loaded = load_bem(tiny("gpt2"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids, bem_prompt_len=4, bem_side=side).logits, want)
        with bem_disabled(loaded):
            assert torch.equal(loaded(ids).logits, tiny("gpt2")(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_variants_compose_on_both_architectures(arch):
    model = routed_tiny(arch, **variant_options(arch, "all"))
    kinds = {type(layer).__name__ for layer in bem_layers(model).values()}
    assert kinds == {"BEMLayer", "KronLayer"}
    assert sum(layer.gate_index is not None for layer in bem_layers(model).values()) == 2
    assert SITES[arch][0] in next(n for n, layer in bem_layers(model).items() if layer.gate_index is not None)


def test_variant_options_need_a_controller():
    with pytest.raises(BEMConfigError, match=r"BEMConfig\.film = 4 is not allowed.*controller='static'"):
        BEMConfig(controller="static", film=4)
    with pytest.raises(BEMConfigError, match=r"dynamic_rank = 9 is not allowed.*1 <= k <= rank \(8\)"):
        BEMConfig(dynamic_rank=9)
    with pytest.raises(BEMConfigError, match=r"gate_features = \[7\] is not allowed.*side_dim = 5"):
        BEMConfig(head_groups=3, gate_features=[7], side_dim=5)


def test_head_gated_site_refuses_to_merge():
    model = routed_tiny("llama", head_groups=2)
    with pytest.raises(RuntimeError, match="head-gated site"):
        model.model.layers[0].self_attn.o_proj.merge()
