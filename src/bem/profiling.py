"""`bem profile`: latency of prefill and of one decode step (p50/p95) and peak memory, for the base model
and each experiment's modules, held in one process and timed in interleaved rounds (every round runs each
model once, in an order rotated from round to round) after warm-up, so that drift of the machine does not
favour whichever model is measured last.

Peak memory is the model's parameters and buffers plus the peak working memory of one prefill + decode
pass above the level before it: on CPU the process RSS (sampled every 1 ms by a thread), on a GPU
torch.cuda.max_memory_allocated.

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


@dataclass
class _Subject:
    """One model under measurement, with its fixed inputs and the timings collected so far."""
    name: str
    config_hash: str
    model: torch.nn.Module
    ids: torch.Tensor
    kwargs: dict
    side_dim: int
    prefill: list
    decode: list


def _subject(model, name: str, config_hash: str, batch: int, prompt_len: int, side_dim: int, vocab: int) -> _Subject:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=gen).to(device)
    return _Subject(name, config_hash, model, ids, _bem_kwargs(model, batch, prompt_len, side_dim, device), side_dim,
                    [], [])


@torch.no_grad()
def _one_pass(subject: _Subject, decode_steps: int) -> tuple[float, list[float]]:
    """One prefill of the prompt, then `decode_steps` greedy decode steps on its KV cache; seconds."""
    model, device = subject.model, subject.ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(subject.ids, use_cache=True, **subject.kwargs)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_steps):
        _sync(device)
        s0 = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        _sync(device)
        steps.append(time.perf_counter() - s0)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return prefill, steps


def _peak_memory_mb(subject: _Subject, decode_steps: int) -> float:
    """This model's parameters and buffers plus the peak working memory of one pass above the level before
    it: what serving this model alone would peak at, whatever else the process holds."""
    device, model = subject.ids.device, subject.model
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _one_pass(subject, decode_steps)
        return weights + (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with _PeakRSS() as rss:
        _one_pass(subject, decode_steps)
    return weights + rss.delta_mb


def measure_interleaved(subjects: list[_Subject], decode_steps: int = 16, warmup: int = 2, repeats: int = 10,
                        vocab: int = 1000, prompt_len: int = 128) -> list[Profile]:
    """Time every subject in rounds: each round runs one pass of every model, in an order rotated from round
    to round, so that slow drift of the machine (clock, thermal state, other load) falls on all models
    alike instead of on whichever was measured last."""
    for subject in subjects:
        for _ in range(warmup):
            _one_pass(subject, decode_steps)
    for r in range(repeats):
        shift = r % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            prefill, steps = _one_pass(subject, decode_steps)
            subject.prefill.append(prefill)
            subject.decode += steps
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000)  # noqa: E731
    results = []
    for s in subjects:
        memory = _peak_memory_mb(s, decode_steps)
        hit = kv_hit_rate(s.model, shared_len=max(1, 3 * prompt_len // 4), suffix_len=max(1, prompt_len // 4),
                          side_dim=s.side_dim, vocab=vocab)
        results.append(Profile(s.name, s.config_hash, ms(s.prefill, 50), ms(s.prefill, 95), ms(s.decode, 50),
                               ms(s.decode, 95), memory, hit, str(s.ids.device)))
    return results


def measure(model, name: str, config_hash: str, batch: int = 1, prompt_len: int = 128, decode_steps: int = 16,
            warmup: int = 2, repeats: int = 10, side_dim: int = 0, vocab: int = 1000) -> Profile:
    """One model alone (for comparisons use `profile`, which interleaves the models)."""
    subject = _subject(model, name, config_hash, batch, prompt_len, side_dim, vocab)
    return measure_interleaved([subject], decode_steps, warmup, repeats, vocab, prompt_len)[0]


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


def profile(configs: list[ExperimentConfig], device: str = "cpu", batch: int = 1, prompt_len: int = 128,
            decode_steps: int = 16, warmup: int = 2, repeats: int = 10) -> list[Profile]:
    """The base model, then each experiment's modules on a fresh copy of it, all held in this process and
    timed in interleaved rounds (`measure_interleaved`)."""
    model_name = configs[0].model if configs else "smollm2-135m"
    model, tokenizer = load_base(model_name)
    vocab = len(tokenizer)
    subjects = [_subject(model.to(device), "base", "", batch, prompt_len, 0, vocab)]
    for config in configs:
        model, _ = load_base(config.model)
        attach_bem(model, config.bem)
        subjects.append(_subject(model.to(device), config.name, config.config_hash(), batch, prompt_len,
                                 config.bem.side_dim, vocab))
    return measure_interleaved(subjects, decode_steps, warmup, repeats, vocab, prompt_len)
