"""BEMLayer: a frozen linear site plus the context-routed low-rank update."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bem.trust_region import trust_region_factor

if TYPE_CHECKING:
    from bem.runtime import BEMRuntime


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
    """

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
        self.site_index: int | None = None  # column of the controller's code; None = static (c ≡ 1)
        self.enabled = True
        self._runtime: BEMRuntime | None = None
        self._merged_weight: torch.Tensor | None = None

    @property
    def merged(self) -> bool:
        return self._merged_weight is not None

    def coefficients(self, code: torch.Tensor) -> torch.Tensor:
        """c scaled by the trust-region factor of its ΔW, for code rows (…, r)."""
        factor = trust_region_factor(self.U, self.V, code, self.scaling, self.tau_sigma, self.tau_fro)
        return code * factor.unsqueeze(-1)

    def token_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Coefficients c ⊙ m (trust region applied): (B, T, r) per token, (B, 1, r) per example, or (r,)."""
        runtime = self._runtime
        mask = None if runtime is None else runtime.mask
        if mask is not None:
            mask = mask.to(device=x.device, dtype=self.U.dtype).unsqueeze(1)  # (B, 1, r)
        if self.site_index is None or runtime is None or runtime.config.controller == "static":
            code = torch.ones(self.rank, device=x.device, dtype=self.U.dtype) if mask is None else mask
            return self.coefficients(code)
        codes, segment = runtime.site_codes(self.site_index)  # (B, K, r), (B, T)
        codes = codes.to(self.U.dtype)
        coef = self.coefficients(codes if mask is None else codes * mask)
        if x.dim() != 3 or segment.shape != x.shape[:2]:
            raise RuntimeError(f"BEM site got input of shape {tuple(x.shape)} but the controller "
                               f"routed tokens of shape {tuple(segment.shape)}")
        return torch.gather(coef, 1, segment.unsqueeze(-1).expand(-1, -1, self.rank))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s · U diag(c) Vᵀ x, per token."""
        h = x.to(self.V.dtype) @ self.V
        return (h * self.token_coefficients(x)) @ self.U.T * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.enabled or self.merged:
            return y
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self, code: torch.Tensor | None = None) -> torch.Tensor:
        """Dense ΔW (d_out × d_in) for one constant code (default c ≡ 1), trust region applied."""
        if code is None:
            code = torch.ones(self.rank, device=self.U.device, dtype=self.U.dtype)
        return (self.U * self.coefficients(code)) @ self.V.T * self.scaling

    @torch.no_grad()
    def merge(self, code: torch.Tensor | None = None) -> None:
        """Fold ΔW of a constant code into W0. The original W0 is kept so unmerge is exact."""
        if self.merged:
            raise RuntimeError("BEM site is already merged; unmerge it first")
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
