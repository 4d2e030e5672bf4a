"""BEM on more Hugging Face architectures, each at its own site names (bem.models.ARCH_SITES).

OPT runs its MLP on tokens flattened to (B·T, d), so its `fc2` site is routed by the call's (B, T).
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model

from bem import BEMConfig, attach_bem, bem_layers, load_bem, save_bem
from bem.models import ARCH_SITES, TINY, tiny

ARCHS = list(TINY)  # llama, gpt2, qwen2, mistral, phi3, gemma2, gpt_neox, opt
PROMPT = 7


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def routed(arch: str, seed: int = 0, **options) -> torch.nn.Module:
    """tiny(arch) with a chunk-routed BEM whose U and controller weights are non-zero, so codes matter."""
    model = tiny(arch, seed=seed)
    options = {"rank": 4, "alpha": 8.0, "sites": ARCH_SITES[arch], "controller": "chunk", "chunk_size": 4,
               "side_dim": 3, "hysteresis_tau": 0.01, **options}
    attach_bem(model, BEMConfig(**options))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            params = layer.adapter_parameters()
            zero_init = params["U"] if "U" in params else params["B"]
            zero_init.copy_(torch.randn(zero_init.shape, generator=gen) * 0.3)
        for p in model.bem_controller.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def _ids(batch=2, seq=PROMPT, seed=1):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _side(batch=2):
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(2))


def test_sites_are_found_in_every_block(arch):
    model = attach_bem(tiny(arch), BEMConfig(rank=4, sites=ARCH_SITES[arch], controller="static"))
    names = sorted(bem_layers(model))
    assert len(names) == 4  # 2 blocks x (W_O, W_down)
    for site in ARCH_SITES[arch]:
        assert sum(n.endswith("." + site) for n in names) == 2, (site, names)


def test_static_bem_equals_peft_lora(arch):
    ids = _ids(seq=12, seed=0)
    peft_model = get_peft_model(tiny(arch), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=list(ARCH_SITES[arch]),
        fan_in_fan_out=arch == "gpt2"))
    ours = attach_bem(tiny(arch), BEMConfig(rank=4, alpha=8, sites=ARCH_SITES[arch], controller="static"))
    peft_modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in bem_layers(ours).items():
            lora = peft_modules[f"base_model.model.{name}"]
            layer.U.copy_(lora.lora_B["default"].weight)
            layer.V.copy_(lora.lora_A["default"].weight.T)
        expected = peft_model(ids).logits
        got = ours(ids).logits
        base = tiny(arch)(ids).logits
    assert len(bem_layers(ours)) == 4
    assert (expected - base).abs().max() > 1e-3  # the adapter really changes the output
    assert (got - expected).abs().max().item() <= 1e-5


def _cached_vs_full(model, new_tokens=24):
    runtime = model._bem_runtime
    runtime.switches = 0
    ids, side = _ids(), _side()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, bem_prompt_len=PROMPT,
                         bem_side=side, output_logits=True, return_dict_in_generate=True)
    switches = runtime.switches
    with torch.no_grad():
        full = model(out.sequences, bem_prompt_len=PROMPT, bem_side=side).logits
    cached = torch.stack(out.logits, 1)
    assert cached.shape[1] == new_tokens
    return (full[:, PROMPT - 1:-1] - cached).abs().max().item(), switches


def test_generation_with_cache_equals_full_forward(arch):
    diff, switches = _cached_vs_full(routed(arch))
    assert switches >= 4  # chunk codes really changed during generation
    assert diff <= 1e-4


def test_all_variants_generation_with_cache_equals_full_forward(arch):
    """Head gates on both sites (so OPT's flattened fc2 takes the gated path), Kronecker W_down, FiLM, top-k."""
    options = {"head_groups": 2, "head_gate_sites": list(ARCH_SITES[arch]), "dynamic_rank": 3,
               "kron_sites": [ARCH_SITES[arch][1]], "kron_factor": [8, 4], "kron_terms": 3, "film": 2}
    diff, switches = _cached_vs_full(routed(arch, **options))
    assert switches >= 4
    assert diff <= 1e-4


def test_save_load_gives_identical_logits(arch, tmp_path):
    model = routed(arch)
    ids = _ids(seq=16, seed=3)
    with torch.no_grad():
        expected = model(ids, bem_prompt_len=6, bem_side=_side()).logits
        base = tiny(arch)(ids).logits
    save_bem(model, tmp_path / "ckpt")
    fresh = load_bem(tiny(arch), tmp_path / "ckpt")
    with torch.no_grad():
        got = fresh(ids, bem_prompt_len=6, bem_side=_side()).logits
    assert (expected - base).abs().max() > 1e-3
    assert torch.equal(got, expected)


def test_batch_equals_each_sample_alone(arch):
    """Per-example codes reach the right rows, also where a site sees tokens flattened to (B·T, d)."""
    model = routed(arch)
    ids, side = _ids(seq=13, seed=4), _side()
    with torch.no_grad():
        batch = model(ids, bem_prompt_len=5, bem_side=side).logits
        alone = torch.cat([model(ids[i:i + 1], bem_prompt_len=5, bem_side=side[i:i + 1]).logits for i in range(2)])
        other = model(ids, bem_prompt_len=5, bem_side=side.flip(0)).logits
    assert (batch - alone).abs().max().item() <= 1e-5
    assert (batch - other).abs().max() > 1e-4  # the side inputs (so the codes) matter per example


def test_flattened_input_of_other_row_count_is_an_error():
    model = routed("opt")
    fc2 = model.get_submodule("model.decoder.layers.0.fc2")
    fc2.register_forward_pre_hook(lambda _m, args: (args[0][:-1],))  # one token row lost
    with pytest.raises(RuntimeError, match=r"shape \(9, 64\).*\(B, T\) = \(2, 5\).*B·T = 10"):
        model(_ids(seq=5), bem_prompt_len=5, bem_side=_side())
