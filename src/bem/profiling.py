"""`bem profile`: latency of prefill and of one decode step (p50/p95), peak memory and the KV hit rate, for the
base model and each experiment's *trained* modules, held in one process and timed in interleaved rounds (every
round runs each model once, in an order rotated from round to round) after warm-up, so that drift of the machine
does not favour whichever model is measured last.

What is profiled: with a run folder (`bem profile --out RUN`), each experiment's finished unit (its smallest
finished seed) with its trained adapter loaded (restored by retraining when the folder holds the unit but not the
adapter, see experiments/adapters.py); an experiment without a finished unit is profiled with fresh modules
(ΔW = 0, the base model's numbers) and labelled `untrained`, never silently. The unit is stored with the profile.

Peak memory is the model's parameters and buffers plus the peak working memory of one prefill + decode
pass above the level before it: on CPU the process RSS (sampled every 1 ms by a thread), on a GPU
torch.cuda.max_memory_allocated.

KV hit rate (SPEC §2): a stream of real prompts of the suite through the chat template, sharing a system prompt
and a few-shot block (≥ 64 tokens) and differing after it. D = the shared prefix (the longest common token prefix
of the stream), aligned down to a multiple of chunk_size for systems whose prompt is chunked (prefix_scope chunk):
what a prefix cache could offer. For each later request, the hits are its leading prompt tokens whose K/V, cached
by the first request, equal a recomputation (max |Δ| ≤ 1e-5 in every layer), capped at D and aligned down like D.
Rate = Σ hits / Σ D. The base model scores 1 by construction (checked, not assumed).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from transformers import DynamicCache

from bem import attach_bem
from bem.evaluate import cache_name
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
    status: str = "base"  # base | trained (a finished unit's adapter) | untrained (fresh modules, ΔW = 0)
    seed: int | None = None  # the profiled unit's seed when trained
    kv_denominator: int = 0  # Σ D over the stream's later requests (tokens a prefix cache could offer)
    rounds: int = 0  # interleaved rounds timed (fewer than asked when a time budget cut them)


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
    stream: "KVStream | None"
    prefill: list
    decode: list
    status: str = "base"
    seed: int | None = None


def _subject(model, name: str, config_hash: str, batch: int, prompt_len: int, side_dim: int, vocab: int,
             stream: "KVStream | None" = None, status: str = "base", seed: int | None = None) -> _Subject:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (batch, prompt_len), generator=gen).to(device)
    return _Subject(name, config_hash, model, ids, _bem_kwargs(model, batch, prompt_len, side_dim, device), stream,
                    [], [], status, seed)


@torch.no_grad()
def _one_pass(subject: _Subject, decode_steps: int) -> tuple[float, list[float]]:
    """One prefill of the prompt, then `decode_steps` greedy decode steps on its KV cache; seconds."""
    model, device = subject.model, subject.ids.device
    cache, cache_kw = DynamicCache(), cache_name(model)  # filled in place by every call; looked up outside the timers
    _sync(device)
    t0 = time.perf_counter()
    out = model(subject.ids, use_cache=True, **{cache_kw: cache}, **subject.kwargs)
    _sync(device)
    prefill = time.perf_counter() - t0
    steps, token = [], out.logits[:, -1:].argmax(-1)
    for _ in range(decode_steps):
        _sync(device)
        s0 = time.perf_counter()
        out = model(token, **{cache_kw: cache}, use_cache=True)
        _sync(device)
        steps.append(time.perf_counter() - s0)
        token = out.logits[:, -1:].argmax(-1)
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


MIN_ROUNDS = 3  # a time budget never cuts the interleaved rounds below this


def measure_interleaved(subjects: list[_Subject], decode_steps: int = 16, warmup: int = 2,
                        repeats: int = 10, deadline: float | None = None) -> list[Profile]:
    """Time every subject in rounds: each round runs one pass of every model, in an order rotated from round
    to round, so that slow drift of the machine (clock, thermal state, other load) falls on all models
    alike instead of on whichever was measured last. Peak memory and the KV hit rate are measured before the rounds.

    `deadline` (a `time.perf_counter()` value): no round starts that would not end before it, as far as the rounds so
    far tell; at least MIN_ROUNDS rounds run, at most `repeats` (each Profile's `rounds`)."""
    for subject in subjects:
        for _ in range(warmup):
            _one_pass(subject, decode_steps)
    extras = [(_peak_memory_mb(s, decode_steps),
               kv_hit_rate(s.model, s.stream) if s.stream is not None else (float("nan"), 0)) for s in subjects]
    start, rounds = time.perf_counter(), 0
    for r in range(repeats):
        shift = r % len(subjects)
        for subject in subjects[shift:] + subjects[:shift]:
            prefill, steps = _one_pass(subject, decode_steps)
            subject.prefill.append(prefill)
            subject.decode += steps
        rounds = r + 1
        per_round = (time.perf_counter() - start) / rounds
        if deadline is not None and rounds >= MIN_ROUNDS and time.perf_counter() + per_round > deadline:
            break
    ms = lambda xs, q: float(np.percentile(xs, q) * 1000)  # noqa: E731
    return [Profile(s.name, s.config_hash, ms(s.prefill, 50), ms(s.prefill, 95), ms(s.decode, 50), ms(s.decode, 95),
                    memory, hit, str(s.ids.device), s.status, s.seed, denominator, rounds)
            for s, (memory, (hit, denominator)) in zip(subjects, extras)]


def measure(model, name: str, config_hash: str, batch: int = 1, prompt_len: int = 128, decode_steps: int = 16,
            warmup: int = 2, repeats: int = 10, side_dim: int = 0, vocab: int = 1000,
            stream: "KVStream | None" = None) -> Profile:
    """One model alone (for comparisons use `profile`, which interleaves the models)."""
    subject = _subject(model, name, config_hash, batch, prompt_len, side_dim, vocab, stream)
    return measure_interleaved([subject], decode_steps, warmup, repeats)[0]


def _routed(model) -> bool:
    return getattr(model, "_bem_runtime", None) is not None and model._bem_runtime.controller is not None


def _bem_kwargs(model, batch: int, prompt_len: int, side_dim: int, device) -> dict:
    if not _routed(model):
        return {}
    kwargs = {"bem_prompt_len": prompt_len}
    if side_dim:
        kwargs["bem_side"] = torch.zeros(batch, side_dim, device=device)
    return kwargs


# --- KV hit rate (SPEC §2) -----------------------------------------------------------------------------------
SYSTEM_PROMPT = "You are a careful assistant. Use the evidence and the worked examples; answer briefly."
MIN_SHARED_BLOCK = 64  # tokens of the few-shot block every request of the stream shares


@dataclass
class KVStream:
    """Requests (token ids, one prompt each) that share a prefix, with their side inputs."""
    requests: list[list[int]]
    side: torch.Tensor | None = None  # (requests, side_dim) for routed systems that read side inputs
    chunk_size: int | None = None  # the system caches whole chunks of this many tokens (prefix_scope chunk)
    task: str = ""

    @property
    def shared(self) -> int:
        """Length of the longest common token prefix of all requests."""
        first, n = self.requests[0], min(len(r) for r in self.requests)
        for i in range(n):
            if any(r[i] != first[i] for r in self.requests[1:]):
                return i
        return n

    @property
    def denominator(self) -> int:
        """D: the shared prefix, aligned down to whole chunks for a chunked system."""
        shared = self.shared
        return shared - shared % self.chunk_size if self.chunk_size else shared


def kv_stream(tokenizer, task: str, requests: int = 4, shots: int = 3, layout: dict | None = None,
              chunk_size: int | None = None, root=None) -> KVStream:
    """Real prompts of `task` (test split) through the chat template, each after the same system prompt and
    few-shot block (`shots` solved training items of the task); side inputs from the items when `layout`."""
    from bem.tasks import SPECS, load_items, side_vectors, training_target

    spec = SPECS[task]
    examples = load_items(task, "train", shots, root)
    block = "Worked examples:\n\n" + "\n\n".join(
        f"Example {i + 1}.\n{spec.prompt(it)}\nAnswer: {training_target(task, it)}" for i, it in enumerate(examples))
    items = load_items(task, "test", requests, root)
    ids = []
    for item in items:
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": f"{block}\n\nNow answer this one.\n{spec.prompt(item)}"}]
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids.append(list(out["input_ids"] if isinstance(out, dict) else out))
    side = torch.tensor(side_vectors(task, items, layout, root), dtype=torch.float32) if layout else None
    stream = KVStream(ids, side, chunk_size, task)
    block_tokens = len(tokenizer(block, add_special_tokens=False)["input_ids"])
    if block_tokens < MIN_SHARED_BLOCK:
        raise ValueError(f"kv_stream({task!r}, shots={shots}): the few-shot block has {block_tokens} tokens; "
                         f"the KV hit rate needs at least {MIN_SHARED_BLOCK}: raise shots")
    return stream


def cache_scope(config) -> int | None:
    """The chunk size a prefix cache must align to for this BEM config, or None (prompt not chunked)."""
    return config.chunk_size if config.controller == "chunk" and config.prefix_scope == "chunk" else None


@torch.no_grad()
def kv_hit_rate(model, stream: KVStream, tolerance: float = 1e-5) -> tuple[float, int]:
    """(rate, Σ D) of SPEC §2 over `stream` (see the module docstring). Each request runs alone (no padding),
    with its real prompt length and side inputs when the model is routed."""
    device, cache_kw = next(model.parameters()).device, cache_name(model)
    caches = []
    for r, request in enumerate(stream.requests):
        ids = torch.tensor([request], device=device)
        kwargs = {}
        if _routed(model):
            kwargs["bem_prompt_len"] = len(request)
            if model._bem_runtime.config.side_dim:
                side = stream.side[r:r + 1] if stream.side is not None else torch.zeros(1, model._bem_runtime.config.side_dim)
                kwargs["bem_side"] = side.to(device)
        cache = DynamicCache()
        model(ids, use_cache=True, **{cache_kw: cache}, **kwargs)
        caches.append([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
    shared, denominator = stream.shared, stream.denominator
    hits = 0
    for cache in caches[1:]:
        same = torch.ones(shared, dtype=torch.bool, device=device)
        for (k0, v0), (k, v) in zip(caches[0], cache):
            diff = torch.maximum((k0[:, :, :shared] - k[:, :, :shared]).abs().amax((0, 1, 3)),
                                 (v0[:, :, :shared] - v[:, :, :shared]).abs().amax((0, 1, 3)))
            same &= diff <= tolerance
        run = int(same.long().cumprod(0).sum())  # a prefix cache serves a leading run only
        run = min(run, denominator)
        hits += run - run % stream.chunk_size if stream.chunk_size else run
    total = denominator * (len(caches) - 1)
    return (hits / total if total else float("nan")), total


# --- bem profile ---------------------------------------------------------------------------------------------
def _kv_task(config: ExperimentConfig) -> str:
    tasks = [t for t in config.tasks if t != "safety"]
    if not tasks:
        raise ValueError(f"{config.source or config.name}: the KV hit rate needs a task with training targets "
                         f"for its few-shot block; tasks are {config.tasks}")
    return tasks[0]


def profiled_model(config: ExperimentConfig, run_dir=None, data_root=None):
    """(model, status, seed): the smallest finished seed's trained modules when `run_dir` holds a finished unit of
    this config, else fresh modules labelled 'untrained'."""
    from pathlib import Path

    from bem.experiments.adapters import load_trained, unit_data
    from bem.experiments.results import read_only_copy

    if run_dir is not None and (Path(run_dir) / "results.sqlite").is_file():
        conn = read_only_copy(Path(run_dir) / "results.sqlite")
        try:
            seeds = [s for (s,) in conn.execute(
                "SELECT seed FROM units WHERE experiment=? AND config_hash=? AND data_fingerprint IS ? ORDER BY seed",
                (config.name, config.config_hash(), unit_data(config, data_root)))]
        finally:
            conn.close()
        if seeds:
            model, _ = load_trained(config, seeds[0], Path(run_dir), data_root)
            return model, "trained", seeds[0]
    model, _ = load_base(config.model)
    attach_bem(model, config.bem)
    return model, "untrained", None


def profile(configs: list[ExperimentConfig], device: str = "cpu", batch: int = 1, prompt_len: int = 128,
            decode_steps: int = 16, warmup: int = 2, repeats: int = 10, run_dir=None, data_root=None,
            max_seconds: float | None = None) -> list[Profile]:
    """The base model, then each experiment's trained modules (see `profiled_model`), all held in this process and
    timed in interleaved rounds (`measure_interleaved`). `max_seconds`: a budget for the whole call, loading
    included; the rounds stop early to keep it (at least MIN_ROUNDS)."""
    from bem.tasks import side_layout

    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    model_name = configs[0].model if configs else "smollm2-135m"
    model, tokenizer = load_base(model_name)
    vocab = len(tokenizer)
    task = _kv_task(configs[0]) if configs else "wordnet_qa"
    stream = kv_stream(tokenizer, task, root=data_root)
    subjects = [_subject(model.to(device), "base", "", batch, prompt_len, 0, vocab, stream)]
    for config in configs:
        model, status, seed = profiled_model(config, run_dir, data_root)
        routed = config.bem.controller != "static"
        layout = side_layout(config.tasks, config.side_inputs == "zeroed") if config.side_inputs and routed else None
        stream = kv_stream(tokenizer, task, layout=layout, chunk_size=cache_scope(config.bem), root=data_root)
        subjects.append(_subject(model.to(device), config.name, config.config_hash(), batch, prompt_len,
                                 config.bem.side_dim, vocab, stream, status, seed))
    return measure_interleaved(subjects, decode_steps, warmup, repeats, deadline)
