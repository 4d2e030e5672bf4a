"""attach_bem / detach_bem / save_bem / load_bem: put BEM sites and a controller on a Hugging Face causal LM."""
from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode
from transformers.pytorch_utils import Conv1D

from bem.module.config import BEMConfig, BEMConfigError
from bem.module.controller import Controller, Heads
from bem.errors import CheckpointError
from bem.module.layer import BEMLayer, KronLayer, site_shape
from bem.module.runtime import BEMRuntime

log = logging.getLogger(__name__)

CONFIG_FILE = "bem_config.json"
WEIGHTS_FILE = "bem_weights.safetensors"
FORMAT_VERSION = 2  # 2: bem_config.json records the weights' sha256
READ_FORMAT_VERSIONS = (1, 2)


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
        controller = Controller(hidden_size(model), config.side_dim, config.controller_hidden, heads,
                                config.side_projector)
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


# --- saving and loading, written so that a kill at any moment leaves either the old folder or the new one ------
_crash_counts: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Test hook: with the environment variable BEM_CRASH_AT = `name` (or `name@N`: the N-th time this point is
    reached in the process) the process dies here at once, like a `kill -9` (exit status 137, nothing flushed)."""
    wanted = os.environ.get("BEM_CRASH_AT")
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os._exit(137)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file or a folder (its entries: names created, renamed or removed) to the disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):  # platforms that cannot open a folder (Windows) cannot flush one either
            return
        raise
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic there
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor] | None) -> None:
    """CheckpointError naming `path` unless the tensors are finite and (given `expected`) have exactly its names,
    shapes and dtypes."""
    if expected is not None:
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{path}: tensors do not match the model's BEM modules: missing {missing[:5]}"
                                  f"{' …' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                  f"{' …' if len(unexpected) > 5 else ''}")
        for key, want in expected.items():
            got = tensors[key]
            if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
                raise CheckpointError(f"{path}: tensor {key} is {got.dtype} {tuple(got.shape)}, the model's is "
                                      f"{want.dtype} {tuple(want.shape)}")
    for key, got in tensors.items():
        if got.dtype.is_floating_point or got.dtype.is_complex:
            bad = int((~torch.isfinite(got)).sum())
            if bad:
                raise CheckpointError(f"{path}: tensor {key} has {bad} NaN or infinite values of {got.numel()}")


def _pending(directory: Path, kind: str) -> list[Path]:
    """Siblings save_bem leaves when killed: `.NAME.new-*` (a new folder being written) or `.NAME.old-*`
    (the folder being replaced, moved aside)."""
    return sorted(directory.parent.glob(f".{glob.escape(directory.name)}.{kind}-*"))


def _complete_adapter(folder: Path) -> bool:
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        return meta.get("weights_sha256") == _sha256(folder / WEIGHTS_FILE)
    except (OSError, ValueError, AttributeError):
        return False


def _finish_replacement(directory: Path) -> None:
    """Undo the traces of a save_bem that was killed: when the folder itself is missing (killed between moving the old
    folder aside and renaming the new one in) the complete new folder, else the old one, takes its name; leftover
    `.NAME.new-*` / `.NAME.old-*` siblings are removed."""
    if not directory.exists():
        new = [p for p in _pending(directory, "new") if _complete_adapter(p)]
        old = _pending(directory, "old")
        back = new[-1] if new else (old[-1] if old else None)
        if back is not None:
            log.warning("%s: finishing an interrupted save (%s takes the folder's name)", directory, back.name)
            os.rename(back, directory)
            _fsync(directory.parent)
    for leftover in _pending(directory, "new") + _pending(directory, "old"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_bem(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write the BEM tensors (safetensors) and a JSON config with their sha256 into the folder `directory`; `extra`
    (JSON) is kept beside the config under "extra" (the safety block's layout and knob: bem.safety).

    Atomic: both files are written and flushed in a new sibling folder, which then takes the folder's name (an old
    folder is moved aside first and removed after). A kill at any moment leaves the old folder or the new one (or,
    between the two renames, both beside the name; the next save_bem puts the complete one back first).
    A folder holding anything but a saved adapter is not replaced (CheckpointError).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _finish_replacement(directory)
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: is a file, not a folder; save_bem writes a folder there")
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_FILE, WEIGHTS_FILE))
        if foreign:
            raise CheckpointError(f"{directory}: holds {foreign[:5]} besides a saved adapter; save_bem replaces the "
                                  "whole folder, so it writes only into a new, empty or adapter-only folder")
    config: BEMConfig = model.bem_config
    tensors = {k: v.detach().contiguous().cpu() for k, v in bem_state_dict(model).items()}
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.new-"))
    old = None
    try:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "bem"})
        _fsync(tmp / WEIGHTS_FILE)
        _crash_point("adapter.weights")
        meta = {"format_version": FORMAT_VERSION, "config": config.to_dict(), "base": _fingerprint(model),
                "weights_sha256": _sha256(tmp / WEIGHTS_FILE), **({"extra": extra} if extra else {})}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        _fsync(tmp / CONFIG_FILE)
        _fsync(tmp)
        _crash_point("adapter.config")
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(directory, old)
            _crash_point("adapter.moved_aside")
        os.rename(tmp, directory)
        _fsync(directory.parent)
        _crash_point("adapter.renamed")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not directory.exists():
                os.rename(old, directory)  # the new folder failed: the old one keeps the name
    if old is not None:
        shutil.rmtree(old)
        _fsync(directory.parent)
        _crash_point("adapter.cleaned")
    return directory


def detach_bem(model: nn.Module) -> nn.Module:
    """Undo attach_bem: the original linear layers back in place (unmerged), hooks, controller and the wrapped
    forward/generate removed. Parameters keep their requires_grad (attach_bem froze them). Returns `model`."""
    runtime = getattr(model, "_bem_runtime", None)
    for name, layer in list(bem_layers(model).items()):
        if layer._merged_weight is not None:
            layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    for handle in getattr(runtime, "hooks", None) or []:
        handle.remove()
    if "bem_controller" in model._modules:
        del model.bem_controller
    for attr in ("forward", "generate"):
        wrapper = model.__dict__.get(attr)
        original = getattr(wrapper, "__wrapped__", None)
        if original is None:
            continue
        own = getattr(type(model), attr, None)
        if getattr(original, "__self__", None) is model and getattr(original, "__func__", None) is own:
            del model.__dict__[attr]  # the class's own method again
        else:
            model.__dict__[attr] = original  # a wrapper that was there before attach_bem (e.g. Accelerate's)
    for attr in ("_bem_runtime", "bem_config"):
        model.__dict__.pop(attr, None)
    return model


def load_bem(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach BEM from `directory` (written by save_bem) onto a fresh base model. Never unpickles.

    Checked before anything stays attached: the config, the weights' sha256 (format 2; format 1 folders have none
    and load with a warning), the base model, and every tensor's name, shape, dtype and finiteness. On any failure
    (CheckpointError naming the file) the model is left exactly as it was, without BEM.
    """
    directory = Path(directory)
    if getattr(model, "_bem_runtime", None) is not None:
        raise ValueError(f"load_bem({directory}): BEM is already attached to this model; load onto a fresh base model")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            pending = [p.name for p in _pending(directory, "new") + _pending(directory, "old")]
            raise CheckpointError(f"{path} not found; a saved BEM adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE}"
                                  + (f" (an interrupted save left {pending} beside it; save the adapter again)"
                                     if pending else ""))
    try:
        meta = json.loads(config_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise CheckpointError(f"{config_path}: not a readable BEM config ({err})") from None
    version = meta.get("format_version")
    if version not in READ_FORMAT_VERSIONS:
        raise CheckpointError(f"{config_path}: format_version = {version!r}; this BEM reads "
                              f"{list(READ_FORMAT_VERSIONS)}")
    if version >= 2:
        want, got = meta.get("weights_sha256"), _sha256(weights_path)
        if want != got:
            raise CheckpointError(f"{weights_path}: sha256 {got} differs from the {want!r} recorded in {CONFIG_FILE}: "
                                  "the file is damaged or not the one saved with this config")
    else:
        log.warning("%s: format_version %s has no checksum; the weights are checked for names, shapes, dtypes and "
                    "finite values only. Save it again to add one.", config_path, version)
    base = _fingerprint(model)
    if meta.get("base") != base:
        raise CheckpointError(f"{config_path}: saved for base {meta.get('base')}, but the model is {base}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"{weights_path}: not a readable safetensors file ({err})") from None
    _check_tensors(weights_path, tensors, None)  # finite, before touching the model
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{config_path}: has no 'config' object; expected one written by save_bem")
    config = BEMConfig.from_dict(meta["config"], source=str(config_path))
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        attach_bem(model, config)
        own = bem_state_dict(model)
        _check_tensors(weights_path, tensors, own)
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(tensors[key])
    except BaseException:
        detach_bem(model)
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(frozen[name])
        raise
    return model
