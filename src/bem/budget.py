"""Budget parity: added trainable parameters and added FLOPs per token of a BEM configuration.

Parameters are counted exactly by attaching BEM to the model built on the `meta` device (no weights
are loaded). FLOPs per token are analytic (a multiply-add counts 2):
- each site: x·V (2·r·d_in), code scaling (r), ·Uᵀ (2·r·d_out), scale-and-add (2·d_out);
- the controller, paid once per chunk and so amortised over `chunk_size` tokens: pooling (d per
  token) plus its two linear layers (2·(d + side_dim)·h + 2·h·n_sites·r per chunk).
The trust region's r×r work per chunk is below 1% of this at the default sizes and is left out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bem.attach import attach_bem, bem_layers, hidden_size
from bem.config import BEMConfig
from bem.layer import site_shape


@dataclass(frozen=True)
class Budget:
    parameters: int
    flops_per_token: float
    sites: int


@functools.lru_cache(maxsize=8)
def _model_config(model_name: str):
    from bem.models import EMBEDDED, embedded_path

    return AutoConfig.from_pretrained(embedded_path(model_name) if model_name in EMBEDDED else model_name)


def budget(model_name: str, config: BEMConfig) -> Budget:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(model_name))
    attach_bem(model, config)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    r, flops = config.rank, 0.0
    for layer in bem_layers(model).values():
        d_in, d_out = site_shape(layer.base_layer)
        flops += 2 * r * d_in + r + 2 * r * d_out + 2 * d_out
    controller = getattr(model, "bem_controller", None)
    if controller is not None:
        d, h = hidden_size(model), config.controller_hidden
        per_chunk = 2 * (d + config.side_dim) * h + 2 * h * controller.n_sites * r
        flops += d + per_chunk / config.chunk_size
    return Budget(parameters, flops, len(bem_layers(model)))
