"""The causal routing of codes to tokens: prefix code, chunk codes, hysteresis, KV-cache state.

Each token gets a *segment*: -1 for prompt tokens when the prompt code is in use, else its chunk
index k. The code of segment k ≥ 1 is computed from the mean read-layer state of segment k-1's
tokens, so it depends only on earlier tokens; segment -1's code depends on the whole prompt,
which is known before any prompt token is processed. The same routine runs for a full
teacher-forced forward and for each cached generation step: it carries the current code, the
open chunk's running sum and the count of real tokens seen, so both give the same codes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bem.config import BEMConfig
from bem.controller import Controller


@dataclass
class CallInputs:
    """What the model's forward was called with, as far as routing cares."""

    valid: torch.Tensor  # (B, T) bool: real (non-pad) tokens of this call
    fresh: bool  # no cached tokens before this call: a new stream starts
    prompt_len: torch.Tensor | None  # (B,) real-token prompt lengths, or None
    side: torch.Tensor | None  # (B, side_dim) side inputs, or None
    mask: torch.Tensor | None  # (B, r) mask m on the basis directions, or None


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


class BEMRuntime:
    """Per-model routing: takes the call's inputs, reads the read-layer states, serves codes to sites."""

    def __init__(self, config: BEMConfig, controller: Controller | None):
        self.config = config
        self.controller = controller
        self.enabled = True
        self.state: StreamState | None = None
        self.switches = 0  # chunk-code replacements accepted so far (for tests and profiling)
        self._call: CallInputs | None = None
        self._codes: torch.Tensor | None = None  # (B, J, W)
        self._segment: torch.Tensor | None = None  # (B, T) index into J

    # --- call bookkeeping -------------------------------------------------------------------
    def begin_call(self, batch: int, seq: int, device: torch.device, attention_mask, past_len: int,
                   prompt_len, side, mask=None) -> None:
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -seq:].to(device=device).bool()
        else:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
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
        self._call = CallInputs(valid=valid, fresh=past_len == 0, prompt_len=prompt_len, side=side, mask=mask)

    @property
    def mask(self) -> torch.Tensor | None:
        """The call's per-example mask m (B, r), if one was given."""
        return None if self._call is None else self._call.mask

    def end_call(self) -> None:
        self._call = self._codes = self._segment = None

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
        """Per-segment values (B, J, w) → per-token values (B, T, w)."""
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

    # --- routing ------------------------------------------------------------------------------
    def read(self, hidden: torch.Tensor) -> None:
        """Hook on the read layer: compute every token's code from hidden states (B, T, d)."""
        if not self.enabled or self._call is None or self.controller is None:
            return
        call, ctrl = self._call, self.controller
        hidden = hidden.to(ctrl.inp.weight.dtype)
        batch, seq, d = hidden.shape
        if call.valid.shape != (batch, seq):
            raise RuntimeError(f"BEM read-layer states have shape {(batch, seq)} but the call's tokens "
                               f"are {tuple(call.valid.shape)}")
        if call.fresh:
            self.state = self._new_state(call, hidden)
        st = self.state
        if st is None or st.code.shape[0] != batch:
            raise RuntimeError("BEM got a cached continuation without routing state for this batch; "
                               "process the prompt with BEM enabled first")
        valid = call.valid
        pos = st.seen.unsqueeze(1) + valid.long().cumsum(1) - 1
        segment = torch.where(valid, self._segment_of(pos, st), st.chunk.unsqueeze(1))
        rel = (segment - st.chunk.unsqueeze(1)).clamp_min(0)
        n_seg = int(rel.max()) + 1

        masked = hidden * valid.unsqueeze(-1)
        sums = hidden.new_zeros(batch, n_seg, d).scatter_add(1, rel.unsqueeze(-1).expand(-1, -1, d), masked)
        counts = torch.zeros(batch, n_seg, dtype=torch.long, device=hidden.device).scatter_add(1, rel, valid.long())
        sums = sums + torch.nn.functional.pad(st.window_sum.unsqueeze(1), (0, 0, 0, n_seg - 1))
        counts = counts + torch.nn.functional.pad(st.window_count.unsqueeze(1), (0, n_seg - 1))

        current = st.code
        if st.use_prompt and not st.prompt_done:
            if not torch.equal(counts[:, 0], st.prompt_len):
                raise ValueError(f"the whole prompt must be in the first forward call: bem_prompt_len="
                                 f"{st.prompt_len.tolist()} but the call holds {counts[:, 0].tolist()} prompt tokens")
            current = ctrl(ctrl.summarize(sums[:, 0], counts[:, 0]), st.side, st.gate_bias)
        last = torch.where(valid, rel, 0).amax(1)  # each sequence's last segment in this call
        codes, switched = [current], []
        if n_seg > 1:
            bias = None if st.gate_bias is None else st.gate_bias.unsqueeze(1)
            candidates = ctrl(ctrl.summarize(sums[:, :-1], counts[:, :-1]),
                              st.side.unsqueeze(1).expand(-1, n_seg - 1, -1), bias)
            for j in range(1, n_seg):
                change = (candidates[:, j - 1] - current).pow(2).mean(-1).sqrt()
                switch = change > self.config.hysteresis_tau
                switch = switch & (st.chunk + j - 1 >= 0)  # the first chunk after the prompt keeps the prompt code
                current = torch.where(switch[:, None], candidates[:, j - 1], current)
                codes.append(current)
                switched.append((switch & (last >= j)).sum())
            self.switches += int(torch.stack(switched).sum())  # one host sync per call, not per chunk
        self._codes = torch.stack(codes, 1)
        self._segment = rel

        at = torch.arange(batch, device=hidden.device)
        st.code = self._codes[at, last].detach()
        st.window_sum, st.window_count = sums[at, last].detach(), counts[at, last]
        st.chunk = st.chunk + last
        st.seen = st.seen + valid.long().sum(1)
        st.prompt_done = True

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
            seen=zeros.clone(), prompt_done=not use_prompt,
        )
