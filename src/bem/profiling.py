"""`bem profile`: latency of prefill and of one decode step (p50/p95) and peak memory, for the base model
and each experiment's modules, measured in the same process with warm-up and repeats.

Memory on CPU is the peak process RSS above the level before the measurement (sampled every 1 ms by
a thread); on a GPU it is torch.cuda.max_memory_allocated.

KV hit rate (SPEC §2): a stream of requests shares a leading system prompt and differs after it. A prompt
token is a *hit* when the K/V that the first request cached for it equal (max |Δ| ≤ 1e-5, every layer)
the K/V recomputed for a later request, so a prefix cache could serve it; the rate is hits over all
prompt tokens of the later requests.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch

from bem import attach_bem
from bem.experiments.config import ExperimentConfig
from bem.models import load_base


@dataclass
class Profile:
    name: str
    config_hash: str
    prefill_p50_ms: float
    prefill_p95_ms: float
    decode_p50_ms: float
    decode_p95_ms: float
    peak_memory_mb: float
    kv_hit_rate: float
    device: str


class _PeakRSS:
    def __init__(self):
        self.process, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.process.memory_info().rss
        self.peak = self.base
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, name: str, config_hash: str, batch: int = 1, prompt_len: int = 128, decode_steps: int = 16,
            warmup: int = 2, repeats: int = 10, side_dim: int = 0, vocab: int = 1000) -> Profile:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=gen).to(device)
    kwargs = _bem_kwargs(model, batch, prompt_len, side_dim, device)
    prefill, decode = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _PeakRSS() as rss:
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, **kwargs)
            _sync(device)
            t1 = time.perf_counter()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            steps = []
            for _ in range(decode_steps):
                _sync(device)
                s0 = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True)
                _sync(device)
                steps.append(time.perf_counter() - s0)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                prefill.append(t1 - t0)
                decode += steps
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss.delta_mb
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000)  # noqa: E731
    hit = kv_hit_rate(model, shared_len=max(1, 3 * prompt_len // 4), suffix_len=max(1, prompt_len // 4),
                      side_dim=side_dim, vocab=vocab)
    return Profile(name, config_hash, ms(prefill, 50), ms(prefill, 95), ms(decode, 50), ms(decode, 95), memory, hit,
                   str(device))


def _bem_kwargs(model, batch: int, prompt_len: int, side_dim: int, device) -> dict:
    if getattr(model, "_bem_runtime", None) is None or model._bem_runtime.controller is None:
        return {}
    kwargs = {"bem_prompt_len": prompt_len}
    if side_dim:
        kwargs["bem_side"] = torch.zeros(batch, side_dim, device=device)
    return kwargs


@torch.no_grad()
def kv_hit_rate(model, shared_len: int = 96, suffix_len: int = 32, requests: int = 4, side_dim: int = 0,
                vocab: int = 1000, tolerance: float = 1e-5) -> float:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(10, vocab, (1, shared_len), generator=gen)
    caches = []
    for _ in range(requests):
        ids = torch.cat([shared, torch.randint(10, vocab, (1, suffix_len), generator=gen)], 1).to(device)
        out = model(ids, use_cache=True, **_bem_kwargs(model, 1, ids.shape[1], side_dim, device))
        caches.append([(layer.keys.clone(), layer.values.clone()) for layer in out.past_key_values.layers])
    hits = 0
    for cache in caches[1:]:
        same = torch.ones(shared_len + suffix_len, dtype=torch.bool, device=device)
        for (k0, v0), (k, v) in zip(caches[0], cache):
            diff = torch.maximum((k0 - k).abs().amax((0, 1, 3)), (v0 - v).abs().amax((0, 1, 3)))
            same &= diff <= tolerance
        hits += int(same.sum())
    return hits / ((requests - 1) * (shared_len + suffix_len))


def profile(configs: list[ExperimentConfig], device: str = "cpu", **options) -> list[Profile]:
    """The base model, then each experiment's modules on a fresh copy of it, in this process."""
    model_name = configs[0].model if configs else "smollm2-135m"
    model, tokenizer = load_base(model_name)
    results = [measure(model.to(device), "base", "", vocab=len(tokenizer), **options)]
    for config in configs:
        model, _ = load_base(config.model)
        attach_bem(model, config.bem)
        results.append(measure(model.to(device), config.name, config.config_hash(), side_dim=config.bem.side_dim,
                               vocab=len(tokenizer), **options))
    return results
