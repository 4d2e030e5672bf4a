"""The router experiments (ar0_bc, ar1_pg) end to end, and the systems they are compared with (issue 15).

One run folder holds everything, each step stored as soon as it is done so that a killed run resumes:
1. the expert bank (its experiment, `router.bank`, trained by the ordinary runner in the same folder);
2. every expert alone on the test episodes (units `router/expert:<task>`), and on the train episodes (the oracle
   traces, cached as JSON): the measured part scores the oracles and AR0's labels come from;
3. AR0: the policy fitted to the oracle's best expert per part (bc.py); AR1: PPO with an exact-KL trust region from
   AR0 on sampled rollouts (pg.py), its curves stored per update and resumable;
4. the router evaluated greedily on the test episodes (unit `ar0_bc` / `ar1_pg`);
5. the baselines on the same bank and episodes, each a unit: best single expert (chosen on train), all experts on,
   a random router, PEFT's Arrow over the experts exported as LoRA adapters, a multi-task LoRA of the bank's rank
   trained on the union (experiment `router.multitask`), BEM's chunk controller trained end to end over the frozen
   bank (`router.controller`), and the task-label and per-item oracles (upper bounds put together per part from the
   fixed-expert rollouts).

Per-item rows: task `router_mixed` or `router_composite`, id = episode id, scores `score` (mean part score, the
primary metric), `reward` (score − λ · switches), `switches`, `part1`, `part2`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from bem import attach_bem, bem_layers
from bem.experiments.config import ExperimentConfig, load_experiment
from bem.router import bc, pg
from bem.router.env import ROUTER_TASKS, Episode, composite_items, mixed_stream, reward, rollout, turn_ids, part_score
from bem.router.policy import Actions, Router, attach_router

log = logging.getLogger(__name__)

MIXED, COMPOSITE = "router_mixed", "router_composite"
BASELINES = ("best_single", "task_oracle", "item_oracle", "all_on", "random", "arrow", "multitask_lora", "controller")
"""In the order they are computed: the ones put together from stored rollouts first, the ones that train last."""


# --- episodes and rollouts -------------------------------------------------------------------------------
def episodes(config: ExperimentConfig, split: str, seed: int = 0) -> list[Episode]:
    r = config.router
    n_mixed, n_comp = (r.train_mixed, r.train_composite) if split == "train" else (r.test_mixed, r.test_composite)
    out = mixed_stream(split, n_mixed, seed=seed) if n_mixed else []
    return out + (composite_items(split, n_comp) if n_comp else [])


def kind(episode: Episode) -> str:
    return COMPOSITE if len(episode.parts) > 1 else MIXED


def run_episodes(model, tokenizer, eps: list[Episode], batch: int, router: Router | None = None,
                 record: bool = False) -> tuple[list, list[int], list[tuple[list, list[int]]]]:
    """Rollouts of `eps` (in their order), the router's accepted switches per episode, and with `record` the trace of
    each batch with the episode index of each batch row. Episodes are batched by prompt length (fewer pads)."""
    order = sorted(range(len(eps)), key=lambda i: (len(eps[i].parts), len(eps[i].parts[0].prompt)))
    rollouts, switches, traces = [None] * len(eps), [0] * len(eps), []
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        if router is not None:
            router.trace = []
        out = rollout(model, tokenizer, [eps[i] for i in idx], batch_size=len(idx))
        rows = [0] * len(idx)
        for i, r in zip(idx, out):
            rollouts[i], rows[r.row] = r, i
        if router is not None:
            per_row = sum(d.switched.long() for d in router.trace if d.kind == "chunk")
            for b, i in enumerate(rows):
                switches[i] = int(per_row[b]) if torch.is_tensor(per_row) else 0
            if record:
                traces.append((router.trace, rows))
            router.trace = None
    return rollouts, switches, traces


def part_scores(eps: list[Episode], rollouts: list) -> list[list[float]]:
    return [[part_score(p.task, reply, p.item) for p, reply in zip(ep.parts, r.replies)] for ep, r in zip(eps, rollouts)]


def rows_of(eps: list[Episode], scores: list[list[float]], switches: list[int], lam: float,
            predictions: list[str]) -> list[dict]:
    """Per-episode rows for the results database."""
    rows = []
    for ep, s, n, text in zip(eps, scores, switches, predictions):
        values = {"score": sum(s) / len(s), "reward": sum(s) / len(s) - lam * n, "switches": float(n)}
        values.update({f"part{k + 1}": v for k, v in enumerate(s)})
        rows.append({"task": kind(ep), "id": ep.id, "prediction": text, "scores": values, "reference": ""})
    return rows


def summaries(rows: list[dict], seconds: float) -> list[dict]:
    out = []
    for task in (MIXED, COMPOSITE):
        mine = [r for r in rows if r["task"] == task]
        if mine:
            means = {m: sum(r["scores"][m] for r in mine) / len(mine) for m in ("score", "reward", "switches")}
            out.append({"task": task, "means": means, "corpus": {}, "seconds": seconds * len(mine) / len(rows),
                        "n": len(mine)})
    return out


# --- the routed bank --------------------------------------------------------------------------------------
def bank_config(config: ExperimentConfig) -> ExperimentConfig:
    bank = load_experiment(config.router.bank, overlay=config.preset)
    a, b = bank.bem, config.bem
    for name in ("rank", "alpha", "sites", "experts", "layers", "tau_sigma", "tau_fro"):
        if getattr(a, name) != getattr(b, name):
            raise ValueError(f"{config.source}: bem.{name} = {getattr(b, name)!r} differs from the bank's "
                             f"({config.router.bank}: {getattr(a, name)!r}); the router runs over the bank as trained")
    if bank.tasks != list(ROUTER_TASKS):
        raise ValueError(f"{config.router.bank}: tasks = {bank.tasks} is not allowed for the router's bank; expected "
                         f"{list(ROUTER_TASKS)} (expert e = tasks[e])")
    return bank


def bank_weights(out: Path, bank: ExperimentConfig, seed: int) -> dict[str, torch.Tensor]:
    from bem.experiments.adapters import adapter_dir, restore_adapter

    directory = adapter_dir(out, bank, seed)
    if not (directory / "bem_weights.safetensors").is_file():
        restore_adapter(bank, seed, out)
    return load_file(directory / "bem_weights.safetensors")


def routed_model(config: ExperimentConfig, weights: dict[str, torch.Tensor], seed: int):
    """The base model with the bank's U, V under a routed BEM and a fresh Router (seeded)."""
    from bem.models import load_base

    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    load_sites(model, weights)
    torch.manual_seed(seed)
    r = config.router
    router = attach_router(model, Actions(config.bem.experts, config.bem.rank, tuple(r.budgets), tuple(r.scales)),
                           hidden=r.hidden, tau=r.tau)
    model.eval()
    return model, tokenizer, router


def load_sites(model, weights: dict[str, torch.Tensor]) -> None:
    layers = bem_layers(model)
    names = {f"{n}.{p}" for n, layer in layers.items() for p in layer.adapter_parameters()}
    missing = sorted(names - set(weights))
    if missing:
        raise ValueError(f"the bank has no tensors for {missing[:3]} ({len(missing)} missing); it was trained on other sites")
    with torch.no_grad():
        for n, layer in layers.items():
            for p, t in layer.adapter_parameters().items():
                t.copy_(weights[f"{n}.{p}"])


# --- AR0 and AR1 ------------------------------------------------------------------------------------------
def oracle_data(model, tokenizer, router: Router, eps: list[Episode], expert_runs: list[list], scores: torch.Tensor,
                batch: int) -> bc.BCData:
    """BC states and labels: each episode's stream built from the best expert's reply per part (teacher forcing),
    run through the model with the router recording; the label of a decision is the best expert of its chunk's part."""
    best = bc.oracle_experts(scores)  # (episodes, parts)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    streams, starts, prompts = [], [], []
    for i, ep in enumerate(eps):
        ids = _prompt(tokenizer, ep.parts[0].prompt)
        prompts.append(len(ids))
        part_starts = []
        for p in range(len(ep.parts)):
            reply = list(expert_runs[int(best[i, p])][i].tokens[p])
            if p:
                part_starts.append(len(ids))
                ids += turn_ids(tokenizer, [q.prompt for q in ep.parts[:p + 1]])
            last = p == len(ep.parts) - 1
            ids += reply if last or reply[-1:] and reply[-1] not in eos else reply[:-1]
        streams.append(ids)
        starts.append(part_starts)
    states, actions = [], []
    device = next(model.parameters()).device
    for start in range(0, len(eps), batch):
        idx = list(range(start, min(start + batch, len(eps))))
        width = max(len(streams[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, :len(streams[i])], mask[row, :len(streams[i])] = torch.tensor(streams[i]), 1
        router.trace = []
        with torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  bem_prompt_len=torch.tensor([prompts[i] for i in idx], device=device),
                  bem_side=torch.tensor([eps[i].side for i in idx], device=device))
        trace, router.trace = router.trace, None
        targets = torch.tensor([[router.actions.index(int(best[i, part]))
                                 for part in bc.chunk_parts(len(trace), prompts[i], model.bem_config.chunk_size, starts[i])]
                                for i in idx])
        data = bc.relabel(router, trace, targets)
        states.append(data.states)
        actions.append(data.actions)
    return bc.BCData(torch.cat(states), torch.cat(actions))


def _prompt(tokenizer, text: str) -> list[int]:
    from bem.data.batches import prompt_ids

    return prompt_ids(tokenizer, text)


def train_pg(model, tokenizer, router: Router, config: ExperimentConfig, train: list[Episode], seed: int,
             checkpoint: Path) -> list[dict]:
    """AR1 from the router's current (AR0) weights: `pg_updates` trust-region updates, each on `pg_episodes` train
    episodes rolled out with sampled actions. After each update the router's weights and the curve so far are saved
    together (one folder, renamed into place), and a rerun resumes after the last saved update."""
    r = config.router
    curve: list[dict] = []
    saved = sorted(checkpoint.glob("update-*")) if checkpoint.is_dir() else []
    if saved:
        router.load_state_dict(load_file(saved[-1] / "router.safetensors"))
        curve = json.loads((saved[-1] / "curve.json").read_text())
        log.info("AR1: resumed after update %d", len(curve))
    router.mode = "sample"
    try:
        for update in range(len(curve), r.pg_updates):
            gen = torch.Generator().manual_seed(seed * 100_003 + update)
            pick = torch.randperm(len(train), generator=gen)[:r.pg_episodes].tolist()
            eps = [train[i] for i in pick]
            router.generator = torch.Generator().manual_seed(seed * 100_003 + update + 1)
            runs, switches, traces = run_episodes(model, tokenizer, eps, r.rollout_batch, router, record=True)
            scores = part_scores(eps, runs)
            returns = torch.tensor([reward(x, ep, n, r.switch_cost) for x, ep, n in zip(runs, eps, switches)])
            batches = [pg.collect(trace, torch.tensor(rows), returns) for trace, rows in traces]
            metrics = pg.ppo_update(router, pg.concat(batches, returns), lr=r.pg_lr, clip_coef=r.clip_coef,
                                    update_epochs=r.update_epochs, target_kl=r.target_kl, ent_coef=r.ent_coef,
                                    seed=seed + update)
            row = {"update": update, "charts/reward": returns.mean().item(),
                   "charts/score": sum(sum(s) / len(s) for s in scores) / len(scores),
                   "charts/switch_rate": sum(switches) / len(switches), **metrics}
            curve.append(row)
            log.info("AR1 update %d: %s", update, {k: round(v, 4) for k, v in row.items()})
            _save_update(router, curve, checkpoint)
    finally:
        router.mode, router.generator = "greedy", None
    return curve


def _save_update(router: Router, curve: list[dict], folder: Path) -> None:
    """Weights and curve of one update in `update-NNNN/`, written into a temporary folder and renamed, so a kill
    leaves either the whole update or none of it; older updates are removed after."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{len(curve):04d}"
    tmp.mkdir(exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in router.state_dict().items()}, tmp / "router.safetensors")
    (tmp / "curve.json").write_text(json.dumps(curve))
    os.rename(tmp, folder / f"update-{len(curve):04d}")
    for old in sorted(folder.glob("update-*"))[:-1]:
        shutil.rmtree(old)


# --- one router unit, end to end ----------------------------------------------------------------------------
def baseline_hash(config: ExperimentConfig, system: str) -> str:
    """What a baseline's results depend on: the bank, the episodes, the routed model's settings and λ, not the
    router's algorithm, so ar0_bc and ar1_pg share their baselines."""
    import hashlib

    r = config.router
    key = {"system": system, "bank": bank_config(config).config_hash(), "bem": config.bem.to_dict(),
           "episodes": [r.train_mixed, r.train_composite, r.test_mixed, r.test_composite], "lam": r.switch_cost,
           "actions": [r.budgets, r.scales, r.tau, r.hidden], "batch": r.rollout_batch}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _store(db, run_id: int, name: str, config_hash: str, config_json: dict, seed: int, rows: list[dict],
           train_seconds: float, eval_seconds: float, data: str) -> int:
    unit = db.write_unit(run_id, name, config_hash, config_json, seed, rows, summaries(rows, eval_seconds), [],
                         train_seconds, eval_seconds, data)
    log.info("%s: stored (%s)", name, {s["task"]: round(s["means"]["score"], 4) for s in summaries(rows, 1.0)})
    return unit


TRAINED = ("multitask_lora", "controller")
"""Baselines that train a unit of their own: `bem run` computes them (and every system's cost) after all router units
of the run, so an interrupted run holds AR0 and AR1 first."""


def run_unit(db, run_id: int, config: ExperimentConfig, seed: int, out: Path, data_root: Path | None = None,
             data: str | None = None, trained_baselines: bool = True) -> int:
    """Bank, fixed experts, AR0 (and AR1), the router's test scores, then the baselines (those that train and the
    costs only with `trained_baselines`); each stored when done, so a rerun does only what is missing."""
    from bem.experiments import runner
    from bem.experiments.adapters import unit_data

    r, lam = config.router, config.router.switch_cost
    data = data if data is not None else unit_data(config, data_root)
    bank = bank_config(config)
    bank_data = unit_data(bank, data_root)
    if db.unit_id(bank.name, bank.config_hash(), seed, bank_data) is None:
        log.info("router: training the expert bank %s seed %d first", bank.name, seed)
        runner.run_unit(db, run_id, bank, seed, out, data_root, bank_data, extras=False)
    _zero_shot(db, run_id, config, bank, seed, bank_data, data_root)
    weights = bank_weights(out, bank, seed)
    model, tokenizer, router = routed_model(config, weights, seed)
    train, test = episodes(config, "train", seed), episodes(config, "test", seed)
    base_json = {**config.to_dict(), "anchor": None, "parity_with": None}

    # 2. every expert alone: on test (stored units), on train (the oracle traces, cached)
    names = [f"router/expert:{task}" for task in bank.tasks]
    test_scores = []
    for e, name in enumerate(names):
        h = baseline_hash(config, name)
        if db.unit_id(name, h, seed, data) is None:
            router.force = router.actions.index(e)
            start = time.perf_counter()
            runs, switches, _ = run_episodes(model, tokenizer, test, r.rollout_batch, router)
            router.force = None
            rows = rows_of(test, part_scores(test, runs), switches, lam, [_text(x) for x in runs])
            _store(db, run_id, name, h, {**base_json, "system": name}, seed, rows, 0.0, time.perf_counter() - start, data)
        test_scores.append(_part_scores(db, name, baseline_hash(config, name), test))
    cache = out / "router" / f"oracle-{baseline_hash(config, 'oracle-train')}-s{seed}.json"
    train_runs = _train_oracle(model, tokenizer, router, train, config, cache)
    train_part = [part_scores(train, _as_rollouts(train_runs)[e]) for e in range(config.bem.experts)]
    width = max(len(ep.parts) for ep in train)  # (episodes, parts, experts); a one-part episode's only part repeats
    train_scores = torch.tensor([[[s[min(p, len(s) - 1)] for p in range(width)] for s in by_expert]
                                 for by_expert in train_part]).permute(1, 2, 0)

    # 3. AR0, then AR1
    unit_hash = config.config_hash()
    if db.unit_id(config.name, unit_hash, seed, data) is None:
        start = time.perf_counter()
        data_bc = oracle_data(model, tokenizer, router, train, _as_rollouts(train_runs), train_scores, r.rollout_batch)
        bc_curve = bc.train_bc(router, data_bc, epochs=r.bc_epochs, lr=r.bc_lr, seed=seed)
        log.info("AR0: %d oracle decisions, accuracy %.3f", len(data_bc.actions), bc_curve[-1]["accuracy"])
        pg_curve = []
        if r.algorithm == "pg":
            pg_curve = train_pg(model, tokenizer, router, config, train, seed,
                                out / "checkpoints" / f"{config.name}-{unit_hash}-s{seed}")
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        runs, switches, _ = run_episodes(model, tokenizer, test, r.rollout_batch, router)
        rows = rows_of(test, part_scores(test, runs), switches, lam, [_text(x) for x in runs])
        unit = _store(db, run_id, config.name, unit_hash, config.to_dict(), seed, rows, train_seconds,
                      time.perf_counter() - start, data)
        db.write_router_curve(unit, [{"step": c["epoch"], "metric": f"bc/{k}", "value": v} for c in bc_curve
                                     for k, v in c.items() if k != "epoch"]
                              + [{"step": c["update"], "metric": k, "value": v} for c in pg_curve
                                 for k, v in c.items() if k != "update"])
        _save_router(router, out / "adapters" / f"{config.name}-{unit_hash}-s{seed}")

    _profile(db, config, model, tokenizer, router, weights, test, unit_hash)

    # 4. baselines, once per folder
    means = [sum(sum(s) / len(s) for s in by_expert) / len(by_expert) for by_expert in train_part]
    best = max(range(len(means)), key=means.__getitem__)  # the best single expert, chosen on train
    experts_of_part = [[bank.tasks.index(p.task) for p in ep.parts] for ep in test]
    derived = {"best_single": test_scores[best],
               "task_oracle": baselines_oracle(test_scores, experts_of_part),
               "item_oracle": baselines_oracle(test_scores, None)}
    for system in BASELINES:
        name, h = f"router/{system}", baseline_hash(config, f"router/{system}")
        if db.unit_id(name, h, seed, data) is not None or (system in TRAINED and not trained_baselines):
            continue
        start, train_seconds = time.perf_counter(), 0.0
        if system in derived:
            scores, switches, texts = derived[system], [0] * len(test), [""] * len(test)
        else:
            runs, switches, train_seconds, other_seconds = _baseline_runs(
                system, config, weights, model, tokenizer, router, test, seed, out, db, run_id, data_root)
            start += other_seconds  # a trained baseline's own unit (trained and scored just now) is not its eval time
            scores, texts = part_scores(test, runs), [_text(x) for x in runs]
        rows = rows_of(test, scores, switches, lam, texts)
        extra = {"system": system, "best_expert": bank.tasks[best]} if system == "best_single" else {"system": system}
        _store(db, run_id, name, h, {**base_json, **extra}, seed, rows, train_seconds, time.perf_counter() - start, data)
    if trained_baselines:
        _costs(db, config, model, tokenizer, router, weights, test, seed, out, run_id, data_root)
    return db.unit_id(config.name, unit_hash, seed, data)


def baselines_oracle(scores, experts_of_part):
    from bem.router.baselines import oracle_rows

    return oracle_rows(scores, experts_of_part)


def _baseline_runs(system, config, weights, model, tokenizer, router, test, seed, out, db, run_id, data_root):
    """(rollouts, switches, train seconds, seconds spent running the baseline's own unit) of a baseline that
    generates."""
    from bem.router import baselines

    r, train_seconds, other_seconds = config.router, 0.0, 0.0
    if system == "random":
        saved = {k: v.clone() for k, v in router.state_dict().items()}
        baselines.random_router(router, seed)
        try:
            runs, switches, _ = run_episodes(model, tokenizer, test, r.rollout_batch, router)
        finally:
            router.load_state_dict(saved)
            router.mode, router.generator = "greedy", None
        return runs, switches, train_seconds, 0.0
    if system == "all_on":
        other, _ = baselines.static_bank(config, weights)
    elif system == "arrow":
        other, _ = baselines.arrow_model(config, weights, out / "router" / "arrow", seed)
    elif system in ("multitask_lora", "controller"):
        name = config.router.multitask if system == "multitask_lora" else config.router.controller
        start = time.perf_counter()
        other, train_seconds = _trained(name, config, seed, out, db, run_id, data_root)
        other_seconds = time.perf_counter() - start
    else:
        raise ValueError(f"unknown baseline {system!r}; expected one of {BASELINES}")
    runs, switches, _ = run_episodes(other, tokenizer, test, r.rollout_batch)
    return runs, switches, train_seconds, other_seconds


def _trained(name: str, config: ExperimentConfig, seed: int, out: Path, db, run_id: int, data_root: Path | None):
    """A baseline that is an ordinary experiment (the multi-task LoRA, the controller over the bank), trained by the
    runner in the same folder under the same preset: (its model, its training seconds)."""
    from bem.experiments import runner
    from bem.experiments.adapters import load_trained, unit_data

    other = load_experiment(name, overlay=config.preset)
    other_data = unit_data(other, data_root)
    unit = db.unit_id(other.name, other.config_hash(), seed, other_data)
    if unit is None:
        unit = runner.run_unit(db, run_id, other, seed, out, data_root, other_data, extras=False)
    seconds = db.conn.execute("SELECT train_seconds FROM units WHERE id = ?", (unit,)).fetchone()[0]
    model, _ = load_trained(other, seed, out, data_root)
    return model, seconds


def _train_oracle(model, tokenizer, router: Router, train: list[Episode], config: ExperimentConfig, cache: Path):
    """Every expert alone on the train episodes, cached as JSON: [expert][episode] = {tokens, replies}."""
    if cache.is_file():
        return json.loads(cache.read_text())
    runs_by_expert = []
    for e in range(config.bem.experts):
        router.force = router.actions.index(e)
        runs, _, _ = run_episodes(model, tokenizer, train, config.router.rollout_batch, router)
        router.force = None
        runs_by_expert.append([{"tokens": [list(t) for t in x.tokens], "replies": list(x.replies)} for x in runs])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs_by_expert))
    os.replace(tmp, cache)
    return runs_by_expert


class _Cached:
    def __init__(self, entry: dict):
        self.tokens, self.replies = entry["tokens"], entry["replies"]


def _as_rollouts(runs_by_expert: list[list[dict]]) -> list[list[_Cached]]:
    return [[_Cached(x) for x in runs] for runs in runs_by_expert]


def _text(run) -> str:
    return "\n||\n".join(run.replies)


def _part_scores(db, name: str, config_hash: str, eps: list[Episode]) -> list[list[float]]:
    """A stored unit's part scores per episode, in the order of `eps`."""
    values = {}
    for item, metric, value in db.conn.execute(
            "SELECT s.item_id, s.metric, s.value FROM item_scores s JOIN units u ON u.id = s.unit_id "
            "WHERE u.experiment = ? AND u.config_hash = ? AND s.metric LIKE 'part%'", (name, config_hash)):
        values.setdefault(item, {})[int(metric[4:]) - 1] = value
    return [[values[ep.id][p] for p in range(len(ep.parts))] for ep in eps]


def _save_router(router: Router, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in router.state_dict().items()}, folder / "router.safetensors")
    (folder / "router.json").write_text(json.dumps({"actions": dataclasses_dict(router.actions), "tau": router.tau,
                                                    "hidden": router.inp.out_features}, indent=2))


def dataclasses_dict(obj) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def _profile(db, config: ExperimentConfig, model, tokenizer, router: Router, weights, test: list[Episode],
             unit_hash: str, steps: int = 24, rounds: int = 5) -> None:
    """The router's cost for its gates, stored as profiles of experiment 'router': its parameters against the bank's,
    and its decode step against the same bank with c ≡ 1 and no controller (interleaved rounds, median step)."""
    from bem.router.baselines import static_bank

    if db.conn.execute("SELECT 1 FROM profiles WHERE experiment = 'router' AND config_hash = ?",
                       (unit_hash,)).fetchone():
        return
    fixed, batch = static_bank(config, weights)[0], _decode_batch(tokenizer, test[:8])
    ratios = [_step_time(model, batch, True, steps) / _step_time(fixed, batch, False, steps) for _ in range(rounds)]
    router_params = sum(p.numel() for p in router.parameters())
    bank_params = sum(t.numel() for t in weights.values())
    with db.conn:
        db.conn.executemany("INSERT INTO profiles VALUES ('router', ?, ?, ?, ?)",
                            [(unit_hash, "decode_ratio", float(np.median(ratios)), str(next(model.parameters()).device)),
                             (unit_hash, "router_params", float(router_params), "-"),
                             (unit_hash, "bank_params", float(bank_params), "-")])


def _zero_shot(db, run_id: int, config: ExperimentConfig, bank: ExperimentConfig, seed: int, bank_data: str,
               data_root: Path | None) -> None:
    """The frozen base model on the bank's test items (unit `router/zero_shot`): each expert alone must beat it on
    its own task (the report's bank table pairs the two by item)."""
    from bem.evaluate import evaluate_task
    from bem.models import load_base

    name, h = "router/zero_shot", baseline_hash(config, "router/zero_shot")
    if db.unit_id(name, h, seed, bank_data) is not None:
        return
    model, tokenizer = load_base(config.model)
    rows, sums, start = [], [], time.perf_counter()
    for task in bank.tasks:
        r, summary = evaluate_task(model.eval(), tokenizer, task, bank.evaluation.items, bank.evaluation.split,
                                   bank.evaluation.batch_size, data_root)
        rows += r
        sums.append(summary)
    db.write_unit(run_id, name, h, {**config.to_dict(), "system": "zero_shot", "bank": bank.name}, seed, rows, sums,
                  [], 0.0, time.perf_counter() - start, bank_data)


COSTED = ("router", "all_on", "arrow", "multitask_lora", "controller")
"""Systems whose decode cost is measured: a router (AR0 and AR1 alike; the random router too), the bank with c ≡ 1
(the cost of any fixed expert, best single and oracles included: the same GEMMs), Arrow, the multi-task LoRA and the
controller over the bank."""


def _costs(db, config: ExperimentConfig, model, tokenizer, router: Router, weights, test: list[Episode], seed: int,
           out: Path, run_id: int, data_root: Path | None, steps: int = 16, rounds: int = 3) -> None:
    """Each system's decode step against the frozen base model's, measured in this process in interleaved rounds
    (median per-step time of a batch of 8 test prompts), and its adapter parameters; stored as profiles
    `router_cost:<system>` (metrics decode_ratio, parameters) under the baselines' hash. Skipped when stored."""
    from bem.models import load_base
    from bem.router import baselines

    h = baseline_hash(config, "costs")
    if db.conn.execute("SELECT 1 FROM profiles WHERE experiment LIKE 'router_cost:%' AND config_hash = ?",
                       (h,)).fetchone():
        return
    bank_params = sum(t.numel() for t in weights.values())
    systems = {"router": (model, True, bank_params + sum(p.numel() for p in router.parameters()))}
    systems["all_on"] = (baselines.static_bank(config, weights)[0], False, bank_params)
    systems["arrow"] = (baselines.arrow_model(config, weights, out / "router" / "arrow", seed)[0], False, bank_params)
    for name, experiment in (("multitask_lora", config.router.multitask), ("controller", config.router.controller)):
        other = _trained(experiment, config, seed, out, db, run_id, data_root)[0]
        systems[name] = (other, name == "controller", sum(t.numel() for t in _adapter_tensors(other)))
    base = load_base(config.model)[0].eval()
    batch = _decode_batch(tokenizer, test[:8])
    ratios = {name: [] for name in systems}
    for _ in range(rounds):
        reference = _step_time(base, batch, False, steps)
        for name, (m, routed, _) in systems.items():
            ratios[name].append(_step_time(m, batch, routed, steps) / reference)
    device = str(next(model.parameters()).device)
    with db.conn:
        db.conn.executemany("INSERT INTO profiles VALUES (?, ?, ?, ?, ?)",
                            [row for name, (_, _, params) in systems.items() for row in (
                                (f"router_cost:{name}", h, "decode_ratio", float(np.median(ratios[name])), device),
                                (f"router_cost:{name}", h, "parameters", float(params), "-"))])


def _adapter_tensors(model) -> list[torch.Tensor]:
    from bem import bem_state_dict

    return list(bem_state_dict(model).values())


def _decode_batch(tokenizer, eps: list[Episode]) -> tuple:
    prompts = [_prompt(tokenizer, ep.parts[0].prompt)[-64:] for ep in eps]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    return ids, mask, torch.tensor([ep.side for ep in eps])


def _step_time(m, batch: tuple, routed: bool, steps: int) -> float:
    """Median seconds of one cached greedy decode step of `m` on `batch` after its prefill."""
    from transformers import DynamicCache

    ids, mask, side = batch
    extra = {"bem_prompt_len": mask.sum(1), "bem_side": side} if routed else {}
    from bem.evaluate import cache_name

    name = cache_name(m)
    cache, times = DynamicCache(), []
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, **{name: cache}, use_cache=True, **extra)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            start = time.perf_counter()
            out = m(input_ids=token, attention_mask=mask, **{name: cache}, use_cache=True)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    return float(np.median(times))
