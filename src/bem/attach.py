"""attach_bem / save_bem / load_bem: put BEM sites and a controller on a Hugging Face causal LM."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.pytorch_utils import Conv1D

from bem.config import BEMConfig, BEMConfigError
from bem.controller import Controller, Heads
from bem.layer import BEMLayer, KronLayer, site_shape
from bem.runtime import BEMRuntime

log = logging.getLogger(__name__)

CONFIG_FILE = "bem_config.json"
WEIGHTS_FILE = "bem_weights.safetensors"
FORMAT_VERSION = 1


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList with one entry per hidden layer."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return name, module
    raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.n_embd


def _block_index(name: str, blocks_prefix: str) -> int | None:
    m = re.match(re.escape(blocks_prefix) + r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def bem_layers(model: nn.Module) -> dict[str, BEMLayer]:
    """Every BEM site of the model by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, BEMLayer)}


def bem_runtime(model: nn.Module) -> BEMRuntime:
    runtime = getattr(model, "_bem_runtime", None)
    if runtime is None:
        raise ValueError(f"{type(model).__name__} has no BEM attached; call attach_bem(model, config) first")
    return runtime


def bem_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable BEM tensors only (site U/V and the controller), keyed by module name."""
    out = {f"{name}.{p}": t for name, layer in bem_layers(model).items() for p, t in layer.adapter_parameters().items()}
    controller = getattr(model, "bem_controller", None)
    if controller is not None:
        out.update({f"bem_controller.{k}": v for k, v in controller.state_dict().items()})
    return out


def attach_bem(model: nn.Module, config: BEMConfig) -> nn.Module:
    """Wrap the matching sites in BEMLayer, add the controller, freeze the base. Returns `model`.

    The model is still called the Hugging Face way; it also takes as keyword arguments
    `bem_prompt_len` (int or (B,) real-token prompt lengths), `bem_side` ((B, side_dim) side inputs)
    and `bem_mask` ((B, r) per-example mask m on the basis directions).
    """
    if getattr(model, "_bem_runtime", None) is not None:
        raise ValueError("BEM is already attached to this model")
    blocks_prefix, blocks = find_blocks(model)
    if config.read_layer > len(blocks):
        raise BEMConfigError(f"{config.source + ': ' if config.source else ''}BEMConfig.read_layer = "
                             f"{config.read_layer} is not allowed; this model has {len(blocks)} blocks (0..{len(blocks)})")
    if config.layers is not None and max(config.layers) >= len(blocks):
        raise BEMConfigError(f"BEMConfig.layers = {list(config.layers)} is not allowed; block indices go 0..{len(blocks) - 1}")
    model.requires_grad_(False)

    targets = []
    linear_names = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        linear_names.append(name)
        block = _block_index(name, blocks_prefix)
        if block is None or (config.layers is not None and block not in config.layers):
            continue
        if any(_matches(name, p) for p in config.sites):
            targets.append((name, block))
    if not targets:
        examples = sorted({n.split(".", 2)[-1] if n.startswith(blocks_prefix) else n for n in linear_names})
        raise BEMConfigError(f"BEMConfig.sites = {list(config.sites)} matches no linear layer of "
                             f"{type(model).__name__}; layer names include {examples[:12]}")

    routed = config.controller != "static"
    layers = []
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        base = getattr(model.get_submodule(parent_name), child)
        if any(_matches(name, p) for p in config.kron_sites):
            layer = KronLayer(base, config.kron_width, config.kron_factor, config.alpha, config.rank, config.tau_fro, name)
        else:
            layer = BEMLayer(base, config.rank, config.alpha, config.tau_sigma, config.tau_fro)
        layers.append((name, block, layer))
    _check_variant_sites(model, config, layers)

    codes, gate_sites = [], 0
    for name, block, layer in layers:
        if routed and block >= config.read_layer:
            layer.site_index = len(codes)
            codes.append(layer.width)
            if config.head_groups and any(_matches(name, p) for p in config.head_gate_sites):
                layer.gate_index = gate_sites
                gate_sites += 1
    film_blocks = [b for b in range(config.read_layer, len(blocks))] if config.film else []
    controller = None
    if codes:
        heads = Heads(code=codes, gate_groups=config.head_groups, gate_sites=gate_sites, film_groups=config.film,
                      film_blocks=len(film_blocks), dynamic_rank=config.dynamic_rank, rank=config.rank,
                      gate_features=config.gate_features, film_gamma_max=config.film_gamma_max,
                      film_beta_max=config.film_beta_max)
        controller = Controller(hidden_size(model), config.side_dim, config.controller_hidden, heads)
        controller.to(next(model.parameters()).device)
        model.bem_controller = controller
    runtime = BEMRuntime(config, controller)
    for name, _, layer in layers:
        parent_name, _, child = name.rpartition(".")
        layer._runtime = runtime
        setattr(model.get_submodule(parent_name), child, layer)
    if routed and len(codes) < len(layers):
        log.info("BEM: %d sites in blocks before read_layer=%d use c ≡ 1", len(layers) - len(codes), config.read_layer)

    runtime.hooks = []
    if controller is not None:
        read_module = model.get_input_embeddings() if config.read_layer == 0 else blocks[config.read_layer - 1]
        runtime.hooks.append(read_module.register_forward_hook(
            lambda _m, _i, out: runtime.read(out[0] if isinstance(out, tuple) else out)))
    for index, block in enumerate(film_blocks):
        runtime.hooks.append(blocks[block].register_forward_hook(_film_hook(runtime, index), with_kwargs=True))
    model._bem_runtime = runtime
    model.bem_config = config
    _wrap_forward(model, runtime)
    return model


def _check_variant_sites(model: nn.Module, config: BEMConfig, layers: list) -> None:
    """Errors that name the layer when a variant cannot apply to the model's sites."""
    where = f"{config.source}: " if config.source else ""
    names = [name for name, _, _ in layers]
    for option, patterns in (("kron_sites", config.kron_sites), ("head_gate_sites", config.head_gate_sites if config.head_groups else ())):
        unmatched = [p for p in patterns if not any(_matches(n, p) for n in names)]
        if unmatched and not (option == "head_gate_sites" and len(unmatched) < len(patterns)):
            raise BEMConfigError(f"{where}BEMConfig.{option} = {list(patterns)} matches none of the BEM sites "
                                 f"{sorted({n.rsplit('.', 1)[-1] for n in names})}")
    if config.head_groups:
        heads = getattr(model.config, "num_attention_heads", None) or getattr(model.config, "n_head", None)
        for name, _, layer in layers:
            if any(_matches(name, p) for p in config.head_gate_sites):
                d_in = site_shape(layer.base_layer)[0]
                if heads % config.head_groups or d_in % heads:
                    raise BEMConfigError(f"{where}BEMConfig.head_groups = {config.head_groups} does not split layer "
                                         f"{name} (input {d_in} = {heads} heads) into groups of whole heads; "
                                         f"allowed: a divisor of {heads}")
    if config.film and hidden_size(model) % config.film:
        raise BEMConfigError(f"{where}BEMConfig.film = {config.film} does not divide the hidden size "
                             f"{hidden_size(model)} into channel groups; allowed: a divisor of {hidden_size(model)}")


def _film_hook(runtime: BEMRuntime, index: int):
    def hook(_module, args, kwargs, out):
        before = args[0] if args else kwargs["hidden_states"]
        if isinstance(out, tuple):
            return (runtime.film(index, before, out[0]),) + tuple(out[1:])
        return runtime.film(index, before, out)
    return hook


def _wrap_forward(model: nn.Module, runtime: BEMRuntime) -> None:
    """Give the model's forward the keyword arguments `bem_prompt_len`, `bem_side` and `bem_mask`.

    The signature is extended (not hidden behind **kwargs) so that `generate` accepts these
    arguments and passes them on to every step.
    """
    original = model.forward
    signature = inspect.signature(original)
    var_kw_name = next((p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(*args, bem_prompt_len=None, bem_side=None, bem_mask=None, **kwargs):
        if not runtime.enabled:
            return original(*args, **kwargs)
        bound = dict(signature.bind_partial(*args, **kwargs).arguments)
        bound.update(bound.pop(var_kw_name, None) or {})
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        # transformers 5.24 names the cache `cache`; `past_key_values` is its deprecated alias
        cache = bound.get("cache", bound.get("past_key_values"))
        runtime.begin_call(tokens.shape[0], tokens.shape[1], tokens.device, bound.get("attention_mask"),
                           cache, bem_prompt_len, bem_side, bem_mask)
        out = None
        try:
            out = original(*args, **kwargs)
        finally:
            runtime.end_call(_returned_cache(out))
        return out

    params = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("bem_prompt_len", "bem_side", "bem_mask")]
    var_kw = [p for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD]
    forward.__signature__ = signature.replace(parameters=params + extra + var_kw)
    model.forward = forward

    original_generate = model.generate

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if runtime.enabled and runtime.controller is not None:
            _check_decoding_mode(model, kwargs)
        return original_generate(*args, **kwargs)

    model.generate = generate



def _returned_cache(out):
    """The KV cache object a forward returned (a ModelOutput's `cache`, or the Cache in a tuple), else None."""
    if out is None:
        return None
    if isinstance(out, tuple):
        return next((x for x in out if isinstance(x, Cache)), None)
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    return cache if isinstance(cache, Cache) else None


# Decoding modes whose cache handling BEM's routing state does not follow (see docs/design.md, decoding modes).
_REFUSED_MODES = {
    GenerationMode.BEAM_SEARCH: "beam search reorders the KV cache across beams",
    GenerationMode.BEAM_SAMPLE: "beam sampling reorders the KV cache across beams",
    GenerationMode.GROUP_BEAM_SEARCH: "group beam search reorders the KV cache across beams",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "constrained beam search reorders the KV cache across beams",
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search re-batches the KV cache over top-k candidates",
    GenerationMode.DOLA_GENERATION: "DoLa reads logits from early layers, which BEM does not route for",
}


def _check_decoding_mode(model: nn.Module, kwargs: dict) -> None:
    """Refuse, naming it, a `generate` decoding mode whose output BEM's routing would get wrong."""
    config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k != "generation_config" and hasattr(config, k)})
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode in _REFUSED_MODES:
        raise NotImplementedError(f"{mode.value} (num_beams={config.num_beams}): {_REFUSED_MODES[mode]} and BEM's "
                                  "routing state does not follow it; use greedy, sampling, prompt-lookup or "
                                  "assisted decoding")
    for option in ("assistant_early_exit", "use_mtp"):
        if getattr(config, option, None):
            raise NotImplementedError(f"{option}={getattr(config, option)!r}: self-speculative drafting runs a "
                                      "truncated BEM model that is not verified; use prompt_lookup_num_tokens or "
                                      "an assistant_model")

def set_bem_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every BEM site (and the controller) on or off; off gives the base model's output exactly."""
    runtime = bem_runtime(model)
    runtime.enabled = enabled
    for layer in bem_layers(model).values():
        layer.enabled = enabled


@contextlib.contextmanager
def bem_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """`with bem_disabled(model): ...` runs the frozen base model."""
    was = bem_runtime(model).enabled
    set_bem_enabled(model, False)
    try:
        yield model
    finally:
        set_bem_enabled(model, was)


def _fingerprint(model: nn.Module) -> dict:
    cfg = model.config
    return {"architecture": type(model).__name__, "hidden_size": hidden_size(model),
            "num_layers": len(find_blocks(model)[1]), "vocab_size": getattr(cfg, "vocab_size", None)}


def save_bem(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the BEM tensors as safetensors plus a JSON config; written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config: BEMConfig = model.bem_config
    meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "base": _fingerprint(model)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in bem_state_dict(model).items()}
    for filename, write in ((WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "bem"})),
                            (CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.")
        os.close(fd)
        try:
            write(tmp)
            os.replace(tmp, directory / filename)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return directory


def load_bem(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach BEM from `directory` (written by save_bem) onto a fresh base model. Never unpickles."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; a BEM checkpoint folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    meta = json.loads(config_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version = {meta.get('format_version')!r}; this BEM reads {FORMAT_VERSION}")
    base = _fingerprint(model)
    if meta.get("base") != base:
        raise ValueError(f"{config_path}: saved for base {meta.get('base')}, but the model is {base}")
    attach_bem(model, BEMConfig.from_dict(meta["config"], source=str(config_path)))
    tensors = load_file(str(weights_path))
    own = bem_state_dict(model)
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    with torch.no_grad():
        for key, target in own.items():
            if tensors[key].shape != target.shape:
                raise ValueError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensors[key])
    return model
