"""export_peft: a constant-code BEM (or one expert block of a bank) as a PEFT LoRA adapter folder.

With a constant code c the site update is s · U diag(c) Vᵀ, i.e. LoRA with B = U diag(c), A = Vᵀ over the directions
where c ≠ 0, and lora_alpha = s · r' for the r' directions kept (PEFT's scaling is lora_alpha / r'). What PEFT cannot
express is refused: routed codes (the code changes with context), head gates, FiLM, Kronecker sites, and a trust
region (its factor depends on the code; it is folded in only for a constant code, which is what is exported).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from bem.module.attach import bem_layers
from bem.module.config import BEMConfig
from bem.module.layer import KronLayer


def _code(config: BEMConfig, code: torch.Tensor | None, expert: int | None) -> torch.Tensor:
    if code is not None and expert is not None:
        raise ValueError("export_peft takes code= or expert=, not both")
    if expert is not None:
        if not 0 <= expert < config.experts:
            raise ValueError(f"export_peft: expert = {expert} is not allowed; this bank has experts 0..{config.experts - 1}")
        width = config.rank // config.experts
        code = torch.zeros(config.rank)
        code[expert * width:(expert + 1) * width] = 1.0
    if code is None:
        code = torch.ones(config.rank)
    code = torch.as_tensor(code, dtype=torch.float32).flatten()
    if code.shape != (config.rank,):
        raise ValueError(f"export_peft: code must have rank = {config.rank} entries, got {tuple(code.shape)}")
    return code


def export_peft(model: torch.nn.Module, path: str | os.PathLike, code: torch.Tensor | None = None,
                expert: int | None = None) -> Path:
    """Write the model's BEM with a constant `code` (default c ≡ 1; `expert=e`: ones on block e of the bank) as a
    PEFT LoRA adapter folder that `PeftModel.from_pretrained(base, path)` loads. Returns the folder."""
    config: BEMConfig = model.bem_config
    if config.controller != "static" and code is None and expert is None:
        raise ValueError(f"export_peft: this BEM is routed (controller = {config.controller!r}); PEFT LoRA holds one "
                         "constant update, so pass the code (or expert) to export")
    for name, flag in (("head_groups", config.head_groups), ("film", config.film), ("kron_sites", config.kron_sites)):
        if flag:
            raise ValueError(f"export_peft: BEMConfig.{name} = {flag!r} cannot be expressed as PEFT LoRA "
                             "(head gates, FiLM and Kronecker sites have no LoRA form)")
    code = _code(config, code, expert)
    keep = torch.nonzero(code).flatten()
    if not len(keep):
        raise ValueError("export_peft: the code is zero everywhere; there is nothing to export")
    layers = bem_layers(model)
    tensors, modules = {}, set()
    for name, layer in layers.items():
        if isinstance(layer, KronLayer):
            raise ValueError(f"export_peft: site {name} is a Kronecker site, which has no LoRA form")
        coef = layer.coefficients(code.to(layer.U.device))  # trust region folded in for this constant code
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = layer.V[:, keep].T.detach().contiguous().cpu()
        tensors[f"{prefix}.lora_B.weight"] = (layer.U[:, keep] * coef[keep]).detach().contiguous().cpu()
        modules.add(next(p for p in config.sites if name == p or name.endswith("." + p)))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    conv1d = any(not isinstance(layer.base_layer, torch.nn.Linear) for layer in layers.values())
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": len(keep), "lora_alpha": config.scaling * len(keep),
        "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": conv1d,
        "base_model_name_or_path": getattr(model.config, "_name_or_path", None), "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None,
        "layers_to_transform": None if config.layers is None else sorted(config.layers),
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return path
