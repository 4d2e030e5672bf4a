"""The causality rule: KV-cache generation = full forward, and no logit sees a later token."""
import pytest
import torch

from conftest import routed_tiny, variant_options


@pytest.mark.parametrize("scope", ["prompt", "chunk"])
def test_generation_with_cache_equals_full_forward(arch, scope, variant):
    model = routed_tiny(arch, prefix_scope=scope, hysteresis_tau=0.01, **variant_options(arch, variant))
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    side = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    runtime = model._bem_runtime
    runtime.switches = 0
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                         do_sample=False, pad_token_id=0, bem_prompt_len=7, bem_side=side,
                         output_logits=True, return_dict_in_generate=True)
    assert runtime.switches >= 4  # chunk codes really changed during generation
    with torch.no_grad():
        full = model(out.sequences, bem_prompt_len=7, bem_side=side).logits
    cached = torch.stack(out.logits, 1)
    assert cached.shape[1] == 24
    assert (full[:, 6:-1] - cached).abs().max().item() <= 1e-4


def test_manual_cache_steps_of_several_tokens(arch, variant):
    """Calls of 1..5 tokens with a cache, crossing chunk boundaries inside a call, equal one full pass."""
    model = routed_tiny(arch, **variant_options(arch, variant))
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids, bem_prompt_len=6).logits
        out = model(ids[:, :6], use_cache=True, bem_prompt_len=6)
        pieces, cache, at = [out.logits], out.past_key_values, 6
        for step in (1, 5, 3, 2, 4, 1, 5, 3):
            out = model(ids[:, at:at + step], past_key_values=cache, use_cache=True)
            pieces.append(out.logits)
            cache, at = out.past_key_values, at + step
    assert at == 30
    assert (torch.cat(pieces, 1) - full).abs().max().item() <= 1e-4


def token_codes(model, ids, **kwargs):
    """Logits and the routing vector every token was routed with (1, T, W)."""
    runtime, seen = model._bem_runtime, {}
    read = runtime.read

    def record(hidden):
        read(hidden)
        seen["codes"] = runtime._codes[0, runtime._segment[0]]
    runtime.read = record
    try:
        with torch.no_grad():
            logits = model(ids, **kwargs).logits
    finally:
        runtime.read = read
    return logits, seen["codes"]


@pytest.mark.parametrize("read_layer", [0, 1])
@pytest.mark.parametrize("scope,changed_at", [("prompt", 13), ("chunk", 5), ("chunk", 13)])
def test_changing_a_token_changes_no_earlier_logit(arch, scope, changed_at, read_layer, variant):
    model = routed_tiny(arch, prefix_scope=scope, read_layer=read_layer, **variant_options(arch, variant))
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    other = ids.clone()
    other[0, changed_at] = (ids[0, changed_at] + 17) % 125 + 3
    a, codes_a = token_codes(model, ids, bem_prompt_len=6)
    b, codes_b = token_codes(model, other, bem_prompt_len=6)
    assert torch.equal(a[:, :changed_at], b[:, :changed_at])
    assert torch.equal(codes_a[:changed_at], codes_b[:changed_at])
    assert (a[:, changed_at:] - b[:, changed_at:]).abs().max() > 1e-4
    # the chunk after the changed token's chunk is routed from it, so its code differs
    start = 6 if scope == "prompt" else 0
    next_chunk = start + ((changed_at - start) // 4 + 1) * 4
    assert (codes_a[next_chunk] - codes_b[next_chunk]).abs().max() > 1e-6


def test_without_prompt_length_codes_are_chunk_causal(arch):
    model = routed_tiny(arch, controller="prefix")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    other = ids.clone()
    other[0, 2] = (ids[0, 2] + 5) % 125 + 3
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
    assert torch.equal(a[:, :2], b[:, :2])


def test_prompt_must_be_in_first_call(arch):
    model = routed_tiny(arch)
    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(ValueError, match="whole prompt"):
        model(ids[:, :4], use_cache=True, bem_prompt_len=8)


def test_beam_search_is_refused_not_wrong():  # the other modes: tests/test_decoding.py
    model = routed_tiny("llama")
    with pytest.raises(NotImplementedError, match="num_beams=2"):
        model.generate(torch.tensor([[5, 6, 7]]), num_beams=2, max_new_tokens=3, pad_token_id=0)

