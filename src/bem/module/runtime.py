"""The causal routing of codes to tokens: prefix code, chunk codes, hysteresis, per-stream KV-cache state.

Each token gets a *segment*: -1 for prompt tokens when the prompt code is in use, else its chunk
index k. The code of segment k ≥ 1 is computed from the mean read-layer state of segment k-1's
tokens, so it depends only on earlier tokens; segment -1's code depends on the whole prompt,
which is known before any prompt token is processed. The same routine runs for a full
teacher-forced forward and for each cached generation step: it carries the current code, the
open chunk's running sum and the count of real tokens seen, so both give the same codes.

The carried state belongs to a *stream*, keyed by its KV-cache object: interleaved streams on one
model do not share it, and a cache cropped back into its last call (assisted and prompt-lookup
decoding) takes its routing state back with it.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from bem.module.config import BEMConfig
from bem.module.controller import Controller

# the StreamState fields one call changes; an Undo keeps their values from before the call
CARRIED = ("chunk", "code", "window_sum", "window_count", "seen", "prompt_done", "switches")
# the StreamState fields a compiled decode step carries as tensors (BEMRuntime.begin_step / end_step)
STEP_FIELDS = ("code", "chunk", "window_sum", "window_count", "seen", "switches")
ROLLBACK_CALLS = 64  # a cache may be cropped back into any of its stream's last this many calls


@dataclass
class CallInputs:
    """What the model's forward was called with, as far as routing cares."""

    valid: torch.Tensor  # (B, T) bool: real (non-pad) tokens of this call
    fresh: bool  # no cached tokens before this call: a new stream starts
    prompt_len: torch.Tensor | None  # (B,) real-token prompt lengths, or None
    side: torch.Tensor | None  # (B, side_dim) side inputs, or None
    mask: torch.Tensor | None  # (B, r) mask m on the basis directions, or None
    cache: object | None = None  # the KV cache handed to the call: the key of its stream's state
    past: int = 0  # cache positions (pads included) before this call
    state: StreamState | None = None  # the continued stream's state (cached calls)


@dataclass
class Undo:
    """A stream's last call, kept so that its state can follow the cache when it is cropped into that call."""

    start: int  # stream length (cache positions) before the call
    before: dict  # the CARRIED fields before the call
    codes: torch.Tensor  # (B, J, W) routing vector of each segment of the call
    rel: torch.Tensor  # (B, T) segment of each token, relative to `before["chunk"]`
    valid: torch.Tensor  # (B, T)
    masked: torch.Tensor  # (B, T, d) read states, zero at pads
    switched: torch.Tensor  # (B, J) bool: a chunk-code switch was accepted at segment j


@dataclass
class StreamState:
    """Routing state of a batch of sequences, carried across cached calls (detached)."""

    use_prompt: bool  # prompt tokens share the code read from the whole prompt
    prompt_len: torch.Tensor  # (B,)
    side: torch.Tensor  # (B, side_dim)
    gate_bias: torch.Tensor | None  # (B, gates) V2's evidence term of the gate logits, computed once
    chunk: torch.Tensor  # (B,) segment index of the current code (-1 = prompt)
    code: torch.Tensor  # (B, W) current routing vector (codes, gates, FiLM; see controller.Heads)
    window_sum: torch.Tensor  # (B, d) sum of read states over the current segment's tokens
    window_count: torch.Tensor  # (B,)
    seen: torch.Tensor  # (B,) real tokens processed so far
    prompt_done: bool  # the prompt code has been computed
    switches: torch.Tensor  # (B,) chunk-code switches accepted so far (BEMConfig.max_switches caps them)
    length: int = 0  # cache positions (pads included) processed: the cache's length at the next call
    history: list[Undo] = field(default_factory=list, repr=False)  # the last calls, oldest first
    prompt_reads: torch.Tensor | None = field(default=None, repr=False)  # (B, P, d) read states of the prompt
    prompt_positions: int = 0  # cache positions of the first call, which holds the whole prompt


def cache_length(cache) -> int:
    """Positions (pads included) a KV cache holds; 0 without a cache."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise TypeError(f"BEM keys routing state to the KV cache object and needs a transformers Cache; got "
                        f"{type(cache).__name__} (wrap legacy tuples with transformers.DynamicCache)")
    return int(cache.get_seq_length())


def real_tokens(attention_mask, batch: int, seq: int, past: int, device: torch.device) -> torch.Tensor:
    """(B, T) bool: the call's real (non-pad) tokens.

    A 2-D mask (B, past + T) marks them directly. A 4-D mask (B|1, H|1, T, K ≥ past + T), which generate
    builds for a static cache, marks which key positions each query may attend to: token t is real iff it
    may attend to its own position past + t, since padding masks a pad's key column, its own included.
    Bool masks keep True; float masks are additive (0 = attend, very negative = masked).
    """
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if isinstance(attention_mask, dict):  # one mask per attention type; all of them mask pads alike
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if not torch.is_tensor(attention_mask):
        raise TypeError(f"BEM reads real tokens from a 2-D or 4-D attention_mask tensor; got "
                        f"{type(attention_mask).__name__} (flex-attention BlockMasks are not supported)")
    if attention_mask.dim() == 2 and attention_mask.shape[1] >= seq:
        return attention_mask[:, -seq:].to(device=device).bool()
    if attention_mask.dim() == 4 and attention_mask.shape[-2] == seq and attention_mask.shape[-1] >= past + seq:
        t = torch.arange(seq, device=attention_mask.device)
        own = attention_mask[:, 0, t, past + t]  # (B|1, T)
        if own.is_floating_point():
            own = own > torch.finfo(own.dtype).min / 2
        return own.bool().expand(batch, seq).to(device)
    raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not tell BEM which of the call's "
                     f"{seq} tokens after {past} cached positions are real; allowed: 2-D (batch, >= {seq}) or 4-D "
                     f"(batch, heads, {seq}, >= {past + seq})")


def _segment_sums(masked: torch.Tensor, rel: torch.Tensor, valid: torch.Tensor, n_seg: int,
                  window_sum: torch.Tensor, window_count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of read states per segment (B, J, d), (B, J); segment 0 adds the carried open window."""
    batch, _, d = masked.shape
    sums = masked.new_zeros(batch, n_seg, d).scatter_add(1, rel.unsqueeze(-1).expand(-1, -1, d), masked)
    counts = torch.zeros(batch, n_seg, dtype=torch.long, device=masked.device).scatter_add(1, rel, valid.long())
    sums = sums + torch.nn.functional.pad(window_sum.unsqueeze(1), (0, 0, 0, n_seg - 1))
    return sums, counts + torch.nn.functional.pad(window_count.unsqueeze(1), (0, n_seg - 1))


class BEMRuntime:
    """Per-model routing: takes the call's inputs, reads the read-layer states, serves codes to sites.

    Routing state lives per stream in `streams` (KV-cache object → StreamState, weakly keyed, so a state
    goes away with its cache). `state` is the latest call's state, kept for inspection only.
    """

    def __init__(self, config: BEMConfig, controller: Controller | None):
        self.config = config
        self.controller = controller
        self.enabled = True
        self.streams: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.state: StreamState | None = None
        self.switches = 0  # chunk-code replacements accepted so far (for tests and profiling)
        self._call: CallInputs | None = None
        self._codes: torch.Tensor | None = None  # (B, J, W)
        self._segment: torch.Tensor | None = None  # (B, T) index into J
        self._step_in = self._step_out = None  # a decode step's routing state (begin_step / end_step)
        self._step_constants: StreamState | None = None  # the stream a decode step continues (step_state)

    # --- call bookkeeping -------------------------------------------------------------------
    def begin_call(self, batch: int, seq: int, device: torch.device, attention_mask, cache,
                   prompt_len, side, mask=None) -> None:
        past = cache_length(cache)
        valid = real_tokens(attention_mask, batch, seq, past, device)
        if prompt_len is not None:
            prompt_len = torch.as_tensor(prompt_len, device=device).long().reshape(-1).expand(batch).clone()
            if (prompt_len < 0).any():
                raise ValueError(f"bem_prompt_len must be >= 0, got {prompt_len.tolist()}")
        if side is not None:
            d = self.config.side_dim
            if d == 0:
                raise ValueError("bem_side was given but BEMConfig.side_dim is 0; set side_dim to its width")
            if side.dim() != 2 or side.shape != (batch, d):
                raise ValueError(f"bem_side must have shape (batch, side_dim) = ({batch}, {d}), "
                                 f"got {tuple(side.shape)}")
        if mask is not None and (mask.dim() != 2 or mask.shape != (batch, self.config.rank)):
            raise ValueError(f"bem_mask must have shape (batch, rank) = ({batch}, {self.config.rank}), "
                             f"got {tuple(mask.shape)}")
        call = CallInputs(valid=valid, fresh=past == 0, prompt_len=prompt_len, side=side, mask=mask,
                          cache=cache, past=past)
        if not call.fresh and self.controller is not None:
            call.state = self._continued(cache, past)
        self._call = call

    @property
    def mask(self) -> torch.Tensor | None:
        """The call's per-example mask m (B, r), if one was given."""
        return None if self._call is None else self._call.mask

    def end_call(self, returned_cache=None) -> None:
        """Close the call. A stream started without a cache handed in is keyed to the cache the model returned."""
        call = self._call
        if returned_cache is not None and call is not None and call.state is not None:
            self.streams[returned_cache] = call.state
        self._call = self._codes = self._segment = None

    def _continued(self, cache, past: int) -> StreamState:
        """The routing state of the stream `cache` holds, rolled back if the cache was cropped into its last call."""
        state = self.streams.get(cache)
        if state is None:
            raise RuntimeError(f"no BEM routing state for this cache: it holds {past} positions, but no call with BEM "
                               "enabled started a stream on it (a stream starts with a call on an empty cache, and "
                               "routing state is kept per cache object, not per model)")
        if past > state.length:
            raise RuntimeError(f"the KV cache holds {past} positions but BEM's routing state for it has processed "
                               f"{state.length}: the cache grew without BEM routing (a call with BEM disabled?)")
        if past < state.length:
            self._roll_back(state, past)
        return state

    def select_rows(self, cache, index: torch.Tensor) -> None:
        """Keep only the rows `index` of the stream `cache` holds (after `cache.batch_select_indices(index)`), so
        finished sequences can leave a batch between cached calls; the remaining rows' routing is unchanged."""
        state = self.streams.get(cache)
        if state is None:
            return  # no routed stream on this cache (static BEM or BEM disabled): nothing to select
        for name in ("prompt_len", "side", "gate_bias", "chunk", "code", "window_sum", "window_count", "seen",
                     "switches", "prompt_reads"):
            value = getattr(state, name)
            if value is not None:
                setattr(state, name, value[index])
        for undo in state.history:
            undo.before = {k: v[index] if torch.is_tensor(v) else v for k, v in undo.before.items()}
            undo.codes, undo.rel, undo.valid = undo.codes[index], undo.rel[index], undo.valid[index]
            undo.masked, undo.switched = undo.masked[index], undo.switched[index]

    def _roll_back(self, st: StreamState, length: int) -> None:
        """Follow a crop of the cache to `length` positions back into one of the stream's last ROLLBACK_CALLS calls.

        Assisted and prompt-lookup decoding crop the rejected draft tokens; generate re-feeds the last
        cached token. Inside the prompt the prompt code stays (it was read from the whole prompt), so
        tokens re-fed there must be the prompt's own (checked in `read`).
        """
        starts = [undo.start for undo in st.history]
        if not starts or length < starts[0]:
            reach = starts[0] if starts else st.length
            raise RuntimeError(f"the KV cache was cropped to {length} positions from {st.length}; BEM can roll its "
                               f"routing state back only into its last {ROLLBACK_CALLS} calls (to >= {reach} positions)")
        while st.history[-1].start > length:
            self.switches -= int(st.history.pop().switched.sum())
        undo = st.history[-1]
        last = self._advance(st, undo, length - undo.start)
        dropped = undo.switched & (torch.arange(undo.switched.shape[1], device=last.device) > last.unsqueeze(1))
        self.switches -= int(dropped.sum())
        undo.switched = undo.switched & ~dropped

    @staticmethod
    def _advance(st: StreamState, undo: Undo, kept: int) -> torch.Tensor:
        """Set `st` to the state after the first `kept` tokens of `undo`'s call; returns each row's last segment."""
        before, rel, valid = undo.before, undo.rel[:, :kept], undo.valid[:, :kept]
        sums, counts = _segment_sums(undo.masked[:, :kept], rel, valid, undo.codes.shape[1],
                                     before["window_sum"], before["window_count"])
        last = torch.where(valid, rel, 0).amax(1) if kept else torch.zeros_like(before["seen"])
        at = torch.arange(len(last), device=last.device)
        st.code, st.window_sum, st.window_count = undo.codes[at, last], sums[at, last], counts[at, last]
        st.chunk, st.seen = before["chunk"] + last, before["seen"] + valid.long().sum(1)
        reached = torch.arange(undo.switched.shape[1], device=last.device) <= last.unsqueeze(1)
        st.switches = before["switches"] + (undo.switched & reached).sum(1)
        st.prompt_done = before["prompt_done"] or kept > 0
        st.length = undo.start + kept
        return last

    def token_values(self, kind: str, index: int, x: torch.Tensor) -> torch.Tensor:
        """The `kind` output ('code', 'gate' or 'film') number `index` per segment (B, J, width),
        for a site or block whose input `x` is (B, T, …)."""
        if self._codes is None:
            raise RuntimeError("a routed BEM site ran before the controller read its layer; call the model "
                               "through its forward (model(...) or model.generate) so BEM can route tokens")
        if x.dim() != 3 or self._segment.shape != x.shape[:2]:
            raise RuntimeError(f"BEM site got input of shape {tuple(x.shape)} but the controller "
                               f"routed tokens of shape {tuple(self._segment.shape)}")
        offset, width = self.controller.heads.spans[kind][index]
        return self._codes[:, :, offset:offset + width]

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-segment values (B, J, w) → per-token values (B, T, w); with one segment (every decode step) the values
        themselves, (B, 1, w), which broadcast over the tokens as the gather would have copied them."""
        if values.shape[1] == 1:
            return values
        return torch.gather(values, 1, self._segment.unsqueeze(-1).expand(-1, -1, values.shape[-1]))

    def film(self, index: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """PT4: a block's output h + γ ⊙ (block(h) − h) + β, γ and β per channel group and chunk."""
        if not self.enabled or self._codes is None:
            return after
        gamma, beta = self.gather(self.token_values("film", index, after)).unflatten(-1, (2, -1)).unbind(-2)
        groups = gamma.shape[-1]

        def spread(v):  # (B, T, G) → (B, T, d): each group covers d/G consecutive channels
            return v.to(after.dtype).repeat_interleave(after.shape[-1] // groups, dim=-1)

        return before + spread(gamma) * (after - before) + spread(beta)

    # --- one decode step as tensors only (bem.decoding: static cache, torch.compile, CUDA graphs) -----------
    def step_state(self, cache) -> tuple[torch.Tensor, ...] | None:
        """The routing state of the stream `cache` holds, as the STEP_FIELDS tensors a `decode_step` carries; None
        when nothing is routed (static BEM, no controller). The stream's constants go to `self._step_constants`."""
        if self.controller is None or not self.enabled:
            return None
        if hasattr(self.controller, "decide"):
            raise NotImplementedError("a router's decisions depend on the action in force and run one chunk at a "
                                      "time on the host; decode it with bem.evaluate.greedy (decoding: dynamic)")
        st = self._continued(cache, cache_length(cache))
        self._step_constants = st
        return tuple(getattr(st, f) for f in STEP_FIELDS)

    def begin_step(self, batch: int, device: torch.device, state: tuple[torch.Tensor, ...] | None,
                   mask: torch.Tensor | None = None) -> None:
        """Open a one-token call whose routing is `state` (from `step_state` or the previous step): no host sync,
        no Python state that changes from step to step, so the step can be compiled and replayed."""
        self._call = CallInputs(valid=torch.ones(batch, 1, dtype=torch.bool, device=device), fresh=False,
                                prompt_len=None, side=None, mask=mask)
        self._step_in, self._step_out = state, None

    def end_step(self) -> tuple[torch.Tensor, ...] | None:
        """Close the step; the routing state after its token (None when nothing is routed)."""
        out = self._step_out
        self._call = self._codes = self._segment = self._step_in = self._step_out = None
        return out

    def _read_step(self, hidden: torch.Tensor) -> None:
        """`read` for one real token per row on a continued stream, as fixed tensor code: every row's candidate code is
        computed and kept only where its chunk closes and the switch is accepted; the same codes as `read`."""
        ctrl, const = self.controller, self._step_constants
        code, chunk, window_sum, window_count, seen, switches = self._step_in
        h = hidden[:, 0].to(ctrl.inp.weight.dtype)
        rel = (self._segment_of(seen.unsqueeze(1), const)[:, 0] - chunk).clamp_min(0)  # 0, or 1: a new chunk opens
        opens = rel > 0
        candidate = ctrl(ctrl.summarize(window_sum, window_count), const.side, const.gate_bias)
        switch = self._switch(candidate, code, opens & (chunk >= 0), switches)  # chunk 0 keeps the prompt code
        code = torch.where(switch[:, None], candidate, code)
        window_sum = torch.where(opens[:, None], h, window_sum + h)
        window_count = torch.where(opens, 1, window_count + 1)
        self._codes, self._segment = code.unsqueeze(1), torch.zeros_like(seen).unsqueeze(1)
        self._step_out = (code, chunk + rel, window_sum, window_count, seen + 1, switches + switch.long())

    # --- routing ------------------------------------------------------------------------------
    def read(self, hidden: torch.Tensor) -> None:
        """Hook on the read layer: compute every token's code from hidden states (B, T, d)."""
        if not self.enabled or self._call is None or self.controller is None:
            return
        if self._step_in is not None:
            return self._read_step(hidden)
        call, ctrl = self._call, self.controller
        hidden = hidden.to(ctrl.inp.weight.dtype)
        batch, seq, d = hidden.shape
        if call.valid.shape != (batch, seq):
            raise RuntimeError(f"BEM read-layer states have shape {(batch, seq)} but the call's tokens "
                               f"are {tuple(call.valid.shape)}")
        if call.fresh:
            call.state = self._new_state(call, hidden)
            if call.cache is not None:
                self.streams[call.cache] = call.state
        st = call.state
        if st.code.shape[0] != batch:
            raise RuntimeError(f"BEM's routing state for this cache holds {st.code.shape[0]} sequences but the call "
                               f"has {batch}; a stream's batch cannot change between cached calls")
        valid = call.valid
        pos = st.seen.unsqueeze(1) + valid.long().cumsum(1) - 1
        segment = torch.where(valid, self._segment_of(pos, st), st.chunk.unsqueeze(1))
        rel = (segment - st.chunk.unsqueeze(1)).clamp_min(0)
        n_seg = int(rel.max()) + 1

        masked = hidden * valid.unsqueeze(-1)
        if st.use_prompt and (call.fresh or call.past < st.prompt_positions):  # host-side test: no sync per step
            self._check_prompt_reads(st, masked, valid & (pos < st.prompt_len.unsqueeze(1)), pos)
        sums, counts = _segment_sums(masked, rel, valid, n_seg, st.window_sum, st.window_count)
        current = st.code
        if st.use_prompt and not st.prompt_done:
            if not torch.equal(counts[:, 0], st.prompt_len):
                raise ValueError(f"the whole prompt must be in the first forward call: bem_prompt_len="
                                 f"{st.prompt_len.tolist()} but the call holds {counts[:, 0].tolist()} prompt tokens")
            current = ctrl(ctrl.summarize(sums[:, 0], counts[:, 0]), st.side, st.gate_bias)
        last = torch.where(valid, rel, 0).amax(1)  # each sequence's last segment in this call
        codes, switched = [current], [torch.zeros(batch, dtype=torch.bool, device=hidden.device)]
        if n_seg > 1:
            limit, count = self.config.max_switches, st.switches
            summaries = ctrl.summarize(sums[:, :-1], counts[:, :-1])
            sequential = hasattr(ctrl, "decide")  # a router: each decision depends on the action in force
            if not sequential:
                bias = None if st.gate_bias is None else st.gate_bias.unsqueeze(1)
                candidates = ctrl(summaries, st.side.unsqueeze(1).expand(-1, n_seg - 1, -1), bias)
            for j in range(1, n_seg):
                # the first chunk after the prompt keeps the prompt code; past the plan limit the code stays
                live = (st.chunk + j - 1 >= 0) & (last >= j)
                if sequential:
                    allowed = live if limit is None else live & (count < limit)
                    candidate, switch = ctrl.decide(summaries[:, j - 1], st.side, current, live, allowed)
                    switch = switch & allowed
                else:
                    candidate = candidates[:, j - 1]
                    switch = self._switch(candidate, current, live, count)
                current = torch.where(switch[:, None], candidate, current)
                count = count + switch.long()
                codes.append(current)
                switched.append(switch)
        self._codes, self._segment = torch.stack(codes, 1), rel
        switched = torch.stack(switched, 1)
        if n_seg > 1:
            self.switches += int(switched.sum())  # one host sync per call, not per chunk
        # the call's read states are kept for a while, so a crop into this call can restore the state
        undo = Undo(start=st.length, before={f: getattr(st, f) for f in CARRIED}, codes=self._codes.detach(),
                    rel=rel, valid=valid, masked=masked.detach(), switched=switched)
        st.history = st.history[-(ROLLBACK_CALLS - 1):] + [undo]
        self._advance(st, undo, seq)
        st.prompt_positions = st.prompt_positions or st.length
        self.state = st

    def _switch(self, candidate: torch.Tensor, current: torch.Tensor, live: torch.Tensor,
                switches: torch.Tensor) -> torch.Tensor:
        """(B,) bool: rows whose chunk code is replaced: a live boundary, under the plan limit (`max_switches`), and
        the candidate's RMS change over the whole routing vector above `hysteresis_tau`."""
        allowed = live if self.config.max_switches is None else live & (switches < self.config.max_switches)
        return allowed & ((candidate - current).pow(2).mean(-1).sqrt() > self.config.hysteresis_tau)

    @staticmethod
    def _check_prompt_reads(st: StreamState, masked: torch.Tensor, in_prompt: torch.Tensor, pos: torch.Tensor) -> None:
        """Keep the prompt's read states by real position; prompt tokens re-fed after a crop must match them."""
        if not in_prompt.any():
            return
        batch, _, d = masked.shape
        width = int(st.prompt_len.max())
        if st.prompt_reads is None:
            slot = torch.where(in_prompt, pos, width).unsqueeze(-1).expand(-1, -1, d)
            reads = masked.new_zeros(batch, width + 1, d).scatter(1, slot, masked.detach())
            st.prompt_reads = reads[:, :width]
            return
        slot = pos.clamp(0, width - 1).unsqueeze(-1).expand(-1, -1, d)
        expected = st.prompt_reads.gather(1, slot)[in_prompt]
        if not torch.allclose(masked[in_prompt], expected, rtol=1e-3, atol=1e-4):
            raise RuntimeError("tokens re-fed inside the prompt after the KV cache was cropped are not the prompt's "
                               "own; the prompt code was read from the whole prompt, so start a new stream instead")

    def _segment_of(self, pos: torch.Tensor, st: StreamState) -> torch.Tensor:
        n = self.config.chunk_size
        if not st.use_prompt:
            return pos.clamp_min(0) // n
        offset = st.prompt_len.unsqueeze(1)
        segment = torch.where(pos < offset, -1, (pos - offset).clamp_min(0) // n)
        return segment.clamp(max=0) if self.config.controller == "prefix" else segment

    def _new_state(self, call: CallInputs, hidden: torch.Tensor) -> StreamState:
        ctrl, cfg = self.controller, self.config
        batch, _, d = hidden.shape
        dev, dt = hidden.device, hidden.dtype
        side = call.side.to(device=dev, dtype=dt) if call.side is not None else hidden.new_zeros(batch, cfg.side_dim)
        use_prompt = cfg.prefix_scope == "prompt" and call.prompt_len is not None
        zeros = torch.zeros(batch, dtype=torch.long, device=dev)
        gate_bias = ctrl.gate_bias(side)  # V2: from the evidence only, once per sequence
        if use_prompt:
            chunk, code = zeros - 1, hidden.new_zeros(batch, ctrl.heads.width)
        else:  # chunk-causal from the first token: chunk 0's code sees only side inputs
            chunk, code = zeros, ctrl(ctrl.start.to(dt).expand(batch, d), side, gate_bias)
        return StreamState(
            use_prompt=use_prompt, prompt_len=call.prompt_len if use_prompt else zeros, side=side, gate_bias=gate_bias,
            chunk=chunk, code=code, window_sum=hidden.new_zeros(batch, d), window_count=zeros.clone(),
            seen=zeros.clone(), prompt_done=not use_prompt, switches=zeros.clone(),
        )
