"""The fused GPU path of a BEM site (issue 18, item 2): y + s · ((x V) ⊙ c) Uᵀ in one Triton kernel.

`BEMLayer.forward` takes this path when every condition of `usable` holds: the input is on CUDA, Triton imports,
nothing needs a gradient (inference: `torch.no_grad` / `inference_mode`) and the path is not switched off
(`BEM_FUSED=0` in the environment, or `enabled(False)`). Everywhere else the plain torch code of
`BEMLayer.delta` runs; it is the reference the kernel is tested against (≤ 1e-5 fp32, ≤ 1e-3 bf16 of the output's
scale; tests/test_fused.py, which runs the kernel in Triton's interpreter on the CPU and compiled on CUDA).

One program computes a BLOCK_M × BLOCK_N tile of the output: it reduces x (BLOCK_M × d_in) against V into
h = x V (BLOCK_M × r, fp32 accumulators), scales h by the rows' coefficients c ⊙ m, multiplies by Uᵀ for its
BLOCK_N output columns, adds y (the base layer's output) and stores, so neither h nor the delta goes through
memory. Each column tile recomputes x V: r is small (8-32), so that is d_in · r multiply-adds per row and tile
against d_out · r for the product itself, and x stays in cache. Precision follows the reference: in fp32 the
products are IEEE fp32 (no TF32); under bf16/fp16 autocast x, V, h ⊙ c and U enter the products in the autocast
dtype with fp32 accumulation, as autocast's matmuls do.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships with torch's CUDA wheels; the CPU wheel has none (then the torch path is the only one)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installed wheels
    triton = None

_ENABLED: bool | None = None  # from BEM_FUSED when first asked (a bad value is then one error line, not an import error)


def _enabled() -> bool:
    global _ENABLED
    if _ENABLED is None:
        flag = os.environ.get("BEM_FUSED", "1")
        if flag not in ("0", "1"):
            from bem.errors import BEMError

            raise BEMError(f"environment variable BEM_FUSED={flag!r} is not allowed; expected 1 (the fused kernel on "
                           "CUDA, the default) or 0 (the torch path everywhere)")
        _ENABLED = flag == "1"
    return _ENABLED


DEVICES = ("cuda",)  # where the kernel runs compiled; tests add "cpu" under TRITON_INTERPRET=1


@contextlib.contextmanager
def enabled(flag: bool):
    """Switch the fused path on or off inside the block (e.g. to time or test the reference on CUDA)."""
    global _ENABLED
    before, _ENABLED = _enabled(), flag
    try:
        yield
    finally:
        _ENABLED = before


def compute_dtype(x: torch.Tensor, layer) -> torch.dtype:
    """The dtype of the reference's products: autocast's when it is on, else V's (`BEMLayer.delta` casts x to it)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else layer.V.dtype


def usable(x: torch.Tensor, layer, y: torch.Tensor) -> bool:
    """Whether `layer`'s forward on `x` (base output `y`) runs the fused kernel (see the module doc): fp32 or bf16
    input, products and output (fp16 takes the torch path). Under torch.compile (bem.decoding's compiled step) the torch
    path is traced instead: inductor fuses it, and CUDA graphs remove the launches the kernel saves."""
    return (x.device.type in DEVICES and not torch.compiler.is_compiling() and triton is not None and _enabled() and getattr(layer, "fusable", False)
            and not (torch.is_grad_enabled() and (x.requires_grad or layer.U.requires_grad or layer.V.requires_grad))
            and compute_dtype(x, layer) in COMPUTE_DTYPES and x.dtype in COMPUTE_DTYPES and y.dtype in COMPUTE_DTYPES)


if triton is not None:
    @triton.jit
    def _rounded(v, BF16: tl.constexpr):
        """v (fp32) rounded to the nearest bf16 (ties to even), kept in fp32; v itself unless BF16. Done on the bits:
        Triton's interpreter truncates in `.to(tl.bfloat16)`, where the GPU rounds to nearest."""
        if BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
        return v

    @triton.jit
    def _site_kernel(X, V, C, U, Y, OUT, M, N, K, R, stride_xm, stride_vk, stride_cm, stride_un, stride_ym,
                     stride_om, scaling, HAS_Y: tl.constexpr, BF16: tl.constexpr, OUT_BF16: tl.constexpr,
                     DOT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        # Products of bf16-rounded fp32 values in TF32 are exact (8 significant bits fit TF32's 11), so one fp32 code
        # path gives bf16 autocast's numbers: the operands rounded to bf16, fp32 accumulation.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            v = tl.load(V + rk[:, None] * stride_vk + rr[None, :], mask=(rk[:, None] < K) & (rr[None, :] < R), other=0.0)
            h += tl.dot(_rounded(x.to(tl.float32), BF16), _rounded(v.to(tl.float32), BF16), input_precision=DOT)
        c = tl.load(C + rm[:, None] * stride_cm + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        u = tl.load(U + rn[None, :] * stride_un + rr[:, None], mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        hc = _rounded(_rounded(h, BF16) * c.to(tl.float32), BF16)  # autocast rounds x V, then (x V) ⊙ c
        d = tl.dot(hc, _rounded(u.to(tl.float32), BF16), input_precision=DOT)
        d = _rounded(_rounded(d, BF16) * scaling, BF16)  # the product, then times s, in the compute dtype
        d = _rounded(d, OUT_BF16)  # the reference adds the delta in the output's dtype
        out_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if HAS_Y:
            d += tl.load(Y + rm[:, None] * stride_ym + rn[None, :], mask=out_mask, other=0.0).to(tl.float32)
        tl.store(OUT + rm[:, None] * stride_om + rn[None, :], _rounded(d, OUT_BF16).to(OUT.dtype.element_ty),
                 mask=out_mask)


COMPUTE_DTYPES = (torch.float32, torch.bfloat16)  # fp16 autocast takes the torch path


def site_delta(x: torch.Tensor, V: torch.Tensor, coef: torch.Tensor, U: torch.Tensor, scaling: float,
               y: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y + s · ((x V) ⊙ c) Uᵀ (just the delta when y is None), in one kernel launch.

    x (…, d_in); V (d_in, r); U (d_out, r); coef broadcastable to (…, r): (r,), (B, 1, r) or (B, T, r); y (…, d_out).
    compute_dtype: the dtype the products are taken in (default x's; under autocast, autocast's). The output has y's
    dtype (the compute dtype when y is None). The caller picks the device: on CPU this needs TRITON_INTERPRET=1.
    """
    if triton is None:
        raise RuntimeError("the fused BEM site path needs Triton (shipped with torch's CUDA wheels)")
    compute_dtype = compute_dtype or x.dtype
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"fused BEM site: compute dtype {compute_dtype} is not allowed; expected one of "
                         f"{[str(d) for d in COMPUTE_DTYPES]}")
    d_in, rank, d_out = x.shape[-1], V.shape[1], U.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    c2 = coef.expand(*lead, rank).reshape(m, rank)
    c2 = c2 if c2.stride(-1) == 1 else c2.contiguous()
    V, U = V.contiguous(), U.contiguous()
    out_dtype = y.dtype if y is not None else compute_dtype
    if out_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"fused BEM site: output dtype {out_dtype} is not allowed; expected one of "
                         f"{[str(d) for d in COMPUTE_DTYPES]}")
    out = torch.empty(m, d_out, device=x.device, dtype=out_dtype)
    y2 = None if y is None else y.reshape(m, d_out)
    if y2 is not None and y2.stride(-1) != 1:
        y2 = y2.contiguous()
    block_r = max(16, triton.next_power_of_2(rank))
    block_m = 16 if m <= 16 else (32 if m <= 64 else 64)
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(d_out, block_n))
    _site_kernel[grid](x2, V, c2, U, out if y2 is None else y2, out, m, d_out, d_in, rank, x2.stride(0), V.stride(0),
                       c2.stride(0), U.stride(0), 0 if y2 is None else y2.stride(0), out.stride(0), float(scaling),
                       HAS_Y=y2 is not None, BF16=compute_dtype == torch.bfloat16,
                       OUT_BF16=out_dtype == torch.bfloat16,
                       DOT="ieee" if compute_dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                       BLOCK_K=block_k, BLOCK_R=block_r)
    return out.reshape(*lead, d_out)


def site_forward(layer, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`BEMLayer.forward`'s y + delta through the kernel: tokens (B, T, d_in) or flattened, y the base output."""
    coef = layer.token_coefficients(tokens)
    out = site_delta(tokens, layer.V, coef, layer.U, layer.scaling, y.reshape(*tokens.shape[:-1], -1),
                     compute_dtype(tokens, layer))
    return out.reshape(y.shape)
