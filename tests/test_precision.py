"""Precision: what `auto` resolves to, bf16 inference without per-call casts, fp32 weights restored bit for bit."""
import math
from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from bem import bem_layers, set_bem_enabled
from bem.errors import BEMError
from bem.precision import autocast, inference_precision, resolve
from conftest import routed_tiny, variant_options


def test_auto_resolves_to_bf16_only_where_it_is_native(monkeypatch):
    import bem.precision as precision

    monkeypatch.delenv(precision.ENV, raising=False)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    assert resolve("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    assert resolve("auto", "cpu") == "fp32"
    assert resolve("bf16", "cpu") == "bf16" and resolve("fp32") == "fp32"  # explicit values are kept
    monkeypatch.setenv(precision.ENV, "bf16")
    assert resolve("auto") == "bf16"
    monkeypatch.setenv(precision.ENV, "fp16")
    with pytest.raises(BEMError, match="BEM_AUTO_PRECISION='fp16' is not allowed"):
        resolve("auto")
    with pytest.raises(BEMError, match="precision 'half' is not allowed"):
        resolve("half")


def _ids():
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(3))


def _side():
    return torch.randn(2, 3, generator=torch.Generator().manual_seed(4))


def test_bf16_inference_is_close_to_fp32_and_restores_every_weight(arch, variant):
    model = routed_tiny(arch, **variant_options(arch, variant))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    kwargs = {"bem_prompt_len": torch.tensor([5, 7]), "bem_side": _side()}
    with torch.no_grad():
        want = model(_ids(), **kwargs).logits
        with inference_precision(model, "bf16"):
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            got = model(_ids(), **kwargs).logits
            cache = DynamicCache()  # cached decoding in bf16 follows the full forward, to bf16's resolution
            first = model(_ids()[:, :7], past_key_values=cache, use_cache=True, **kwargs).logits
            rest = model(_ids()[:, 7:], past_key_values=cache, use_cache=True, **kwargs).logits
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    # bf16 keeps 8 bits of mantissa (0.4% per rounding); on these random tiny models BEM's own part is ~1-2x the
    # logits' scale and passes through ~10 rounded ops, so the measured worst case is 5.6% (gpt2, mm_projector's
    # two-layer projector). Dtypes and per-call casts are checked by the tests below.
    assert (got.float() - want).abs().max().item() <= 0.08 * scale
    assert (torch.cat([first, rest], 1).float() - got.float()).abs().max().item() <= 0.05 * scale
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[name]), name


def _casts(model, ids, kwargs) -> Counter:
    """The floating dtype casts (aten::_to_copy) of one cached decode step after a prompt, by input shape."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, **kwargs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            model(ids[:, :1], attention_mask=torch.ones(2, ids.shape[1] + 1, dtype=torch.long), past_key_values=cache,
                  use_cache=True, **kwargs)
    return Counter(tuple(e.input_shapes[0]) for e in prof.events()
                   if e.name == "aten::_to_copy" and e.input_dtypes and e.input_dtypes[0] in ("float", "c10::BFloat16"))


@pytest.mark.parametrize("variant", ["anchor", "v1_dynrank", "v3_kron", "v4_film"])
def test_a_bf16_decode_step_casts_no_bem_weight(variant):
    """In bf16 inference no BEM weight (U, V, A, B, controller) is cast in a decode step: they were cast once on
    entry. What BEM adds are casts of a few per-sequence routing values (a code row, a count), not of weights."""
    model = routed_tiny("llama", **variant_options("llama", variant))
    kwargs = {"bem_prompt_len": torch.tensor([11, 11]), "bem_side": _side()}
    with inference_precision(model, "bf16"):
        routed = _casts(model, _ids(), kwargs)
        set_bem_enabled(model, False)
        base = _casts(model, _ids(), {})
        set_bem_enabled(model, True)
    weights = {tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    extra = routed - base
    assert not weights & set(extra), extra
    assert all(math.prod(shape) <= 2 * 32 for shape in extra), extra  # at most a (batch, width) row per call


def test_training_under_autocast_keeps_fp32_weights_and_gradients():
    """bf16 training: autocast computes, BEM's weights and their gradients stay fp32 and follow the fp32 ones."""
    grads = {}
    for precision in ("fp32", "bf16"):
        model = routed_tiny("llama")
        ids = _ids()
        with autocast("cpu", precision):
            loss = model(ids, labels=ids, bem_prompt_len=torch.tensor([6, 11]), bem_side=_side()).loss
        loss.backward()
        layer = next(iter(bem_layers(model).values()))
        assert layer.U.dtype == layer.U.grad.dtype == torch.float32
        grads[precision] = layer.U.grad
    cos = torch.nn.functional.cosine_similarity(grads["fp32"].flatten(), grads["bf16"].flatten(), dim=0)
    assert cos.item() > 0.98
