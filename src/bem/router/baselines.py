"""The systems a router is compared with, on the same bank and the same test episodes (issue 15, item 6).

Each returns the model (and router, where there is one) the episodes are rolled out with; `experiment.run_unit`
scores and stores them. The oracles need no generation of their own: they are put together per part from the
fixed-expert rollouts (`oracle_rows`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from bem import attach_bem, export_peft
from bem.experiments.config import ExperimentConfig
from bem.router.policy import Router


def static_bank(config: ExperimentConfig, weights: dict[str, torch.Tensor]):
    """The bank with c ≡ 1 on every direction: all experts on at once (their updates summed)."""
    from bem.models import load_base
    from bem.router.experiment import load_sites

    model, tokenizer = load_base(config.model)
    bem = dataclasses.replace(config.bem, controller="static", side_dim=0, max_switches=None, source="")
    attach_bem(model, bem)
    load_sites(model, weights)
    return model.eval(), tokenizer


def random_router(router: Router, seed: int) -> Router:
    """The router with all weights zero, sampling: a uniform random action per decision. Under the hysteresis rule a
    uniform policy never gains log-probability by switching, so this is a uniformly random expert per episode."""
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    router.mode, router.generator = "sample", torch.Generator().manual_seed(seed)
    return router


def arrow_model(config: ExperimentConfig, weights: dict[str, torch.Tensor], folder: Path, seed: int, top_k: int = 3):
    """PEFT's Arrow (`create_arrow_model`, zero training) over the bank's experts, each exported as a PEFT LoRA
    adapter (`bem.export_peft(..., expert=e)`): per token and layer, the top_k experts whose ΔW's top right singular
    vector best aligns with the token's input, mixed by a softmax (PEFT's default top_k = 3, temperature 1)."""
    from peft import ArrowConfig, create_arrow_model

    from bem.models import load_base

    bank, _ = static_bank(config, weights)
    paths = [str(export_peft(bank, folder / f"expert_{e}", expert=e)) for e in range(config.bem.experts)]
    base, tokenizer = load_base(config.model)
    model = create_arrow_model(base, paths, ArrowConfig(top_k=min(top_k, len(paths)), router_temperature=1.0,
                                                        rng_seed=seed))
    return model.eval(), tokenizer


def oracle_rows(expert_scores: list[list[list[float]]], experts_of_part: list[list[int]] | None) -> list[list[float]]:
    """Part scores of an oracle from the fixed-expert runs' part scores [expert][episode][part]: the per-item oracle
    takes each part's best expert (experts_of_part None); the task-label oracle the given expert of each part."""
    n = len(expert_scores[0])
    if experts_of_part is None:
        return [[max(run[i][p] for run in expert_scores) for p in range(len(expert_scores[0][i]))] for i in range(n)]
    return [[expert_scores[e][i][p] for p, e in enumerate(experts_of_part[i])] for i in range(n)]
