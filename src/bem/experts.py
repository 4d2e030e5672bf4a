"""The expert bank (SPEC §1, §4): the r basis directions split into E blocks, one expert per block.

Expert e owns the directions [e·r/E, (e+1)·r/E) of every site. A mask m that is non-zero on block e only gives
y = W0 x + s · U diag(c ⊙ m) Vᵀ x with expert e alone; with `controller: static` (c ≡ 1) the mask is all that
selects it. A direction whose mask is 0 gets exactly zero gradient (trust region off), so a static bank trains in
one unit on the union of its tasks' data, each example masked to its own task's block (bem.experiments.training).

A saved bank is a `save_bem` folder plus `experts.json`: which task each block was trained on.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from bem.module.attach import CONFIG_FILE, WEIGHTS_FILE, detach_bem, load_bem, save_bem
from bem.module.config import BEMConfig
from bem.errors import BEMError, CheckpointError

EXPERTS_FILE = "experts.json"
EXPERTS_FORMAT = 1


def _expert(config: BEMConfig, e: int) -> int:
    if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < config.experts:
        raise ValueError(f"expert e = {e!r} is not allowed; expected an integer in [0, {config.experts - 1}] "
                         f"(BEMConfig.experts = {config.experts})")
    return e


def block(config: BEMConfig, e: int) -> slice:
    """The directions of expert e: [e·r/E, (e+1)·r/E)."""
    size = config.rank // config.experts
    return slice(_expert(config, e) * size, (e + 1) * size)


def expert_mask(config: BEMConfig, e: int, budget: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """Mask m (r,) that selects expert e: `scale` on the first max(1, round(budget · r/E)) directions of its
    block (the rank budget), 0 elsewhere."""
    where = block(config, e)
    for name, value, ok, allowed in (("budget", budget, lambda v: 0 < v <= 1, "a number in (0, 1]"),
                                     ("scale", scale, lambda v: v > 0, "a finite number > 0")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"{name} = {value!r} is not allowed; expected {allowed}")
    kept = max(1, round(budget * (where.stop - where.start)))
    mask = torch.zeros(config.rank)
    mask[where.start:where.start + kept] = scale
    return mask


def task_masks(config: BEMConfig, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """{tasks[e]: expert_mask(config, e)} for a bank whose expert e is tasks[e]."""
    if len(tasks) != config.experts or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks = {list(tasks)} is not allowed for a bank of BEMConfig.experts = {config.experts}; "
                         f"expected {config.experts} distinct task names, one per expert")
    return {task: expert_mask(config, e) for e, task in enumerate(tasks)}


def bank_masks(config: BEMConfig, tasks: Sequence[str]) -> dict[str, torch.Tensor]:
    """The mask each task of an experiment trains and is evaluated with: its own expert's block for a static
    bank (experts > 1, controller static), none ({}) for any other experiment."""
    if config.experts == 1 or config.controller != "static":
        return {}
    return task_masks(config, tasks)


# --- the bank artifact ----------------------------------------------------------------------------------
def save_bank(model: nn.Module, folder: str | os.PathLike, tasks: Sequence[str]) -> Path:
    """Write the bank into `folder`: `save_bem`'s files (safetensors + bem_config.json) and experts.json =
    {"format": 1, "experts": [{"block": e, "task": tasks[e], "directions": [start, stop]}, ...]}."""
    folder, config = Path(folder), model.bem_config
    task_masks(config, tasks)  # one distinct task per expert
    experts = [{"block": e, "task": task, "directions": [block(config, e).start, block(config, e).stop]}
               for e, task in enumerate(tasks)]
    stale = folder / EXPERTS_FILE
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {CONFIG_FILE, WEIGHTS_FILE, EXPERTS_FILE}:
        stale.unlink(missing_ok=True)  # save_bem replaces an adapter-only folder; the new experts.json follows
    save_bem(model, folder)
    tmp = folder / f".{EXPERTS_FILE}.tmp"
    tmp.write_text(json.dumps({"format": EXPERTS_FORMAT, "experts": experts}, indent=2))
    os.replace(tmp, folder / EXPERTS_FILE)
    return folder


def _read_experts(path: Path) -> list:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; a saved expert bank holds {EXPERTS_FILE} beside {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE} (written by save_bank)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != EXPERTS_FORMAT:
        got = data.get("format") if isinstance(data, dict) else data
        raise CheckpointError(f"{path}: format = {got!r} is not allowed; expected {EXPERTS_FORMAT}")
    if not isinstance(data.get("experts"), list):
        raise CheckpointError(f"{path}: experts = {data.get('experts')!r} is not allowed; expected a list of "
                              "{block, task, directions}")
    return data["experts"]


def _check_experts(path: Path, experts: list, config: BEMConfig) -> list[str]:
    """The tasks by block, after checking every entry against the bank's config (E experts of r/E directions)."""
    if len(experts) != config.experts:
        raise CheckpointError(f"{path}: experts lists {len(experts)} entries; expected {config.experts}, one per "
                              f"expert of {CONFIG_FILE} (experts = {config.experts}, rank = {config.rank})")
    tasks = []
    for e, entry in enumerate(experts):
        where = block(config, e)
        want = {"block": e, "directions": [where.start, where.stop]}
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: experts[{e}] = {entry!r} is not allowed; expected "
                                  "{block, task, directions}")
        for key, value in want.items():
            if entry.get(key) != value:
                raise CheckpointError(f"{path}: experts[{e}].{key} = {entry.get(key)!r} is not allowed; expected "
                                      f"{value} ({CONFIG_FILE}: experts = {config.experts}, rank = {config.rank})")
        if not isinstance(entry.get("task"), str) or not entry["task"]:
            raise CheckpointError(f"{path}: experts[{e}].task = {entry.get('task')!r} is not allowed; expected a "
                                  "task name")
        tasks.append(entry["task"])
    if len(set(tasks)) != len(tasks):
        raise CheckpointError(f"{path}: experts name tasks {tasks}; expected each task once")
    return tasks


def load_bank(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Attach the bank saved in `folder` onto a fresh base model (load_bem: never unpickles); returns the task of each
    block. experts.json must match the config's E and rank, else a CheckpointError naming the file and the field,
    and the model is left without BEM."""
    folder = Path(folder)
    path = folder / EXPERTS_FILE
    experts = _read_experts(path)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    load_bem(model, folder)
    try:
        return _check_experts(path, experts, model.bem_config)
    except CheckpointError:
        detach_bem(model)
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(frozen[name])
        raise


# --- `bem experts train`: train the bank, save it, judge each expert against zero-shot ---------------------
def train_bank(name: str, out: Path, quick: bool = False, seed: int = 0, n_resamples: int = 10_000) -> list[dict]:
    """Train the bank experiment `name` (a name under experiments/ or a .yaml path) for one seed through the runner of
    `bem run` (resumable; results in out/results.sqlite), save it as out/bank (save_bank), score the frozen base model
    on the same test items (bem.evaluate.zero_shot, kept in out/zero_shot) and compare: one row per expert, alone on
    its own task vs zero-shot, on the task's primary metric (paired BCa CI). The table is also out/experts.md."""
    from bem.data.prepare import prepare
    from bem.evaluate import zero_shot
    from bem.experiments.adapters import load_trained, unit_data
    from bem.experiments.results import ResultsDB
    from bem.experiments.runner import load_configs, run

    (config,) = load_configs([name], quick, None)
    if not bank_masks(config.bem, config.tasks):
        raise BEMError(f"{config.source}: not an expert bank (bem.experts = {config.bem.experts}, bem.controller = "
                       f"{config.bem.controller!r}); expected bem.experts > 1 with bem.controller: static")
    if config.evaluation.split != "test":
        raise BEMError(f"{config.source}: evaluation.split = {config.evaluation.split!r} is not allowed here; expected "
                       "'test' (bem experts train compares with the zero-shot scores of the test split)")
    out = Path(out)
    prepare(config.tasks)  # as `bem run` does: builds only what is missing
    ((_, _, status),) = run([name], out, quick=quick, seed=seed, command=f"bem experts train {name} seed {seed}")
    if status.startswith("busy"):
        raise BEMError(f"{out}: the bank's unit is {status}; run the same command again when that process is done")
    model, _ = load_trained(config, seed, out)
    save_bank(model, out / "bank", config.tasks)
    del model
    zero_shot(config.model, config.tasks, config.evaluation.items, out / "zero_shot", config.evaluation.batch_size)
    db = ResultsDB(out / "results.sqlite")
    try:
        unit = db.unit_id(config.name, config.config_hash(), seed, unit_data(config))
        rows = [_compare(db, unit, task, out / "zero_shot" / f"{task}.items.jsonl", n_resamples)
                for task in config.tasks]
    finally:
        db.close()
    (out / "experts.md").write_text(comparison_markdown(rows, config, seed))
    return rows


def _compare(db, unit: int, task: str, zero_path: Path, n_resamples: int) -> dict:
    """Expert alone vs zero-shot on `task`'s primary metric, paired by item."""
    from bem.stats import paired_bca
    from bem.tasks import SPECS

    metric = SPECS[task].primary
    ours = dict(db.conn.execute("SELECT item_id, value FROM item_scores WHERE unit_id=? AND task=? AND metric=?",
                                (unit, task, metric)).fetchall())
    base = {r["id"]: r["scores"][metric] for r in map(json.loads, zero_path.read_text(encoding="utf-8").splitlines())}
    ids = [i for i in ours if i in base]
    if not ids or len(ids) != len(ours):
        raise BEMError(f"{zero_path}: scores {len(ids)} of the bank's {len(ours)} {task} items; expected all of them "
                       f"(delete {zero_path.parent} to score the base model again)")
    r = paired_bca([base[i] for i in ids], [ours[i] for i in ids], n_resamples=n_resamples)
    return {"task": task, "metric": metric, "n": len(ids), "expert": sum(ours[i] for i in ids) / len(ids),
            "zero_shot": sum(base[i] for i in ids) / len(ids), "difference": r.estimate, "low": r.low,
            "high": r.high, "p": r.p, "beats_zero_shot": r.low > 0, "note": r.note}


def comparison_markdown(rows: list[dict], config, seed: int) -> str:
    """The table `bem experts train` prints and writes to experts.md (`config`: the bank's ExperimentConfig)."""
    tc = config.training
    lines = [f"# Expert bank `{config.name}`, seed {seed}", "",
             f"Each expert alone (the mask of its block) vs the frozen base model `{config.model}` (zero-shot) on its "
             "own task's test items, primary metric; difference = expert − zero-shot with its paired BCa 95% CI over "
             f"items; an expert beats zero-shot when the CI lies above 0. Bank: rank {config.bem.rank} split into "
             f"{config.bem.experts} experts of {config.bem.rank // config.bem.experts} directions, trained in one unit "
             f"of {tc.steps} steps × {tc.batch_size * tc.grad_accum} examples over the union of the tasks.", "",
             "| expert | task | metric | items | expert alone | zero-shot | difference | 95% CI | beats zero-shot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e, r in enumerate(rows):
        lines.append(f"| {e} | `{r['task']}` | {r['metric']} | {r['n']} | {r['expert']:.4f} | {r['zero_shot']:.4f} | "
                     f"{r['difference']:+.4f} | [{r['low']:+.4f}, {r['high']:+.4f}] | "
                     f"{'yes' if r['beats_zero_shot'] else 'no'} |")
    return "\n".join(lines) + "\n"
