"""Training one (experiment, seed) unit through Hugging Face Accelerate, with resumable checkpoints.

The batch of optimizer step k is a fixed function of (seed, k), so a run killed and started again
from its last checkpoint (module weights as safetensors, AdamW and schedule state loaded with
`weights_only=True`) follows the same trajectory as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bem import attach_bem, bem_state_dict
from bem.data.batches import Example, collate
from bem.experiments.config import ExperimentConfig, TrainingConfig
from bem.models import load_base
from bem.tasks import SPECS, load_items, side_layout, side_vectors, training_target

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the unit stops and no score of it is written."""


@dataclass
class TrainedUnit:
    model: torch.nn.Module
    tokenizer: object
    curve: list[dict]  # one row per optimizer step: step, loss, lr, grad_norm
    resumed_from: int  # 0 if trained from scratch
    is_main: bool = True  # the process that evaluates and writes results under DDP


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_examples(config: ExperimentConfig, data_root: Path | None = None) -> list[Example]:
    """Every task's training items as examples; tasks without a target (safety) are not trained on."""
    layout = side_layout(config.tasks) if config.side_inputs else {}
    examples = []
    for task in config.tasks:
        if task == "safety":
            continue
        items = load_items(task, "train", config.training.train_items, data_root)
        sides = side_vectors(task, items, layout, data_root) if layout else [None] * len(items)
        spec = SPECS[task]
        examples += [Example(spec.prompt(it), training_target(task, it), side) for it, side in zip(items, sides)]
    return examples


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _save_checkpoint(directory: Path, model, optimizer, scheduler, step: int, curve: list[dict]) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in bem_state_dict(model).items()}, tmp / "bem_weights.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "progress.json").write_text(json.dumps({"step": step, "curve": curve}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_checkpoint(directory: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    weights = load_file(str(directory / "bem_weights.safetensors"))
    own = bem_state_dict(model)
    if set(weights) != set(own):
        raise ValueError(f"{directory}: checkpoint tensors do not match this experiment's modules")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(weights[key])
    state = torch.load(directory / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    progress = json.loads((directory / "progress.json").read_text())
    return progress["step"], progress["curve"]


def build_optimizer(model: torch.nn.Module, tc: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over the trainable BEM parameters. With `tc.controller_lr`, two groups: the sites (U/V, A/B) at
    `tc.lr` first (the logged lr) and the controller at `tc.controller_lr`; otherwise one group at `tc.lr`."""
    params = [p for p in model.parameters() if p.requires_grad]
    controller = getattr(model, "bem_controller", None)
    if tc.controller_lr is None:
        return torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    if controller is None:
        raise ValueError(f"training.controller_lr = {tc.controller_lr} is not allowed for a model without a BEM "
                         "controller (bem.controller = 'static'); expected None")
    routing = {id(p) for p in controller.parameters() if p.requires_grad}
    groups = [{"params": [p for p in params if id(p) not in routing], "lr": tc.lr},
              {"params": [p for p in params if id(p) in routing], "lr": tc.controller_lr}]
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def train_unit(config: ExperimentConfig, seed: int, checkpoint_dir: Path, data_root: Path | None = None,
               stop_after: int | None = None) -> TrainedUnit:
    """Train the experiment's modules for one seed; resume from `checkpoint_dir` if it holds a checkpoint.

    `stop_after` ends the loop early (after saving a checkpoint) — used to test resumption.
    """
    from accelerate import Accelerator

    tc = config.training
    seed_everything(seed)
    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each unit sets its own precision; the process group (PartialState) stays
    accelerator = Accelerator(mixed_precision="bf16" if tc.precision == "bf16" else "no",
                              gradient_accumulation_steps=tc.grad_accum)
    optimizer = build_optimizer(model, tc)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.warmup_steps, tc.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    examples = training_examples(config, data_root)
    if not examples:
        raise ValueError(f"{config.source}: no task of {config.tasks} has training targets")
    order = np.random.default_rng(seed).permutation(len(examples))
    per_step = tc.batch_size * tc.grad_accum
    world, rank = accelerator.num_processes, accelerator.process_index  # DDP: each rank takes its own micro-batches

    start, curve = 0, []
    if (checkpoint_dir / "progress.json").is_file():
        start, curve = _load_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler)
        log.info("%s seed %d: resumed from step %d", config.name, seed, start)
    model.train()
    bar = tqdm(range(start, tc.steps), desc=f"train {config.name} s{seed}", unit="step", initial=start, total=tc.steps)
    for step in bar:
        losses = []
        for micro in range(tc.grad_accum):
            at = (step * per_step * world + (micro * world + rank) * tc.batch_size) % len(examples)
            idx = [order[(at + i) % len(examples)] for i in range(tc.batch_size)]
            batch = collate(tokenizer, [examples[i] for i in idx], max_length=tc.max_length)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{config.name} seed {seed}: loss is {loss.item()} at step {step}; "
                                           "the unit stops and writes no scores")
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm) if accelerator.sync_gradients else None
                optimizer.step()
                scheduler.step()  # the prepared scheduler only advances when gradients sync
                optimizer.zero_grad()
            losses.append(loss.item())
        curve.append({"step": step + 1, "loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else math.nan})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps or done == stop_after:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler, done, curve)
        if done == stop_after:
            break
    model = accelerator.unwrap_model(model)
    model.eval()
    return TrainedUnit(model, tokenizer, curve, start, accelerator.is_main_process)
