import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bem import BEMConfig, attach_bem, bem_layers  # noqa: E402
from bem.models import tiny  # noqa: E402

SITES = {"llama": ["o_proj", "down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"]}


def routed_tiny(arch: str, seed: int = 0, **options) -> torch.nn.Module:
    """A tiny model with BEM attached and non-trivial U and controller weights, so codes matter."""
    model = tiny(arch, seed=seed)
    options = {"rank": 4, "alpha": 8.0, "sites": SITES[arch], "controller": "chunk", "chunk_size": 4,
               "side_dim": 3, **options}
    attach_bem(model, BEMConfig(**options))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.U.copy_(torch.randn(layer.U.shape, generator=gen) * 0.3)
        controller = getattr(model, "bem_controller", None)
        if controller is not None:
            for p in controller.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param
