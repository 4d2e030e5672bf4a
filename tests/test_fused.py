"""The fused site kernel (bem.module.fused) against the torch reference (BEMLayer.delta).

Here without CUDA the Triton kernel runs in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by conftest), so
the kernel's indexing, masks and roundings are checked on every machine; where CUDA exists the same comparisons run
on the compiled kernel (the tests marked `cuda`)."""
import pytest
import torch
from transformers import DynamicCache

from bem import bem_layers
from bem.module import fused
from bem.precision import inference_precision
from conftest import routed_tiny, variant_options

needs_triton = pytest.mark.skipif(fused.triton is None, reason="Triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None, reason="needs CUDA and Triton")
INTERPRETED = not torch.cuda.is_available()


def _reference(x, V, coef, U, s, y=None):
    delta = ((x @ V) * coef) @ U.T * s
    return delta if y is None else y + delta.to(y.dtype)


def _operands(device, m_rows=(3, 37), d_in=72, d_out=100, rank=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, T = m_rows
    return (torch.randn(B, T, d_in, generator=gen).to(device), torch.randn(d_in, rank, generator=gen).to(device),
            torch.randn(d_out, rank, generator=gen).to(device), torch.randn(B, T, d_out, generator=gen).to(device),
            {"per site": torch.rand(rank, generator=gen).to(device),
             "per example": torch.rand(B, 1, rank, generator=gen).to(device),
             "per token": torch.rand(B, T, rank, generator=gen).to(device)})


def _check_fp32(device):
    # d_in, d_out and B·T = 111 rows are not multiples of the blocks (64, 64, 64): the masked edges are exercised
    x, V, U, y, coefs = _operands(device)
    for coef in coefs.values():
        for base in (None, y):
            want = _reference(x, V, coef, U, 2.0, base)
            got = fused.site_delta(x, V, coef, U, 2.0, base)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def _check_bf16(device):
    x, V, U, y, coefs = _operands(device)
    for coef in coefs.values():
        with torch.autocast(device, torch.bfloat16):  # the reference as BEMLayer computes it under autocast
            want = y.bfloat16() + (((x @ V) * coef) @ U.T * 2.0).to(torch.bfloat16)
        got = fused.site_delta(x, V, coef, U, 2.0, y.bfloat16(), torch.bfloat16)
        assert got.dtype == torch.bfloat16
        assert (got.float() - want.float()).abs().max().item() <= 1e-3 * want.float().abs().max().item()


@needs_triton
def test_kernel_matches_the_reference_in_fp32_for_every_code_shape():
    _check_fp32("cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
def test_kernel_matches_bf16_autocast_roundings():
    _check_bf16("cuda" if torch.cuda.is_available() else "cpu")


@needs_triton
def test_kernel_refuses_fp16_with_the_allowed_dtypes():
    x, V, U, y, coefs = _operands("cpu")
    with pytest.raises(ValueError, match="compute dtype torch.float16 is not allowed; expected one of"):
        fused.site_delta(x, V, coefs["per site"], U, 2.0, None, torch.float16)


def _model_outputs(model, device, precision=None):
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(3)).to(device)
    kwargs = {"bem_prompt_len": torch.tensor([5, 7], device=device),
              "bem_side": torch.randn(2, 3, generator=torch.Generator().manual_seed(4)).to(device)}
    with torch.no_grad():
        full = model(ids, **kwargs).logits
        cache = DynamicCache()  # prefill then decode steps: the per-token codes of cached decoding
        parts = [model(ids[:, :7], past_key_values=cache, use_cache=True, **kwargs).logits]
        for t in range(7, 11):
            parts.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True, **kwargs).logits)
    return full.float(), torch.cat(parts, 1).float()


def _count_launches(monkeypatch):
    calls = []
    real = fused.site_delta

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "site_delta", counted)
    return calls


def _check_model(monkeypatch, arch, variant, device, precision):
    model = routed_tiny(arch, **variant_options(arch, variant)).to(device)
    context = inference_precision(model, "bf16") if precision == "bf16" else torch.no_grad()
    with context:
        with fused.enabled(False):
            want = _model_outputs(model, device)
        calls = _count_launches(monkeypatch)
        got = _model_outputs(model, device)
    fusable = sum(layer.fusable for layer in bem_layers(model).values())
    assert len(calls) == fusable * 6  # every BEMLayer site, in each of the six forwards; Kron sites stay torch
    tol = 1e-5 if precision == "fp32" else 1e-3
    for w, g in zip(want, got):
        assert (g - w).abs().max().item() <= tol * w.abs().max().item()


@needs_triton
@pytest.mark.parametrize("variant", ["anchor", "pt1_head_gates", "v1_dynrank", "v3_kron", "v4_film", "all"])
def test_model_through_the_kernel_equals_the_reference(monkeypatch, arch, variant):
    """Logits of a full forward and of cached decoding (prefill + 4 steps) with the kernel at every site equal the
    torch path's: codes per token, rank masks, head gates and FiLM go through it; Kron sites keep the torch path."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(fused, "DEVICES", ("cuda", "cpu"))  # the CPU runs the interpreted kernel
    _check_model(monkeypatch, arch, variant, device, "fp32")


@needs_triton
def test_model_in_bf16_through_the_kernel_equals_the_reference(monkeypatch):
    monkeypatch.setattr(fused, "DEVICES", ("cuda", "cpu"))
    _check_model(monkeypatch, "llama", "anchor", "cuda" if torch.cuda.is_available() else "cpu", "bf16")


def test_the_kernel_is_taken_only_at_inference_on_its_devices(monkeypatch):
    model = routed_tiny("llama")
    layer = next(iter(bem_layers(model).values()))
    x = torch.randn(2, 3, layer.V.shape[0])
    y = torch.randn(2, 3, layer.U.shape[0])
    assert not fused.usable(x, layer, y)  # the CPU is not one of its devices
    monkeypatch.setattr(fused, "DEVICES", ("cuda", "cpu"))
    if fused.triton is None:
        assert not fused.usable(x, layer, y)
        return
    assert not fused.usable(x, layer, y)  # U and V require gradients and grad mode is on: training takes torch
    with torch.no_grad():
        assert fused.usable(x, layer, y)
        with fused.enabled(False):
            assert not fused.usable(x, layer, y)
        assert not fused.usable(x.half(), layer, y)  # fp16 takes the torch path
        with torch.autocast("cpu", torch.float16):
            assert not fused.usable(x, layer, y)
    kron = routed_tiny("llama", **variant_options("llama", "v3_kron"))
    assert [layer.fusable for layer in bem_layers(kron).values()].count(False) > 0


@cuda
def test_compiled_kernel_on_cuda(monkeypatch):
    _check_fp32("cuda")
    _check_bf16("cuda")
    for variant in ("anchor", "v1_dynrank", "all"):
        _check_model(monkeypatch, "llama", variant, "cuda", "fp32")
    _check_model(monkeypatch, "llama", "anchor", "cuda", "bf16")


def test_a_bad_bem_fused_value_is_one_error_naming_it(monkeypatch):
    from bem.errors import BEMError

    monkeypatch.setattr(fused, "_ENABLED", None)
    monkeypatch.setenv("BEM_FUSED", "off")
    with pytest.raises(BEMError, match="BEM_FUSED='off' is not allowed; expected 1 .* or 0"):
        fused._enabled()
