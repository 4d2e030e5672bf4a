"""The router's macro-policy π(a | s) (SPEC §4), run by BEM's runtime inside the model's forward.

At the prompt and at every chunk boundary it picks an action a = (expert block e, rank budget k, scale) over the
expert bank: the code is `scale` on the first k directions of block e and 0 elsewhere, the same at every routed
site. The state s = [LN(summary of the previous chunk at the read layer); side inputs (retrieval features);
one-hot(previous action)] is read by a one-hidden-layer MLP. The summaries come from the read layer, before any
routed site, so they never depend on earlier actions: a recorded trace can be relabelled offline (behaviour cloning).

Hysteresis: the value of an action is its log-probability under π; a new action replaces the one in force only if
log π(a_new | s) − log π(a_now | s) > tau. The plan limit (at most `BEMConfig.max_switches` accepted switches per
sequence) and "the first chunk after the prompt keeps the prompt's action" are the runtime's rules
(`BEMRuntime.read`), applied to every controller alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bem.module.config import BEMConfig
from bem.module.controller import Controller, Heads
from bem.experts import expert_mask


@dataclass(frozen=True)
class Actions:
    """The action set: every (expert, budget, scale), expert-major. Budgets are fractions of an expert's r/E
    directions (the first max(1, round(budget · r/E)) stay on); scales multiply the code."""

    experts: int
    rank: int
    budgets: tuple[float, ...] = (1.0, 0.5)
    scales: tuple[float, ...] = (1.0, 0.5)

    def __post_init__(self) -> None:
        if self.experts < 1 or self.rank % self.experts:
            raise ValueError(f"Actions: experts = {self.experts} must be >= 1 and divide rank = {self.rank}")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ValueError(f"Actions.budgets = {self.budgets} is not allowed; expected fractions in (0, 1]")
        if not self.scales or not all(s > 0 for s in self.scales):
            raise ValueError(f"Actions.scales = {self.scales} is not allowed; expected numbers > 0")

    def __len__(self) -> int:
        return self.experts * len(self.budgets) * len(self.scales)

    def unpack(self, a: int) -> tuple[int, float, float]:
        """(expert, budget, scale) of action index a."""
        e, rest = divmod(a, len(self.budgets) * len(self.scales))
        b, s = divmod(rest, len(self.scales))
        return e, self.budgets[b], self.scales[s]

    def index(self, expert: int, budget: float = 1.0, scale: float = 1.0) -> int:
        """Action index of (expert, budget, scale)."""
        if not 0 <= expert < self.experts or budget not in self.budgets or scale not in self.scales:
            raise ValueError(f"no action (expert={expert}, budget={budget}, scale={scale}); experts 0..{self.experts - 1}, "
                             f"budgets {self.budgets}, scales {self.scales}")
        return (expert * len(self.budgets) + self.budgets.index(budget)) * len(self.scales) + self.scales.index(scale)

    def codes(self) -> torch.Tensor:
        """(A, r): the code of every action: `expert_mask(e, budget, scale)` of the bank."""
        bank = BEMConfig(rank=self.rank, experts=self.experts, controller="static")
        return torch.stack([expert_mask(bank, *self.unpack(a)) for a in range(len(self))])


@dataclass
class Decision:
    """One recorded decision of a batch: rows are batch rows; `allowed` False where the runtime ignored it."""

    kind: str  # "initial" (prompt or first chunk) or "chunk"
    state: torch.Tensor  # (B, state_dim)
    action: torch.Tensor  # (B,) sampled or greedy action
    logp: torch.Tensor  # (B,) log π(action | state)
    previous: torch.Tensor  # (B,) action in force before (-1 for an initial decision)
    live: torch.Tensor = field(default=None)  # (B,) bool: a real decision (the row reached the chunk; not the first
    # chunk after the prompt, which keeps the prompt's action)
    allowed: torch.Tensor = field(default=None)  # (B,) bool: live and the plan limit leaves room for a switch
    switched: torch.Tensor = field(default=None)  # (B,) bool: the action replaced the one in force


class Router(Controller):
    """π(a | s) over `actions`, serving codes to `sites` routed sites of width `actions.rank` each.

    mode "greedy" takes argmax π (evaluation); "sample" draws a ~ π with `generator` (rollouts); `force` = a makes
    every decision a (a fixed expert). With `trace` set to a list, every decision is appended to it as a `Decision`
    (for behaviour cloning and policy gradients).
    """

    def __init__(self, d_model: int, side_dim: int, hidden: int, sites: int, actions: Actions, tau: float = 0.0):
        nn.Module.__init__(self)
        self.heads, self.side_dim, self.actions, self.tau = Heads(code=[actions.rank] * sites), side_dim, actions, tau
        self.norm = nn.LayerNorm(d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.inp = nn.Linear(d_model + side_dim + len(actions), hidden)
        self.out = nn.Linear(hidden, len(actions))
        self.register_buffer("table", actions.codes(), persistent=False)
        self.mode, self.generator, self.trace = "greedy", None, None
        self.force: int | None = None  # an action every decision takes (fixed-expert rollouts, oracle traces)

    @property
    def state_dim(self) -> int:
        return self.inp.in_features

    def state(self, summary: torch.Tensor, side: torch.Tensor | None, previous: torch.Tensor) -> torch.Tensor:
        """s = [summary; side; one-hot(previous action)] (zeros for no previous action, -1)."""
        onehot = F.one_hot(previous.clamp_min(0), len(self.actions)).to(summary.dtype) * (previous >= 0).unsqueeze(-1)
        parts = [summary] + ([side.to(summary.dtype)] if self.side_dim else []) + [onehot]
        return torch.cat(parts, -1)

    def logits(self, state: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.inp(state)))

    def act(self, logp: torch.Tensor) -> torch.Tensor:
        if self.force is not None:
            return torch.full(logp.shape[:1], self.force, dtype=torch.long, device=logp.device)
        if self.mode == "greedy":
            return logp.argmax(-1)
        if self.mode == "sample":
            return torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1)
        raise ValueError(f"Router.mode = {self.mode!r} is not allowed; expected 'greedy' or 'sample'")

    def code(self, action: torch.Tensor) -> torch.Tensor:
        """The flat routing vector (B, sites · r) of actions (B,)."""
        return self.table[action].repeat(1, len(self.heads.code))

    def action_of(self, code: torch.Tensor) -> torch.Tensor:
        """The action (B,) whose code a routing vector (B, W) holds (its first site's)."""
        return (code[:, None, :self.actions.rank] - self.table.to(code.dtype)).abs().sum(-1).argmin(-1)

    def _decide(self, kind: str, summary, side, previous) -> tuple[torch.Tensor, torch.Tensor, Decision]:
        s = self.state(summary, side, previous)
        logp = F.log_softmax(self.logits(s).float(), -1)
        a = self.act(logp)
        record = Decision(kind, s.detach(), a, logp.gather(-1, a[:, None]).squeeze(-1).detach(), previous)
        return a, logp, record

    def forward(self, summary: torch.Tensor, side: torch.Tensor | None, gate_bias=None) -> torch.Tensor:
        """The initial action's code from the prompt's summary (or the start summary): no previous action."""
        previous = torch.full(summary.shape[:1], -1, dtype=torch.long, device=summary.device)
        a, _, record = self._decide("initial", summary, side, previous)
        if self.trace is not None:
            record.live = record.allowed = record.switched = torch.ones_like(a, dtype=torch.bool)
            self.trace.append(record)
        return self.code(a).to(summary.dtype)

    def decide(self, summary: torch.Tensor, side: torch.Tensor | None, current: torch.Tensor,
               live: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At a chunk boundary: (the proposed action's code (B, W), whether it should replace `current`); `live` and
        `allowed` (see Decision) are recorded only, the runtime applies them."""
        previous = self.action_of(current)
        a, logp, record = self._decide("chunk", summary, side, previous)
        gain = logp.gather(-1, a[:, None]).squeeze(-1) - logp.gather(-1, previous[:, None]).squeeze(-1)
        want = (a != previous) & (gain > self.tau)
        if self.trace is not None:
            record.live, record.allowed, record.switched = live, allowed, want & allowed
            self.trace.append(record)
        return self.code(a).to(current.dtype), want


def attach_router(model: nn.Module, actions: Actions, hidden: int = 64, tau: float = 0.0) -> Router:
    """Replace the controller of a BEM-attached model (routed, every site of width actions.rank) by a Router."""
    from bem.module.attach import bem_runtime

    runtime = bem_runtime(model)
    old = runtime.controller
    if old is None:
        raise ValueError("attach_router needs a routed BEM (BEMConfig.controller 'prefix' or 'chunk'), not 'static'")
    if set(old.heads.code) != {actions.rank} or old.heads.gate_sites or old.heads.film_blocks:
        raise ValueError(f"attach_router needs plain sites of width rank = {actions.rank} and no head gates or FiLM; "
                         f"the model's sites have widths {sorted(set(old.heads.code))}")
    router = Router(old.norm.normalized_shape[0], old.side_dim, hidden, len(old.heads.code), actions, tau)
    router.to(old.start.device)
    runtime.controller = model.bem_controller = router
    return router
