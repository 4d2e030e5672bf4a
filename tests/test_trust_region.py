"""The trust region, computed through the r×r core, checked against a dense SVD."""
import pytest
import torch

from bem.module.trust_region import trust_region_factor


def dense_delta(U, V, code, s):
    return s * (U * code) @ V.T


@pytest.mark.parametrize("seed", range(5))
def test_factor_matches_dense_svd_and_bounds_hold(seed):
    g = torch.Generator().manual_seed(seed)
    d_out, d_in, r, s = 40, 24, 6, 2.0
    U, V = torch.randn(d_out, r, generator=g, dtype=torch.float64), torch.randn(d_in, r, generator=g, dtype=torch.float64)
    codes = torch.rand(7, r, generator=g, dtype=torch.float64) * 2
    dense = torch.stack([dense_delta(U, V, c, s) for c in codes])
    sigma1 = torch.linalg.matrix_norm(dense, ord=2)
    fro = torch.linalg.matrix_norm(dense, ord="fro")
    tau_sigma, tau_fro = float(sigma1.median()), float(fro.quantile(0.7))  # some codes bind, some don't
    factor = trust_region_factor(U, V, codes, s, tau_sigma, tau_fro)
    expected = sigma1.reciprocal().mul(tau_sigma).clamp(max=1) * fro.reciprocal().mul(tau_fro).clamp(max=1)
    torch.testing.assert_close(factor, expected, rtol=1e-9, atol=1e-12)
    scaled = dense * factor[:, None, None]
    assert (torch.linalg.matrix_norm(scaled, ord=2) <= tau_sigma * (1 + 1e-9)).all()
    assert (torch.linalg.matrix_norm(scaled, ord="fro") <= tau_fro * (1 + 1e-9)).all()
    assert (factor < 1).any() and (factor == 1).any()


def test_off_is_one_and_gradient_finite_at_lora_init():
    U = torch.zeros(10, 4, requires_grad=True)  # LoRA init: U = 0
    V = torch.randn(8, 4, requires_grad=True)
    code = torch.rand(3, 4)
    assert torch.equal(trust_region_factor(U, V, code, 1.0, None, None), torch.ones(3))
    factor = trust_region_factor(U, V, code, 1.0, 0.5, 0.5)
    factor.sum().backward()
    assert torch.isfinite(U.grad).all() and torch.isfinite(V.grad).all()
    assert torch.equal(factor.detach(), torch.ones(3))
