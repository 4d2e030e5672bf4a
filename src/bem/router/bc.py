"""AR0: behaviour cloning of the router from measured oracle traces (SPEC §4).

The oracle action of a decision is the expert that scored best on the part of the episode the decided chunk belongs
to (measured by generating each part with each expert alone; `oracle_experts`), at full budget and scale 1. The
states are recorded by running the router over the oracle's text: the summaries come from the read layer, before any
routed site, so they do not depend on the actions, and the one-hot of the previous action is set to the oracle's
previous action (teacher forcing of actions). Then π is fitted by cross-entropy:

    L(θ) = − mean_i log π_θ(a*_i | s_i)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bem.router.policy import Decision, Router


@dataclass
class BCData:
    states: torch.Tensor  # (N, state_dim)
    actions: torch.Tensor  # (N,) oracle actions


def oracle_experts(scores: torch.Tensor) -> torch.Tensor:
    """The best expert per (episode, part) from scores (episodes, parts, experts); ties go to the lowest index."""
    return scores.argmax(-1)


def chunk_parts(decisions: int, prompt_len: int, chunk_size: int, part_starts: list[int]) -> list[int]:
    """Part index of each decision of one row of a fresh full forward.

    Decision 0 is the prompt's (part 0); decision j ≥ 1 sets the code of the j-th chunk after the prompt, real tokens
    [prompt_len + (j−1)·N, prompt_len + j·N), and gets the part its first token belongs to. `part_starts` are the
    real-token positions where parts 1, 2, … begin (a part begins with its user turn).
    """
    parts = [0]
    for j in range(1, decisions):
        first = prompt_len + (j - 1) * chunk_size
        parts.append(sum(first >= start for start in part_starts))
    return parts


def relabel(router: Router, trace: list[Decision], targets: torch.Tensor) -> BCData:
    """States of a recorded full forward (trace of one batch, decision j = trace[j]) with the previous action set
    to the oracle's, paired with the oracle actions `targets` (B, J). Decisions that are not live (the first chunk
    after the prompt keeps the prompt's action; chunks a row does not reach) are left out; the plan limit is not
    applied (the oracle's plan is the label)."""
    n_actions = len(router.actions)
    states, actions = [], []
    for j, decision in enumerate(trace):
        keep = decision.live if j else torch.ones_like(decision.action, dtype=torch.bool)
        s = decision.state.clone()
        s[:, -n_actions:] = 0.0
        if j:  # the action in force before decision j is the oracle's previous one
            s[:, -n_actions:] = F.one_hot(targets[:, j - 1], n_actions).to(s.dtype)
        states.append(s[keep])
        actions.append(targets[:, j][keep])
    return BCData(torch.cat(states), torch.cat(actions))


def train_bc(router: Router, data: BCData, epochs: int = 200, lr: float = 3e-3, batch_size: int = 256,
             seed: int = 0) -> list[dict]:
    """Fit π to the oracle actions with Adam; returns one row per epoch: loss, accuracy (on the training states)."""
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for epoch in range(epochs):
        order = torch.randperm(len(data.actions), generator=gen)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(router.logits(data.states[idx]), data.actions[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = router.logits(data.states)
            curve.append({"epoch": epoch, "loss": F.cross_entropy(logits, data.actions).item(),
                          "accuracy": (logits.argmax(-1) == data.actions).float().mean().item()})
    return curve
