"""Numeric precision of training and evaluation: fp32, or bf16 where the hardware runs it natively.

`auto` (the default of `training.precision` and `evaluation.precision`) is resolved when a config is loaded: bf16 on
a CUDA device that supports it or a CPU whose oneDNN has native bf16 kernels (AVX512-BF16, AMX), else fp32 with one
log line. The resolved value is what the config hash holds, so a unit trained in bf16 never passes for one trained in
fp32. `BEM_AUTO_PRECISION=fp32|bf16` fixes what `auto` means (the test suite sets fp32, so it computes the same on
every machine).

Training in bf16 is autocast: BEM's weights, the controller and AdamW's state stay fp32, the frozen base model's
weights stay fp32 too and autocast casts them per call. Evaluating in bf16 runs the whole model in bf16 without
autocast (`inference_precision`): every weight is cast once for the evaluation, so a decode step does no casts that
the base model in bf16 would not do, and each tensor's fp32 value is restored bit for bit afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

from bem.errors import BEMError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32", "bf16")
ENV = "BEM_AUTO_PRECISION"
_told: set[str] = set()  # devices whose fallback to fp32 was logged


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 runs natively: CUDA devices that support it; CPUs whose oneDNN has bf16 kernels (AVX512-BF16 or
    AMX). Elsewhere CPU autocast emulates bf16 and is many times slower than fp32 (measured on an AVX2-only AMD EPYC:
    one PEFT LoRA bench round took 335 s in bf16 against 26 s in fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def default_device() -> torch.device:
    """The device a unit trains on: the GPU when there is one (as Accelerate picks), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve(precision: str, device: torch.device | str | None = None) -> str:
    """`fp32` or `bf16`: `precision` itself, or what `auto` means on `device` (default: `default_device()`)."""
    if precision not in PRECISIONS:
        raise BEMError(f"precision {precision!r} is not allowed; expected one of {list(PRECISIONS)}")
    if precision != "auto":
        return precision
    forced = os.environ.get(ENV)
    if forced:
        if forced not in ("fp32", "bf16"):
            raise BEMError(f"{ENV}={forced!r} is not allowed; expected fp32 or bf16 (or unset: detect)")
        return forced
    device = torch.device(device) if device is not None else default_device()
    if bf16_supported(device):
        return "bf16"
    if device.type not in _told:
        _told.add(device.type)
        log.info("precision auto: bf16 is not native on this %s (emulated, slower than fp32), so fp32 is used",
                 device.type)
    return "fp32"


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast for `precision == 'bf16'`, else nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


@contextlib.contextmanager
def inference_precision(model: torch.nn.Module, precision: str) -> Iterator[torch.nn.Module]:
    """Run `model` in `precision` inside the block: for bf16 every floating parameter is cast once on entry and its
    previous tensor put back on exit (bit for bit: the originals are kept, not cast back). Buffers stay as they are
    (rotary frequencies are computed in fp32 by the models themselves)."""
    if precision == "fp32":
        yield model
        return
    kept = []
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
                kept.append((tensor, tensor.data))
                tensor.data = tensor.data.to(torch.bfloat16)
    try:
        yield model
    finally:
        for tensor, data in kept:
            tensor.data = data
