import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BEM_AUTO_PRECISION", "fp32")  # tests compute the same on every machine (bem.precision)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # the fused site kernel (bem.module.fused) runs in Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bem import BEMConfig, attach_bem, bem_layers  # noqa: E402
from bem.models import tiny  # noqa: E402

SITES = {"llama": ["o_proj", "down_proj"], "gpt2": ["attn.c_proj", "mlp.c_proj"]}

# The v1.3 variants on the tiny models (width 32, 4 heads; MLP 64 wide for llama, 128 for gpt2).
VARIANTS = {
    "anchor": {},
    "pt1_head_gates": {"head_groups": 2},
    "v1_dynrank": {"dynamic_rank": 2},
    "v2_gate_shaping": {"head_groups": 2, "gate_features": [0, 2]},
    "v3_kron": {"kron_sites": "down", "kron_factor": [4, 8]},
    "v4_film": {"film": 4},
    "mm_projector": {"side_projector": "mlp2x_gelu"},
    "all": {"head_groups": 4, "gate_features": [1], "dynamic_rank": 3, "kron_sites": "down",
            "kron_factor": [8, 4], "kron_terms": 3, "film": 2},
}


def variant_options(arch: str, variant: str) -> dict:
    options = dict(VARIANTS[variant])
    if options.get("kron_sites") == "down":
        options["kron_sites"] = [SITES[arch][1]]
    return options


def routed_tiny(arch: str, seed: int = 0, **options) -> torch.nn.Module:
    """A tiny model with BEM attached and non-trivial U and controller weights, so codes matter."""
    model = tiny(arch, seed=seed)
    options = {"rank": 4, "alpha": 8.0, "sites": SITES[arch], "controller": "chunk", "chunk_size": 4,
               "side_dim": 3, **options}
    attach_bem(model, BEMConfig(**options))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            zero_init = layer.adapter_parameters()["U" if "U" in layer.adapter_parameters() else "B"]
            zero_init.copy_(torch.randn(zero_init.shape, generator=gen) * 0.3)
        controller = getattr(model, "bem_controller", None)
        if controller is not None:
            for p in controller.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(params=["llama", "gpt2"])
def arch(request):
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request):
    return request.param


def tiny_run_folder(folder):
    """`folder`/model: a tiny llama with SmolLM2's tokenizer saved as a local Hugging Face folder, and an empty
    `folder`/experiments; returns the experiments folder (end-to-end tests write their configs there)."""
    from bem.models import load_base

    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "experiments").mkdir()
    return folder / "experiments"
