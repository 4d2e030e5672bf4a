"""Greedy decoding on a static KV cache with one decode step that can be compiled (issue 14, item 2).

`bem.evaluate.greedy` (decoding `dynamic`) grows a DynamicCache and drops finished rows from the batch; every
decode step runs the model's Python and, with BEM, the routing's host-side bookkeeping. Here (decoding `static`
and `compiled`) the cache is a transformers StaticCache of a fixed length, the batch keeps its rows (a finished row
computes on, its tokens are not kept), and a decode step is a function of fixed-shape tensors only: the token, its
position, the whole-cache attention mask and BEM's routing state (`BEMRuntime.begin_step`). So it can run under
`torch.compile` (inductor on the CPU; `mode="reduce-overhead"`, i.e. CUDA graphs, on a GPU): one compilation per
(batch, cache length), which `bem.evaluate.generate` keeps to one per task by padding every batch to the same
rows and length.

The prompt (prefill) runs eagerly through the model's forward as before and starts BEM's routing stream; the steps
continue it with `BEMRuntime._read_step`, which computes the codes `read` computes (tested: the same tokens as
`greedy`, logits within 1e-4). Routers (AR0/AR1, whose decisions run per chunk on the host) are refused.
"""
from __future__ import annotations

import os

import torch

MODES = ("dynamic", "static", "compiled")
ENV = "BEM_AUTO_DECODING"  # what `auto` means, when set (scripts/gpu_session.sh falls back to static with it)


def _forward(model):
    """The forward a step calls: past BEM's wrapper (whose per-call bookkeeping the step replaces) when BEM is attached."""
    return type(model).forward.__get__(model) if getattr(model, "_bem_runtime", None) is not None else model.forward


class StaticDecoder:
    """Greedy (or `pick`ed) continuation of left-padded batches on a static KV cache.

    One decoder per model (`decoder_for`): its compiled step is reused by every batch of the same shape.
    """

    def __init__(self, model, compile: bool = False):
        from bem.evaluate import cache_name, forward_parameters

        self.model, self.runtime = model, getattr(model, "_bem_runtime", None)
        self.cache_kw = cache_name(model)
        if "position_ids" not in forward_parameters(model):
            raise NotImplementedError(f"{type(model).__name__}'s forward takes no position_ids; static decoding "
                                      "needs them (left-padded rows); use decoding: dynamic")
        self.compiled = compile
        self._cache = None  # ((rows, length, dtype, device), StaticCache): reused by batches of that shape
        step = self._step
        if compile:
            cuda = next(model.parameters()).is_cuda
            step = torch.compile(step, dynamic=False, mode="reduce-overhead" if cuda else None)
        self.step = step

    def _step(self, token, positions, mask, cache, state, bem_mask):
        """Logits (B, V) of one token per row, and the routing state after it."""
        runtime = self.runtime
        if runtime is not None:
            runtime.begin_step(token.shape[0], token.device, state, bem_mask)
        try:
            out = _forward(self.model)(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                                       logits_to_keep=1, **{self.cache_kw: cache})
        finally:
            state = runtime.end_step() if runtime is not None else None
        return out.logits[:, -1], state

    def _cache_for(self, rows: int, length: int, device: torch.device):
        """An empty StaticCache for (rows, length): the last one made, reset, when its shape, dtype and device fit. The
        same tensors every batch, so CUDA graphs recorded on them are replayed, not recorded again."""
        from transformers import StaticCache

        key = (rows, length, self.model.get_input_embeddings().weight.dtype, device)
        if self._cache is not None and self._cache[0] == key:
            self._cache[1].reset()
        else:
            self._cache = key, StaticCache(config=self.model.config, max_cache_len=length)
        return self._cache[1]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int | list[int], eos: list[int],
                 pick=None, rows: int | None = None, length: int | None = None, **kwargs) -> list[list[int]]:
        """Each row's new tokens, up to and including its first end token, at most `max_new_tokens` (one limit or one
        per row): what `bem.evaluate.greedy` returns. `rows` and `length` pad the batch (copies of its last row) and
        the cache to a fixed shape, so batches of one task share one compiled step. `kwargs`: bem_prompt_len,
        bem_side, bem_mask (one row per sequence)."""
        model, runtime = self.model, self.runtime
        batch, width = ids.shape
        limits = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
        steps = max(limits)
        rows, length = max(rows or batch, batch), max(length or width + steps, width + steps)
        if rows > batch:  # copies of the last row: real tokens (an all-pad row can make attention NaN), output unused
            extra = rows - batch
            ids, mask = (torch.cat([t, t[-1:].expand(extra, -1)]) for t in (ids, mask))
            kwargs = {k: torch.cat([v, v[-1:].expand(extra, *v.shape[1:])]) if torch.is_tensor(v) and v.dim() else v
                      for k, v in kwargs.items()}
        cache = self._cache_for(rows, length, ids.device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{self.cache_kw: cache}, **kwargs).logits[:, -1]
        state = runtime.step_state(cache) if runtime is not None else None
        start = None if state is None else state[-1].clone()  # switches so far
        if runtime is not None and state is not None:
            runtime.switches -= int(start[batch:].sum())  # the padding rows' switches in the prompt do not count
        full = torch.cat([mask, mask.new_ones(rows, length - width)], 1)  # every later position is a real token
        position = positions[:, -1:] + 1
        new: list[list[int]] = [[] for _ in range(batch)]
        going = [True] * batch
        stop = set(eos)
        bem_mask = kwargs.get("bem_mask")
        for step in range(steps):
            token = logits.argmax(-1) if pick is None else pick(logits)
            for row, t in enumerate(token[:batch].tolist()):
                if going[row]:
                    new[row].append(t)
                    going[row] = t not in stop and len(new[row]) < limits[row]
            if not any(going) or step == steps - 1:
                break
            if self.compiled and token.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last replay's outputs are copied out
            logits, state = self.step(token.unsqueeze(1), position + step, full, cache, state, bem_mask)
            if self.compiled:  # CUDA graphs reuse their output memory at the next replay: keep copies
                logits, state = logits.clone(), None if state is None else tuple(t.clone() for t in state)
        if runtime is not None and state is not None:
            runtime.switches += int((state[-1][:batch] - start[:batch]).sum())
            runtime.streams.pop(cache, None)  # its state stopped at the prompt: the cache is not for eager calls
        return new


def resolve_decoding(model, mode: str) -> str:
    """`auto` → `compiled` on a GPU, `dynamic` on the CPU (where a decode step is compute-bound: docs/perf.md), or what
    the environment variable BEM_AUTO_DECODING says; a router is always decoded `dynamic`, and asking for another mode
    for it is an error."""
    if mode not in MODES + ("auto",):
        raise ValueError(f"decoding {mode!r} is not a decoding mode; allowed: {list(MODES + ('auto',))}")
    runtime = getattr(model, "_bem_runtime", None)
    router = runtime is not None and runtime.enabled and hasattr(runtime.controller, "decide")
    if mode == "auto":
        fixed = os.environ.get(ENV)
        if fixed is not None and fixed not in MODES:
            from bem.errors import BEMError

            raise BEMError(f"{ENV}={fixed!r} is not allowed; expected one of {list(MODES)} (or unset: by device)")
        if router:
            return "dynamic"
        return fixed or ("compiled" if next(model.parameters()).is_cuda else "dynamic")
    if router and mode != "dynamic":
        raise ValueError(f"decoding {mode!r} cannot decode a router (its decisions run per chunk on the host); "
                         "allowed: dynamic or auto")
    return mode


def decoder_for(model, mode: str) -> StaticDecoder:
    """The model's decoder for `mode` ('static' or 'compiled'), made once and kept on the model."""
    if mode not in MODES[1:]:
        raise ValueError(f"decoding {mode!r} has no static decoder; allowed: {list(MODES[1:])}")
    key = f"_bem_decoder_{mode}"
    decoder = model.__dict__.get(key)
    if decoder is None:
        decoder = StaticDecoder(model, compile=mode == "compiled")
        model.__dict__[key] = decoder
    return decoder
