"""Budget parity: added trainable parameters and added FLOPs per token of a BEM configuration.

Parameters are counted exactly by attaching BEM to the model built on the `meta` device (no weights
are loaded). FLOPs per token are analytic (a multiply-add counts 2):
- a low-rank site: x·V (2·r·d_in), code scaling (r), ·Uᵀ (2·r·d_out), scale-and-add (2·d_out);
- a Kronecker site with t terms (PT3): X·Bᵀ (2·t·d_in·b_out), code scaling (t·a_in·b_out),
  A·(…) (2·t·d_out·a_in), scale-and-add (2·d_out);
- head-group gates (PT1): one multiply per input channel of each gated site (d_in);
- residual FiLM (PT4): h + γ ⊙ (out − h) + β, 4·d per block;
- the controller, paid once per chunk and so amortised over `chunk_size` tokens: pooling (d per
  token) plus its trunk and heads (2·(d + side_dim)·h + 2·h·outputs per chunk; the top-k scores of
  PT2 count as outputs). V2's evidence term is computed once per sequence and is left out. With a side
  projector (MM) the trunk reads h projected channels instead of side_dim, and the projector adds
  5·side_dim + 2·side_dim·h (+ 2·h² for mlp2x_gelu) per chunk.
The trust region's small per-chunk work is below 1% of this at the default sizes and is left out.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bem.module.attach import attach_bem, bem_layers, hidden_size
from bem.module.config import BEMConfig
from bem.module.layer import BEMLayer, KronLayer, site_shape


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
    """Added parameters and FLOPs per token of `config` on `model_name` (cached per config)."""
    return _budget(model_name, config.to_json())


@functools.lru_cache(maxsize=64)
def _budget(model_name: str, config_json: str) -> Budget:
    config = BEMConfig.from_dict(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_model_config(model_name))
    attach_bem(model, config)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = 0.0
    for layer in bem_layers(model).values():
        flops += site_flops(layer)
    controller = getattr(model, "bem_controller", None)
    if controller is not None:
        d, h, heads = hidden_size(model), config.controller_hidden, controller.heads
        outputs = heads.width + (sum(heads.code) if heads.dynamic_rank is not None else 0)
        side = config.side_dim if config.side_projector is None else h  # a projector's output enters the trunk
        per_chunk = 2 * (d + side) * h + 2 * h * outputs
        if config.side_projector is not None:  # recomputed at each controller call: LayerNorm, linear (, GELU, linear)
            per_chunk += 5 * config.side_dim + 2 * config.side_dim * h + (2 * h * h if config.side_projector == "mlp2x_gelu" else 0)
        flops += d + per_chunk / config.chunk_size + 4 * d * heads.film_blocks
    return Budget(parameters, flops, len(bem_layers(model)))


def site_flops(layer: BEMLayer) -> float:
    """Added FLOPs per token of one site (see the module docstring)."""
    d_in, d_out = site_shape(layer.base_layer)
    gate = d_in if layer.gate_index is not None else 0
    if isinstance(layer, KronLayer):
        t, (a_out, a_in), (b_out, _) = layer.terms, layer.a_shape, layer.b_shape
        return 2 * t * d_in * b_out + t * a_in * b_out + 2 * t * d_out * a_in + 2 * d_out + gate
    r = layer.rank
    return 2 * r * d_in + r + 2 * r * d_out + 2 * d_out + gate
