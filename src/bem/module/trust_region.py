"""Trust-region scaling of each example's ΔW, computed through an r×r core.

For ΔW = s·U diag(c) Vᵀ the factor is  min(1, τσ/σ₁(ΔW)) · min(1, τF/‖ΔW‖F).

With V = Q_V R_V (QR), the nonzero singular values of ΔW are those of A = s·U diag(c) R_Vᵀ, and
AᵀA = s² R_V diag(c) (UᵀU) diag(c) R_Vᵀ is r×r. So σ₁² = λ_max(AᵀA) and ‖ΔW‖F² = tr(AᵀA), and
nothing of size d_out × d_in is ever built. We take the Gram matrix UᵀU rather than a QR of U
because U starts at zero (LoRA's init), where the QR backward divides by zero; eigvalsh's
backward is stable at repeated eigenvalues.
"""
from __future__ import annotations

import torch

_TINY = 1e-30


def delta_gram(U: torch.Tensor, V: torch.Tensor, code: torch.Tensor, scaling: float) -> torch.Tensor:
    """AᵀA (…, r, r) for each row of `code` (…, r): same nonzero spectrum as ΔWᵀΔW."""
    r_v = torch.linalg.qr(V).R  # (r, r)
    core = r_v * code.unsqueeze(-2)  # R_V diag(c), broadcast over leading dims
    return (scaling**2) * (core @ (U.T @ U) @ core.transpose(-1, -2))


def trust_region_factor(
    U: torch.Tensor,
    V: torch.Tensor,
    code: torch.Tensor,
    scaling: float,
    tau_sigma: float | None,
    tau_fro: float | None,
) -> torch.Tensor:
    """Factor (…,) in (0, 1] that keeps σ₁(ΔW) ≤ τσ and ‖ΔW‖F ≤ τF for each code row."""
    factor = torch.ones(code.shape[:-1], dtype=code.dtype, device=code.device)
    if tau_sigma is None and tau_fro is None:
        return factor
    gram = delta_gram(U, V, code, scaling)
    if tau_sigma is not None:
        sigma1 = torch.linalg.eigvalsh(gram)[..., -1].clamp_min(_TINY).sqrt()
        factor = factor * torch.where(sigma1 > tau_sigma, tau_sigma / sigma1, torch.ones_like(sigma1))
    if tau_fro is not None:
        fro = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(_TINY).sqrt()
        factor = factor * torch.where(fro > tau_fro, tau_fro / fro, torch.ones_like(fro))
    return factor


def kron_fro_factor(A: torch.Tensor, B: torch.Tensor, code: torch.Tensor, scaling: float,
                    tau_fro: float | None) -> torch.Tensor:
    """Frobenius trust region of ΔW = s Σ_t c_t (A_t ⊗ B_t) through t×t Gram matrices:
    ‖ΔW‖F² = s² Σ_ij c_i c_j ⟨A_i, A_j⟩ ⟨B_i, B_j⟩ (⟨A⊗B, C⊗D⟩ = ⟨A, C⟩⟨B, D⟩)."""
    factor = torch.ones(code.shape[:-1], dtype=code.dtype, device=code.device)
    if tau_fro is None:
        return factor
    gram = (A.flatten(1) @ A.flatten(1).T) * (B.flatten(1) @ B.flatten(1).T)
    fro = ((scaling**2) * torch.einsum("...i,ij,...j->...", code, gram, code)).clamp_min(_TINY).sqrt()
    return factor * torch.where(fro > tau_fro, tau_fro / fro, torch.ones_like(fro))
