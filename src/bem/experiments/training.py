"""Training one (experiment, seed) unit through Hugging Face Accelerate, with resumable checkpoints.

The batch of optimizer step k is a fixed function of (seed, k), so a run killed and started again
from its last checkpoint (module weights as safetensors, AdamW and schedule state loaded with
`weights_only=True`) follows the same trajectory as an uninterrupted one. Checkpoints are written atomically,
one step folder each with a manifest of sha256 checksums, and verified completely before a run resumes from one
(see the checkpoints section below).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bem import attach_bem, bem_layers, bem_state_dict
from bem.module.attach import _check_tensors, _crash_point, _fsync, _sha256
from bem.errors import CheckpointError
from bem.data.batches import BatchSchedule, Example, encode_cached, pad_batch
from bem.experiments.config import ExperimentConfig, TrainingConfig
from bem.experts import bank_masks
from bem.models import load_base
from bem.precision import resolve
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
    """Every task's training items as examples; tasks without a target (safety) are not trained on. In a static
    expert bank each example carries its task's expert mask, so expert e learns from tasks[e] alone."""
    layout = side_layout(config.tasks, config.side_inputs == "zeroed") if config.side_inputs else {}
    masks = {task: tuple(m.tolist()) for task, m in bank_masks(config.bem, config.tasks).items()}
    examples = []
    for task in config.tasks:
        if task == "safety":
            continue
        items = load_items(task, "train", config.training.train_items, data_root)
        sides = side_vectors(task, items, layout, data_root) if layout else [None] * len(items)
        spec = SPECS[task]
        examples += [Example(spec.prompt(it), training_target(task, it), side, masks.get(task))
                     for it, side in zip(items, sides)]
    return examples


def target_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], head: torch.nn.Module | None = None
                ) -> torch.Tensor:
    """Hugging Face's causal-LM loss (mean cross-entropy over every token whose label is not -100, each predicted
    from the position before it), with the output head run only at those positions.

    At the default budget the head (49152 × 576 for SmolLM2) is ~1/5 of a step's FLOPs while only ~1/8 of the
    real positions carry loss. A pre-hook on `head` (default `model.get_output_embeddings()`; under Accelerate pass the
    unwrapped model's) hands it the hidden states of those positions only, so the model's own post-processing of the
    logits (Gemma-2's soft-capping) still applies. `model` is called as given (BEM-wrapped, DDP-wrapped) without
    labels; a model without an output head gets `model(**batch).loss`.
    """
    head = model.get_output_embeddings() if head is None else head
    if head is None:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)

    def gather(module, args):
        hidden = args[0]
        if hidden.shape[:2] != labels.shape:
            raise RuntimeError(f"target_loss: the output head got hidden states of shape {tuple(hidden.shape)}, "
                               f"expected (batch, length) = {tuple(labels.shape)} first")
        return (hidden[rows, cols],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    return torch.nn.functional.cross_entropy(logits.float(), labels[rows, cols + 1])


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# --- checkpoints ---------------------------------------------------------------------------------------------
# A unit's folder holds one complete checkpoint per step folder `step-NNNNNNNN/` (transiently two):
#   bem_weights.safetensors  the BEM tensors
#   optimizer.pt             AdamW and schedule state (read back with weights_only=True)
#   progress.json            {"step", "curve"}
#   manifest.json            written last: format, step, total_steps, identity, sha256 and size of the three files
# Saving writes into a hidden `.tmp-step-NNNNNNNN-*` folder, flushes every file and the folder, renames it to its step
# folder and only then removes the older ones, so a kill at any moment leaves the previous complete checkpoint.
CHECKPOINT_FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS, OPTIMIZER, PROGRESS = "bem_weights.safetensors", "optimizer.pt", "progress.json"
_FILES = (WEIGHTS, OPTIMIZER, PROGRESS)
_STEP = re.compile(r"step-(\d{8})")
_TMP = ".tmp-"


def _step_folders(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _STEP.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(checkpoint_dir: Path) -> tuple[Path, int] | None:
    """(step folder, step) of the newest complete checkpoint in a unit's checkpoint folder, or None.

    Complete means the step folder holds its manifest.json (a folder gets its step name only after every file is
    on disk, manifest last); whether its contents are intact is checked when training resumes from it. A folder
    of the layout before manifests (progress.json directly in `checkpoint_dir`) is returned as (checkpoint_dir, step).
    """
    checkpoint_dir = Path(checkpoint_dir)
    for step, path in reversed(_step_folders(checkpoint_dir)):
        if (path / MANIFEST).is_file():
            return path, step
    if all((checkpoint_dir / name).is_file() for name in _FILES):
        progress = _read_json(checkpoint_dir / PROGRESS, checkpoint_dir, checkpoint_dir)
        return checkpoint_dir, progress.get("step") if isinstance(progress, dict) else None
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_incomplete(checkpoint_dir: Path) -> None:
    """Remove what a killed save leaves: hidden temp folders, step folders without a manifest, the hidden temp
    folders of the layout before manifests (`.NAME-*` beside the unit's folder), and an incomplete old-layout set."""
    for leftover in checkpoint_dir.parent.glob(f".{glob.escape(checkpoint_dir.name)}-*"):
        log.warning("%s: removing %s, left by an interrupted checkpoint save", checkpoint_dir, leftover.name)
        _remove(leftover)
    if not checkpoint_dir.is_dir():
        return
    for entry in checkpoint_dir.iterdir():
        if entry.name.startswith(_TMP):
            log.warning("%s: removing %s, left by an interrupted checkpoint save", checkpoint_dir, entry.name)
            _remove(entry)
    for _, path in _step_folders(checkpoint_dir):
        if not (path / MANIFEST).is_file():
            log.warning("%s: removing %s: it has no %s, so it is incomplete", checkpoint_dir, path.name, MANIFEST)
            _remove(path)
    legacy = [checkpoint_dir / name for name in _FILES if (checkpoint_dir / name).is_file()]
    if legacy and len(legacy) < len(_FILES):
        log.warning("%s: removing the incomplete checkpoint %s", checkpoint_dir, [p.name for p in legacy])
        for path in legacy:
            path.unlink(missing_ok=True)


def _save_checkpoint(checkpoint_dir: Path, model, optimizer, scheduler, step: int, total: int, curve: list[dict],
                     identity: dict | None = None) -> Path:
    """Write the checkpoint of `step` as `checkpoint_dir/step-NNNNNNNN/` (atomically), then remove older ones."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=checkpoint_dir, prefix=f"{_TMP}{final.name}-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in bem_state_dict(model).items()}, tmp / WEIGHTS)
        _fsync(tmp / WEIGHTS)
        _crash_point("checkpoint.weights")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER)
        _fsync(tmp / OPTIMIZER)
        _crash_point("checkpoint.optimizer")
        (tmp / PROGRESS).write_text(json.dumps({"step": step, "curve": curve}))
        _fsync(tmp / PROGRESS)
        _crash_point("checkpoint.progress")
        manifest = {"format": CHECKPOINT_FORMAT, "step": step, "total_steps": total, "identity": identity,
                    "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                              for name in _FILES}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        _crash_point("checkpoint.manifest")
        if final.exists():  # the same step saved before (a resumed run): the new copy takes its place
            os.rename(final, tmp.with_name(f"{_TMP}replaced-{final.name}-{tmp.name[-8:]}"))
        os.rename(tmp, final)
        _fsync(checkpoint_dir)
        _crash_point("checkpoint.renamed")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for entry in checkpoint_dir.iterdir():
        m = _STEP.fullmatch(entry.name)
        if (m and int(m.group(1)) != step) or entry.name.startswith(_TMP) or (entry.is_file() and entry.name in _FILES):
            _remove(entry)  # older checkpoints, leftovers, and the files of the layout before manifests
    _fsync(checkpoint_dir)
    _crash_point("checkpoint.cleaned")
    return final


def load_checkpoint(checkpoint_dir: Path, model, optimizer, scheduler, total_steps: int, identity: dict | None = None,
                    clean: bool = True) -> tuple[int, list[dict]] | None:
    """Resume from the newest complete checkpoint of a unit's folder: (step, curve) after loading it into `model`
    (its BEM tensors), `optimizer` and `scheduler`; None when there is none. With `clean` the leftovers of killed
    saves are removed first. The checkpoint is verified completely before anything is loaded; a damaged one, or
    one of another `identity` or step count, is a CheckpointError (never a silent fallback to an older one)."""
    checkpoint_dir = Path(checkpoint_dir)
    if clean:
        _clean_incomplete(checkpoint_dir)
    found = latest_checkpoint(checkpoint_dir)
    if found is None:
        return None
    return _load_checkpoint(found[0], checkpoint_dir, model, optimizer, scheduler, total_steps, identity)


def _read_json(path: Path, folder: Path, checkpoint_dir: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _fail(folder, checkpoint_dir, f"{path}: not readable JSON ({err})") from None


def _fail(folder: Path, checkpoint_dir: Path, what: str) -> CheckpointError:
    """A CheckpointError for a damaged checkpoint, with the fix: which folder to delete and what that resumes from."""
    older = [(s, p) for s, p in _step_folders(checkpoint_dir) if p != folder and (p / MANIFEST).is_file()]
    then = (f"resumes from the previous checkpoint {older[-1][1].name}" if older
            else "starts the unit again from step 0")
    return CheckpointError(f"{what}. The checkpoint is damaged and is not used; deleting {folder} {then}")


def _load_checkpoint(folder: Path, checkpoint_dir: Path, model, optimizer, scheduler, total: int,
                     identity: dict | None = None) -> tuple[int, list[dict]]:
    """Verify the checkpoint in `folder` completely, then load it into model, optimizer and scheduler; returns
    (step, curve). Any damage is a CheckpointError naming the file; nothing is loaded then."""
    legacy = folder == checkpoint_dir
    if legacy:
        log.warning("%s: a checkpoint without a manifest (written before checksums): loading it with every check "
                    "but the checksums", checkpoint_dir)
        step = None
    else:
        manifest = _read_json(folder / MANIFEST, folder, checkpoint_dir)
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
            raise _fail(folder, checkpoint_dir, f"{folder / MANIFEST}: not a checkpoint manifest of format "
                        f"{CHECKPOINT_FORMAT}")
        if identity is not None:
            want = json.loads(json.dumps(identity, sort_keys=True))
            if manifest.get("identity") != want:
                raise CheckpointError(
                    f"{checkpoint_dir}: its checkpoints were written for {manifest.get('identity')}, but this run is "
                    f"{want}; they belong to another unit or data build. Delete the folder {checkpoint_dir} to "
                    "train this unit from step 0")
        if manifest.get("total_steps") != total:
            raise CheckpointError(f"{folder / MANIFEST}: total_steps = {manifest.get('total_steps')!r}, but this "
                                  f"unit trains {total} steps; delete the folder {checkpoint_dir} to train it from "
                                  "step 0")
        step = manifest.get("step")
        if type(step) is not int or not 0 <= step <= total or folder.name != f"step-{step:08d}":
            raise _fail(folder, checkpoint_dir, f"{folder / MANIFEST}: step = {step!r}, expected the folder's step "
                        f"within [0, {total}]")
        files = manifest.get("files")
        if not isinstance(files, dict) or set(files) != set(_FILES):
            raise _fail(folder, checkpoint_dir, f"{folder / MANIFEST}: lists files {sorted(files or [])}, expected "
                        f"{sorted(_FILES)}")
        for name in _FILES:
            path, want = folder / name, files[name]
            if not path.is_file():
                raise _fail(folder, checkpoint_dir, f"{path}: missing")
            size, digest = path.stat().st_size, _sha256(path)
            if not isinstance(want, dict) or (size, digest) != (want.get("bytes"), want.get("sha256")):
                raise _fail(folder, checkpoint_dir, f"{path}: sha256 {digest} ({size} bytes) differs from the "
                            f"manifest's {want.get('sha256') if isinstance(want, dict) else want!r} "
                            f"({want.get('bytes') if isinstance(want, dict) else '?'} bytes)")
    progress = _read_json(folder / PROGRESS, folder, checkpoint_dir)
    if not isinstance(progress, dict) or not isinstance(progress.get("curve"), list):
        raise _fail(folder, checkpoint_dir, f"{folder / PROGRESS}: expected {{'step': int, 'curve': list}}")
    got, curve = progress.get("step"), progress["curve"]
    if type(got) is not int or not 0 <= got <= total or (step is not None and got != step):
        raise _fail(folder, checkpoint_dir, f"{folder / PROGRESS}: step = {got!r}, expected "
                    + (f"{step}, the manifest's" if step is not None else f"an integer within [0, {total}]"))
    step = got
    if len(curve) != step:
        raise _fail(folder, checkpoint_dir, f"{folder / PROGRESS}: the curve has {len(curve)} rows at step {step}; "
                    "expected one per step")
    for i, row in enumerate(curve):
        if (not isinstance(row, dict) or row.get("step") != i + 1
                or not all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in ("loss", "lr"))):
            raise _fail(folder, checkpoint_dir, f"{folder / PROGRESS}: curve row {i} is {row!r}, expected step "
                        f"{i + 1} with a finite loss and lr")

    path = folder / WEIGHTS
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors' own error type for a malformed file
        raise _fail(folder, checkpoint_dir, f"{path}: not a readable safetensors file ({err})") from None
    own = bem_state_dict(model)
    try:
        _check_tensors(path, weights, own)
    except CheckpointError as err:
        raise _fail(folder, checkpoint_dir, str(err)) from None

    path = folder / OPTIMIZER
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # the weights-only unpickler refuses anything but tensors and plain containers
        raise _fail(folder, checkpoint_dir, f"{path}: not a readable weights-only state ({err})") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler"} <= set(state):
        raise _fail(folder, checkpoint_dir, f"{path}: expected a dict with 'optimizer' and 'scheduler'")
    _check_optimizer_state(folder, checkpoint_dir, path, state["optimizer"], optimizer)

    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(weights[key])
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as err:
        raise _fail(folder, checkpoint_dir, f"{path}: does not fit this optimizer ({err})") from None
    return step, curve


def _check_optimizer_state(folder: Path, checkpoint_dir: Path, path: Path, saved, optimizer) -> None:
    """The saved AdamW state has this optimizer's groups and parameter counts, each moment the parameter's shape,
    and only finite values."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(saved.get("state"), dict):
        raise _fail(folder, checkpoint_dir, f"{path}: no optimizer 'state' and 'param_groups'")
    own = optimizer.param_groups
    sizes, want = [len(g.get("params", ())) for g in groups], [len(g["params"]) for g in own]
    if sizes != want:
        raise _fail(folder, checkpoint_dir, f"{path}: optimizer groups hold {sizes} parameters, this model's {want}")
    params = {index: p for g, mine in zip(groups, own) for index, p in zip(g["params"], mine["params"])}
    for index, entry in saved["state"].items():
        if index not in params or not isinstance(entry, dict):
            raise _fail(folder, checkpoint_dir, f"{path}: optimizer state for unknown parameter {index!r}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and tuple(value.shape) != tuple(params[index].shape):
                raise _fail(folder, checkpoint_dir, f"{path}: optimizer {key} of parameter {index} has shape "
                            f"{tuple(value.shape)}, the parameter's is {tuple(params[index].shape)}")
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise _fail(folder, checkpoint_dir, f"{path}: optimizer {key} of parameter {index} is not finite")


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
               stop_after: int | None = None, identity: dict | None = None,
               init: dict[str, torch.Tensor] | None = None, hooks=None) -> TrainedUnit:
    """Train the experiment's modules for one seed; resume from the newest complete checkpoint in `checkpoint_dir`.

    `identity` (JSON-able, e.g. the config hash and data build) is stored in every checkpoint's manifest; resuming
    from a checkpoint of another identity is a CheckpointError. A damaged newest checkpoint is a CheckpointError
    too (never a silent fallback). `stop_after` ends the loop early (after saving a checkpoint) — used to test
    resumption. `init` (site tensors by `bem_state_dict` name, `training.init_bank`): the sites start from them and
    stay frozen, so only the controller trains. `hooks` (bem.safety.SafetyHooks): its `examples` replace the
    config's, `prepare(model)` runs once after the sites are attached (and after a resume), `after_step(model)` after
    every optimizer step.
    """
    from accelerate import Accelerator

    tc = config.training
    seed_everything(seed)
    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    if init is not None:
        from bem.router.experiment import load_sites

        load_sites(model, init)
        for layer in bem_layers(model).values():
            layer.requires_grad_(False)
    elif config.training.init_bank is not None:
        raise ValueError(f"{config.source}: training.init_bank = {config.training.init_bank!r} needs the bank's weights "
                         "(train_unit(init=...)); the runner passes them")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # each unit sets its own precision; the process group (PartialState) stays
    accelerator = Accelerator(mixed_precision="bf16" if resolve(tc.precision) == "bf16" else "no",
                              gradient_accumulation_steps=tc.grad_accum)
    optimizer = build_optimizer(model, tc)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(tc.warmup_steps, tc.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start, curve, checkpoint_dir = 0, [], Path(checkpoint_dir)
    resumed = load_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler, tc.steps,
                              identity, clean=accelerator.is_main_process)
    if resumed is not None:
        start, curve = resumed
        log.info("%s seed %d: resumed from step %d", config.name, seed, start)
    if hooks is not None:
        hooks.prepare(accelerator.unwrap_model(model))
    # a unit resumed at its last step trains no more and needs no data
    examples = ((hooks.examples() if hooks is not None else training_examples(config, data_root))
                if start < tc.steps else [])
    if not examples and start < tc.steps:
        raise ValueError(f"{config.source}: no task of {config.tasks} has training targets")
    rows = encode_cached(tokenizer, examples, tc.max_length)
    schedule = BatchSchedule([len(r) for r in rows], tc.batch_size, seed, tc.batching) if rows else None
    world, rank = accelerator.num_processes, accelerator.process_index  # DDP: each rank takes its own micro-batches
    head = accelerator.unwrap_model(model).get_output_embeddings()

    model.train()
    bar = tqdm(range(start, tc.steps), desc=f"train {config.name} s{seed}", unit="step", initial=start, total=tc.steps)
    for step in bar:
        losses = []
        for micro in range(tc.grad_accum):
            batch = pad_batch([rows[i] for i in schedule((step * tc.grad_accum + micro) * world + rank)],
                              tokenizer.pad_token_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                loss = target_loss(model, batch, head)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{config.name} seed {seed}: loss is {loss.item()} at step {step}; "
                                           "the unit stops and writes no scores")
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm) if accelerator.sync_gradients else None
                optimizer.step()
                scheduler.step()  # the prepared scheduler only advances when gradients sync
                optimizer.zero_grad()
                if hooks is not None and accelerator.sync_gradients:
                    hooks.after_step(accelerator.unwrap_model(model))
            losses.append(loss.item())
        curve.append({"step": step + 1, "loss": float(np.mean(losses)), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else math.nan})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 or done == tc.steps or done == stop_after:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                _save_checkpoint(checkpoint_dir, accelerator.unwrap_model(model), optimizer, scheduler, done,
                                 tc.steps, curve, identity)
        if done == stop_after:
            break
    model = accelerator.unwrap_model(model)
    model.eval()
    return TrainedUnit(model, tokenizer, curve, start, accelerator.is_main_process)
