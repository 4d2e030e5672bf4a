"""Online learners (SPEC §5, OL): the naive one fine-tunes the live weights on every feedback batch; the shadow one
trains a copy with EWC, a proximal term to the live weights and a reservoir replay buffer, while live serves.

Shadow loss on a batch of feedback and replayed examples (θ the shadow's weights, θ_live the live ones):

    L(θ) = CE(θ) + (λ/2) Σ_i F_i (θ_i − θ_live,i)² + (μ/2) ‖θ − θ_live‖²

F is the diagonal empirical Fisher of the live weights, the mean over replayed examples of each example's squared
gradient (per-example, batch of one), scaled to mean 1 so that λ reads as a multiple of μ. Only the trainable tensors
move: the controller, and the sites' U and V with `train_module`."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from bem.module.attach import bem_layers
from bem.data.batches import Example, collate
from bem.experiments.config import OnlineConfig
from bem.experiments.training import target_loss


def trainable(model, train_module: bool) -> dict[str, torch.nn.Parameter]:
    """The tensors online learning moves, by name: the controller's, and the sites' with `train_module`."""
    out = {f"bem_controller.{n}": p for n, p in model.bem_controller.named_parameters()}
    if train_module:
        out.update({f"{n}.{k}": t for n, layer in bem_layers(model).items() for k, t in layer.adapter_parameters().items()})
    return out


def snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def load_weights(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])


@dataclass
class Reservoir:
    """Algorithm R: after n examples offered, each is kept with probability capacity / n."""

    capacity: int
    items: list[Example] = field(default_factory=list)
    seen: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, example: Example) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(example)
            return
        j = self.rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = example

    def sample(self, k: int) -> list[Example]:
        return self.rng.sample(self.items, min(k, len(self.items)))


def fisher(model, tokenizer, params: dict[str, torch.nn.Parameter], examples: list[Example],
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: mean over `examples` of each one's squared gradient, scaled to mean 1."""
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    model.train()
    for ex in examples:
        model.zero_grad(set_to_none=True)
        target_loss(model, collate(tokenizer, [ex], max_length)).backward()
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    mean = torch.cat([t.flatten() for t in total.values()]).mean().clamp_min(1e-30)
    return {n: t / mean for n, t in total.items()}


def penalty(params: dict[str, torch.nn.Parameter], anchor: dict[str, torch.Tensor], fisher_diag: dict[str, torch.Tensor],
            ewc: float, prox: float) -> torch.Tensor:
    """(λ/2) Σ F (θ − θ*)² + (μ/2) ‖θ − θ*‖², θ* the live weights."""
    out = torch.zeros(())
    for n, p in params.items():
        d2 = (p - anchor[n]) ** 2
        out = out + 0.5 * ewc * (fisher_diag[n] * d2).sum() + 0.5 * prox * d2.sum()
    return out


class Learner:
    """One online learner over the model's trainable tensors: `guarded` (shadow: EWC + prox + replay) or naive."""

    def __init__(self, model, tokenizer, config: OnlineConfig, guarded: bool, max_length: int | None = None):
        self.model, self.tokenizer, self.config, self.guarded = model, tokenizer, config, guarded
        self.params = trainable(model, config.train_module)
        for p in self.params.values():
            p.requires_grad_(True)
        self.max_length = max_length
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=0.0)
        self.anchor: dict[str, torch.Tensor] = snapshot(self.params)
        self.fisher = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.replay = Reservoir(config.replay)

    def reset_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=self.config.lr, weight_decay=0.0)

    def set_anchor(self, live: dict[str, torch.Tensor]) -> None:
        """The live weights the penalty pulls towards; the Fisher is re-estimated there on replayed examples."""
        self.anchor = {n: t.clone() for n, t in live.items()}
        if self.guarded and self.config.ewc > 0 and self.replay.items:
            current = snapshot(self.params)
            load_weights(self.params, self.anchor)
            self.fisher = fisher(self.model, self.tokenizer, self.params,
                                 self.replay.sample(self.config.fisher_items), self.max_length)
            load_weights(self.params, current)

    def learn(self, feedback: list[Example]) -> list[dict]:
        """Gradient steps over the feedback (update_batch examples each, the shadow's mixed with replay); the feedback
        then enters the replay buffer. Returns one record per step."""
        c, records = self.config, []
        fresh = max(1, round(c.update_batch * (1 - c.replay_share))) if self.guarded else c.update_batch
        self.model.train()
        for start in range(0, len(feedback), fresh):
            batch = feedback[start:start + fresh]
            if self.guarded:
                batch = batch + self.replay.sample(c.update_batch - len(batch))
            self.optimizer.zero_grad(set_to_none=True)
            loss = target_loss(self.model, collate(self.tokenizer, batch, self.max_length))
            reg = penalty(self.params, self.anchor, self.fisher, c.ewc, c.prox) if self.guarded else torch.zeros(())
            (loss + reg).backward()
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
            self.optimizer.step()
            records.append({"loss": float(loss.detach()), "penalty": float(reg.detach()), "examples": len(batch)})
        if self.guarded:
            for ex in feedback:
                self.replay.add(ex)
        self.model.eval()
        return records

    # --- state (safetensors tensors + JSON-able values; nothing is pickled) ---------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"weights/{n}": p.detach().clone() for n, p in self.params.items()}
        out.update({f"anchor/{n}": t for n, t in self.anchor.items()})
        out.update({f"fisher/{n}": t for n, t in self.fisher.items()})
        for i, (n, p) in enumerate(self.params.items()):
            state = self.optimizer.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in state:
                    out[f"adam/{n}/{k}"] = state[k].detach().clone().reshape(-1) if k == "step" else state[k].detach().clone()
        return out

    def values(self) -> dict:
        return {"replay": [[e.prompt, e.target, [float(x) for x in e.side] if e.side is not None else None] for e in self.replay.items],
                "replay_seen": self.replay.seen, "replay_rng": _rng_state(self.replay.rng)}

    def restore(self, tensors: dict[str, torch.Tensor], values: dict) -> None:
        load_weights(self.params, {n: tensors[f"weights/{n}"] for n in self.params})
        self.anchor = {n: tensors[f"anchor/{n}"].clone() for n in self.params}
        self.fisher = {n: tensors[f"fisher/{n}"].clone() for n in self.params}
        self.reset_optimizer()
        for n, p in self.params.items():
            if f"adam/{n}/exp_avg" in tensors:
                self.optimizer.state[p] = {"step": tensors[f"adam/{n}/step"].reshape(()).clone(),
                                           "exp_avg": tensors[f"adam/{n}/exp_avg"].clone(),
                                           "exp_avg_sq": tensors[f"adam/{n}/exp_avg_sq"].clone()}
        self.replay.items = [Example(p, t, tuple(s) if s is not None else None) for p, t, s in values["replay"]]
        self.replay.seen = values["replay_seen"]
        self.replay.rng.setstate(_rng_tuple(values["replay_rng"]))


def _rng_state(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


def _rng_tuple(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])
