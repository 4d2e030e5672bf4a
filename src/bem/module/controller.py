"""The controller network: pooled context (+ side inputs) → everything the sites and blocks are routed by.

One MLP trunk, h = gelu(W₁ [LN(summary); side]), feeds one linear head per kind of output:
- `code`: c = 2σ(W h) per routed site (its width: rank r, or the number of Kronecker terms);
- `score` (PT2/V1): scores of the directions; only the top k stay on (a k-hot mask m, straight-through);
- `gate` (PT1/V2): one gate 2σ((z + shaping) / T) per head group of each head-gated site;
- `film` (PT4/V4): γ = 1 + γ_max·tanh(z), β = β_max·tanh(z′) per channel group of each block.
The outputs are concatenated into one flat vector per summary, so the runtime's hysteresis, chunking
and KV-cache state treat them alike. Every head but `score` starts at zero: c ≡ 1, gates ≡ 1 and
FiLM ≡ identity at step 0, so a fresh BEM is exactly LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Heads:
    """What the controller emits: widths per index of each kind of output."""

    code: list[int]  # code width of each routed site
    gate_groups: int = 0  # head groups per head-gated site
    gate_sites: int = 0
    film_groups: int = 0  # channel groups per FiLM block
    film_blocks: int = 0
    dynamic_rank: int | None = None  # k of the top-k mask (of rank r)
    rank: int = 1
    gate_features: tuple[int, ...] = ()  # V2: side-vector indices that shape the gates
    film_gamma_max: float = 0.5
    film_beta_max: float = 0.5
    spans: dict[str, list[tuple[int, int]]] = field(init=False)

    def __post_init__(self) -> None:
        spans, offset = {"code": [], "gate": [], "film": []}, 0
        widths = {"code": self.code, "gate": [self.gate_groups] * self.gate_sites,
                  "film": [2 * self.film_groups] * self.film_blocks}
        for kind, ws in widths.items():
            for w in ws:
                spans[kind].append((offset, w))
                offset += w
        self.spans = spans

    @property
    def width(self) -> int:
        return sum(w for spans in self.spans.values() for _, w in spans)

    def keep(self, width: int) -> int:
        """Directions kept by the top-k mask at a site of this width."""
        return max(1, round(self.dynamic_rank * width / self.rank))


class Controller(nn.Module):
    """Summaries (…, d_model) and side inputs (…, side_dim) → the flat routing vector (…, heads.width)."""

    def __init__(self, d_model: int, side_dim: int, hidden: int, heads: Heads, side_projector: str | None = None):
        super().__init__()
        self.heads, self.side_dim = heads, side_dim
        self.norm = nn.LayerNorm(d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.project = None  # side inputs → `hidden` channels (LLaVA's linear / mlp2x_gelu projectors)
        if side_projector is not None and side_dim:
            layers = [nn.LayerNorm(side_dim), nn.Linear(side_dim, hidden)]
            if side_projector == "mlp2x_gelu":
                layers += [nn.GELU(), nn.Linear(hidden, hidden)]
            self.project = nn.Sequential(*layers)
        self.inp = nn.Linear(d_model + (hidden if self.project is not None else side_dim), hidden)
        self.out = nn.Linear(hidden, sum(heads.code))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if heads.dynamic_rank is not None:
            # random, so that different contexts keep different directions from the first step
            # (with equal scores every example would keep the same k and the rest would never train)
            self.score = nn.Linear(hidden, sum(heads.code))
            nn.init.normal_(self.score.weight, std=hidden**-0.5)
            nn.init.zeros_(self.score.bias)
        if heads.gate_sites:
            n = heads.gate_sites * heads.gate_groups
            self.gate = nn.Linear(hidden, n)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            if heads.gate_features:
                self.shaping = nn.Linear(len(heads.gate_features), n)
                nn.init.zeros_(self.shaping.weight)
                nn.init.zeros_(self.shaping.bias)
                self.log_temperature = nn.Parameter(torch.zeros(n))  # one temperature per head group
        if heads.film_blocks:
            self.film = nn.Linear(hidden, heads.film_blocks * 2 * heads.film_groups)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.register_buffer("code_order", self._width_order(), persistent=False)

    def _width_order(self) -> torch.Tensor:
        """Per distinct site width, the flat positions of those sites' codes (for the top-k mask)."""
        by_width: dict[int, list[int]] = {}
        position = 0
        for w in self.heads.code:
            by_width.setdefault(w, []).extend(range(position, position + w))
            position += w
        return torch.tensor([i for w in sorted(by_width) for i in by_width[w]], dtype=torch.long)

    @property
    def n_sites(self) -> int:
        return len(self.heads.code)

    def summarize(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Normalised mean of hidden states from their sum (…, d) and count (…); `start` if count is 0."""
        mean = total / count.clamp_min(1).unsqueeze(-1).to(total.dtype)
        return torch.where((count > 0).unsqueeze(-1), self.norm(mean), self.start.to(total.dtype))

    def gate_bias(self, side: torch.Tensor) -> torch.Tensor | None:
        """V2: the evidence term of the gate logits, from side inputs only (computed once per sequence)."""
        if not self.heads.gate_features:
            return None
        features = side[..., list(self.heads.gate_features)]
        return self.shaping(features.to(self.shaping.weight.dtype))

    def rank_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """k-hot mask per site from direction scores (…, Σ widths), straight-through to the scores.

        Forward: exactly k ones per site. Backward: the gradient of σ(scores): hard + (soft − soft.detach()),
        where the bracket is exactly 0 in the forward (hard + soft − soft.detach() would round to 1 − 2⁻²⁴).
        """
        mask = torch.empty_like(scores)
        position = 0
        for width in sorted(set(self.heads.code)):
            n = self.heads.code.count(width)
            idx = self.code_order[position:position + n * width]
            position += n * width
            s = scores[..., idx].unflatten(-1, (n, width))
            hard = torch.zeros_like(s).scatter_(-1, s.topk(self.heads.keep(width), dim=-1).indices, 1.0)
            soft = torch.sigmoid(s)
            mask[..., idx] = (hard + (soft - soft.detach())).flatten(-2)  # exactly hard in the forward
        return mask

    def forward(self, summary: torch.Tensor, side: torch.Tensor | None, gate_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The routing vector (…, heads.width) for summaries (…, d_model) and side inputs (…, side_dim)."""
        if self.side_dim:
            side = side.to(summary.dtype)
            summary = torch.cat([summary, side if self.project is None else self.project(side)], dim=-1)
        h = F.gelu(self.inp(summary))
        code = 2.0 * torch.sigmoid(self.out(h))
        if self.heads.dynamic_rank is not None:
            code = code * self.rank_mask(self.score(h))
        parts = [code]
        if self.heads.gate_sites:
            z = self.gate(h)
            if gate_bias is not None:
                z = (z + gate_bias.to(z.dtype)) / self.log_temperature.exp()
            parts.append(2.0 * torch.sigmoid(z))
        if self.heads.film_blocks:
            z = self.film(h).unflatten(-1, (self.heads.film_blocks, 2, self.heads.film_groups))
            gamma = 1.0 + self.heads.film_gamma_max * torch.tanh(z[..., 0, :])
            beta = self.heads.film_beta_max * torch.tanh(z[..., 1, :])
            parts.append(torch.stack([gamma, beta], -2).flatten(-3))
        return torch.cat(parts, -1) if len(parts) > 1 else code
