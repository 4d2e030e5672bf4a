"""AR1: policy gradient for the router, starting from AR0, with a trust region (SPEC §4).

What it is, named honestly: **PPO-clip** (Schulman et al., 2017) on episodic returns, with an **exact-KL stop and
rollback**. After every minibatch step the KL divergence KL(π_old ‖ π_θ) is computed exactly over the discrete action
distribution and averaged over the update's states; if it exceeds `target_kl` (0.01) the step is undone and the
update ends. Every accepted update therefore has KL ≤ target_kl on its states (TRPO's constraint, enforced by
backtracking to the last step inside it rather than by a conjugate-gradient step).

Rollouts sample a ~ π inside the model's forward (Router.mode = "sample"); the hysteresis and the plan limit are
part of the environment. An episode's return is R = mean part score − λ · switches, and every decision of the
episode that the runtime allowed gets the advantage A = (R − mean R) / std R over the batch of episodes.

    L(θ) = − mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i) − β H(π_θ(· | s_i)),   ρ_i = π_θ(a_i | s_i) / π_old(a_i | s_i)
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bem.router.policy import Decision, Router


@dataclass
class PGBatch:
    states: torch.Tensor  # (N, state_dim)
    actions: torch.Tensor  # (N,)
    old_logp: torch.Tensor  # (N,) log π_old(a | s) as sampled
    advantages: torch.Tensor  # (N,)


def collect(trace: list[Decision], rows: torch.Tensor, returns: torch.Tensor) -> PGBatch:
    """The allowed decisions of one rollout batch, each with its episode's return as advantage (not yet normalised).
    `rows[b]` is the episode of batch row b, `returns[e]` episode e's return R."""
    states, actions, logp, adv = [], [], [], []
    for d in trace:
        keep = d.allowed
        states.append(d.state[keep])
        actions.append(d.action[keep])
        logp.append(d.logp[keep])
        adv.append(returns[rows[keep]])
    return PGBatch(torch.cat(states), torch.cat(actions), torch.cat(logp), torch.cat(adv).float())


def concat(batches: list[PGBatch], returns: torch.Tensor) -> PGBatch:
    """One update's batch; advantages A = (R − mean R) / std R with the statistics of the episodes' `returns`."""
    mean, std = returns.float().mean(), returns.float().std().clamp_min(1e-6)
    return PGBatch(torch.cat([b.states for b in batches]), torch.cat([b.actions for b in batches]),
                   torch.cat([b.old_logp for b in batches]), (torch.cat([b.advantages for b in batches]) - mean) / std)


def kl_old_new(old_logp_all: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over states of KL(π_old ‖ π_θ), exact over the actions."""
    return (old_logp_all.exp() * (old_logp_all - F.log_softmax(logits, -1))).sum(-1).mean()


def ppo_update(router: Router, batch: PGBatch, lr: float = 1e-3, clip_coef: float = 0.2, update_epochs: int = 4,
               minibatch_size: int = 64, target_kl: float = 0.01, ent_coef: float = 0.01, seed: int = 0) -> dict:
    """One trust-region update of π on `batch`; returns losses/… metrics named as CleanRL logs them."""
    with torch.no_grad():
        old_all = F.log_softmax(router.logits(batch.states), -1)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    accepted, steps, stopped, clipfracs = copy.deepcopy(router.state_dict()), 0, False, []
    for _ in range(update_epochs):
        order = torch.randperm(len(batch.actions), generator=gen)
        for start in range(0, len(order), minibatch_size):
            mb = order[start:start + minibatch_size]
            logp_all = F.log_softmax(router.logits(batch.states[mb]), -1)
            ratio = (logp_all.gather(-1, batch.actions[mb, None]).squeeze(-1) - batch.old_logp[mb]).exp()
            adv = batch.advantages[mb]
            pg_loss = -torch.min(ratio * adv, ratio.clamp(1 - clip_coef, 1 + clip_coef) * adv).mean()
            entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
            opt.zero_grad()
            (pg_loss - ent_coef * entropy).backward()
            opt.step()
            with torch.no_grad():
                kl = kl_old_new(old_all, router.logits(batch.states)).item()
            if kl > target_kl:  # outside the trust region: undo this step and stop
                router.load_state_dict(accepted)
                stopped = True
                break
            accepted, steps = copy.deepcopy(router.state_dict()), steps + 1
            clipfracs.append(((ratio - 1).abs() > clip_coef).float().mean().item())
        if stopped:
            break
    with torch.no_grad():
        logits = router.logits(batch.states)
        logp_all = F.log_softmax(logits, -1)
        return {"losses/approx_kl": kl_old_new(old_all, logits).item(),
                "losses/entropy": -(logp_all.exp() * logp_all).sum(-1).mean().item(),
                "losses/clipfrac": sum(clipfracs) / len(clipfracs) if clipfracs else 0.0,
                "charts/accepted_steps": steps, "charts/kl_stop": float(stopped)}
