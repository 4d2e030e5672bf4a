"""BEMLayer: a frozen linear site plus the context-routed low-rank update."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bem.module import fused
from bem.module.trust_region import kron_fro_factor, trust_region_factor

if TYPE_CHECKING:
    from bem.module.runtime import BEMRuntime


def site_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"BEM sites must be nn.Linear or transformers Conv1D, got {type(layer).__name__}")


class BEMLayer(nn.Module):
    """y = W0 x + s · U diag(c ⊙ m) Vᵀ x,  s = alpha / r.

    U (d_out × r) starts at zero and V (d_in × r) like LoRA's A, so ΔW = 0 at step 0. The code c
    (per example, per token segment) comes from the runtime's controller; with c ≡ 1 this is LoRA
    with B = U and A = Vᵀ. The trust region rescales each example's ΔW (see trust_region.py).
    On CUDA at inference the delta and the add run as one Triton kernel (fused.py); `delta` is the reference.
    """

    fusable = True  # the fused kernel computes this class's delta (not KronLayer's)

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float,
                 tau_sigma: float | None = None, tau_fro: float | None = None):
        super().__init__()
        self.base_layer = base_layer
        d_in, d_out = site_shape(base_layer)
        self.rank, self.scaling = rank, alpha / rank
        self.tau_sigma, self.tau_fro = tau_sigma, tau_fro
        weight = base_layer.weight
        self.U = nn.Parameter(torch.zeros(d_out, rank, device=weight.device, dtype=torch.float32))
        self.V = nn.Parameter(torch.empty(d_in, rank, device=weight.device, dtype=torch.float32))
        a = torch.empty(rank, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's init of lora_A
        with torch.no_grad():
            self.V.copy_(a.T)
        self.site_index: int | None = None  # which code of the controller this site reads; None = static (c ≡ 1)
        self.gate_index: int | None = None  # PT1: which head-group gates scale this site's input; None = no gates
        self.enabled = True
        self._runtime: BEMRuntime | None = None
        self._merged_weight: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Length of this site's code c (the number of basis directions)."""
        return self.rank

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of this site by name (saved and loaded by these names)."""
        return {"U": self.U, "V": self.V}

    @property
    def merged(self) -> bool:
        return self._merged_weight is not None

    def coefficients(self, code: torch.Tensor) -> torch.Tensor:
        """c scaled by the trust-region factor of its ΔW, for code rows (…, r); c itself when there is no trust
        region (no op at all: a decode step runs this at every site)."""
        if self.tau_sigma is None and self.tau_fro is None:
            return code
        factor = trust_region_factor(self.U, self.V, code, self.scaling, self.tau_sigma, self.tau_fro)
        return code * factor.unsqueeze(-1)

    def token_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients c ⊙ m (trust region applied): (B, T, r) per token, (B, 1, r) per example, or (r,)."""
        runtime = self._runtime
        mask = None if runtime is None else runtime.mask
        dtype = next(iter(self.adapter_parameters().values())).dtype
        if mask is not None:
            mask = mask[:, :self.width].to(device=x.device, dtype=dtype).unsqueeze(1)  # (B, 1, width)
        if self.site_index is None or runtime is None or runtime.config.controller == "static":
            code = torch.ones(self.width, device=x.device, dtype=dtype) if mask is None else mask
            return self.coefficients(code)
        codes = runtime.token_values("code", self.site_index, x)  # (B, K, width)
        if codes.dtype != dtype:
            codes = codes.to(dtype)
        return runtime.gather(self.coefficients(codes if mask is None else codes * mask))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · U diag(c) Vᵀ x, per token. Under autocast x goes in as it is (autocast casts; casting it to V's fp32
        first would cost two casts per site and call)."""
        h = (x if x.dtype == self.V.dtype or torch.is_autocast_enabled(x.device.type) else x.to(self.V.dtype)) @ self.V
        return (h * self.token_coefficients(x)) @ self.U.T * self.scaling

    def gated_input(self, x: torch.Tensor) -> torch.Tensor:
        """PT1: x with each head group's channels scaled by its gate (per example and chunk)."""
        gates = self._runtime.token_values("gate", self.gate_index, x)  # (B, K, G)
        gates = self._runtime.gather(gates).to(x.dtype)  # (B, T, G)
        return (x.unflatten(-1, (gates.shape[-1], -1)) * gates.unsqueeze(-1)).flatten(-2)

    def token_view(self, x: torch.Tensor) -> torch.Tensor:
        """x as (B, T, d_in) when it arrives flattened to (B·T, d_in) (OPT's fc1/fc2), else x itself.

        Codes, masks and gates are per example and token, so a flattened input is routed by the call's
        (B, T); a flattened input of any other row count cannot be mapped to tokens and is an error.
        """
        if x.dim() != 2 or self._runtime is None or self._runtime._call is None:
            return x
        batch, seq = self._runtime._call.valid.shape  # (B, T) of the model call being served
        if x.shape[0] == batch * seq:
            return x.unflatten(0, (batch, seq))
        per_example = self.gate_index is not None or self._runtime.mask is not None or (
            self.site_index is not None and self._runtime.config.controller != "static")
        if per_example:
            raise RuntimeError(f"BEM site got a flattened input of shape {tuple(x.shape)} but the call has "
                               f"(B, T) = ({batch}, {seq}) tokens; allowed: (B, T, d) or (B·T = {batch * seq}, d)")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base_layer(x)
        tokens = self.token_view(x)
        if self.gate_index is not None:
            tokens = self.gated_input(tokens)
            x = tokens.reshape(x.shape)
        y = self.base_layer(x)  # on the input's own shape, so W0 x is bit-identical to the base model's
        if fused.usable(tokens, self, y):
            return fused.site_forward(self, tokens, y)
        delta = self.delta(tokens)
        if delta.shape != y.shape:
            delta = delta.reshape(y.shape)
        return y + (delta if delta.dtype == y.dtype else delta.to(y.dtype))

    def delta_weight(self, code: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW (d_out × d_in) for one constant code (default c ≡ 1), trust region applied."""
        if code is None:
            code = torch.ones(self.width, device=self.U.device, dtype=self.U.dtype)
        return (self.U * self.coefficients(code)) @ self.V.T * self.scaling

    @torch.no_grad()
    def merge(self, code: torch.Tensor | None = None) -> None:
        """Fold ΔW of a constant code into W0. The original W0 is kept so unmerge is exact."""
        if self.merged:
            raise RuntimeError("BEM site is already merged; unmerge it first")
        if self.gate_index is not None:
            raise RuntimeError("a head-gated site (PT1) cannot be merged: its gates scale W0's input per example")
        weight = self.base_layer.weight
        self._merged_weight = weight.detach().clone()
        dw = self.delta_weight(code)
        weight.add_((dw if isinstance(self.base_layer, nn.Linear) else dw.T).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 bit for bit."""
        if not self.merged:
            raise RuntimeError("BEM site is not merged")
        self.base_layer.weight.copy_(self._merged_weight)
        self._merged_weight = None


class KronLayer(BEMLayer):
    """PT3/V3: ΔW = s · Σ_t c_t (A_t ⊗ B_t), applied through the reshape identity.

    With x reshaped row-major to X (a_in × b_in), (A ⊗ B) x = vec(A X Bᵀ), so A ⊗ B (d_out × d_in) is
    never built. A_t is (a_out × a_in), B_t is (b_out × b_in) with a_out·b_out = d_out and
    a_in·b_in = d_in. B starts at zero (ΔW = 0 at step 0), A like LoRA's A. Each term has its own
    code entry, so the controller, the dynamic rank mask and the trust region (Frobenius) compose.
    Cost per token and term: 2·(d_in·b_out + d_out·a_in) FLOPs.
    """

    fusable = False

    def __init__(self, base_layer: nn.Module, terms: int, factor: tuple[int, int], alpha: float, rank: int,
                 tau_fro: float | None = None, name: str = "site"):
        nn.Module.__init__(self)
        self.base_layer = base_layer
        d_in, d_out = site_shape(base_layer)
        a_out, a_in = factor
        if d_out % a_out or d_in % a_in:
            raise ValueError(f"BEMConfig.kron_factor = {list(factor)} does not divide layer {name} of shape "
                             f"(d_out, d_in) = ({d_out}, {d_in}); rows must divide {d_out} and columns {d_in}")
        self.rank, self.terms, self.scaling = rank, terms, alpha / rank
        self.tau_sigma, self.tau_fro = None, tau_fro
        self.a_shape, self.b_shape = (a_out, a_in), (d_out // a_out, d_in // a_in)
        device = base_layer.weight.device
        self.A = nn.Parameter(torch.empty(terms, a_out, a_in, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.zeros(terms, *self.b_shape, device=device, dtype=torch.float32))
        a = torch.empty(terms * a_out, a_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        with torch.no_grad():
            self.A.copy_(a.view(terms, a_out, a_in))
        self.site_index = self.gate_index = None
        self.enabled = True
        self._runtime = None
        self._merged_weight = None

    @property
    def width(self) -> int:
        return self.terms

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def coefficients(self, code: torch.Tensor) -> torch.Tensor:
        if self.tau_fro is None:
            return code
        return code * kron_fro_factor(self.A, self.B, code, self.scaling, self.tau_fro).unsqueeze(-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · Σ_t c_t A_t X B_tᵀ per token, X = x reshaped to (a_in × b_in)."""
        coef = self.token_coefficients(x)  # (B, T, t), (B, 1, t) or (t,)
        X = x.to(self.A.dtype).unflatten(-1, (self.a_shape[1], self.b_shape[1]))  # (..., a_in, b_in)
        Z = torch.einsum("...kl,tjl->...tkj", X, self.B)  # (..., t, a_in, b_out)
        Z = Z * coef.unsqueeze(-1).unsqueeze(-1)
        Y = torch.einsum("...tkj,tik->...ij", Z, self.A)  # (..., a_out, b_out)
        return Y.flatten(-2) * self.scaling

    def delta_weight(self, code: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW = s Σ_t c_t (A_t ⊗ B_t) for one constant code: for tests and merging only."""
        if code is None:
            code = torch.ones(self.terms, device=self.A.device, dtype=self.A.dtype)
        coef = self.coefficients(code)
        return sum(coef[t] * torch.kron(self.A[t], self.B[t]) for t in range(self.terms)) * self.scaling
