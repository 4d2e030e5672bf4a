"""The controller network: pooled context (+ side inputs) → one code per routed site."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Controller(nn.Module):
    """code = 2·sigmoid(W₂ gelu(W₁ [LN(summary); side])), shaped (…, n_sites, r).

    W₂ starts at zero, so c ≡ 1 at step 0 and BEM starts as LoRA. `start` is the summary used
    when no token precedes a chunk (the first chunk without a prompt code).
    """

    def __init__(self, d_model: int, side_dim: int, hidden: int, n_sites: int, rank: int):
        super().__init__()
        self.n_sites, self.rank, self.side_dim = n_sites, rank, side_dim
        self.norm = nn.LayerNorm(d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.inp = nn.Linear(d_model + side_dim, hidden)
        self.out = nn.Linear(hidden, n_sites * rank)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def summarize(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Normalised mean of hidden states from their sum (…, d) and count (…); `start` if count is 0."""
        mean = total / count.clamp_min(1).unsqueeze(-1).to(total.dtype)
        return torch.where((count > 0).unsqueeze(-1), self.norm(mean), self.start.to(total.dtype))

    def forward(self, summary: torch.Tensor, side: torch.Tensor | None) -> torch.Tensor:
        """Codes (…, n_sites, r) for summaries (…, d_model) and side inputs (…, side_dim)."""
        if self.side_dim:
            summary = torch.cat([summary, side.to(summary.dtype)], dim=-1)
        z = self.out(F.gelu(self.inp(summary)))
        return 2.0 * torch.sigmoid(z).unflatten(-1, (self.n_sites, self.rank))
