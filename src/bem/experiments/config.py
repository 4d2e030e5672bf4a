"""Experiment configs: YAML files under `experiments/`, with `base:` inheritance, loaded into typed objects.

Every error names the file, the field (as a dotted path), the bad value and what is allowed; an unknown
key is an error, never ignored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bem.config import BEMConfig, BEMConfigError

import os

# $BEM_EXPERIMENTS, else the repository's experiments/ folder
EXPERIMENTS_DIR = Path(os.environ.get("BEM_EXPERIMENTS") or Path(__file__).resolve().parents[3] / "experiments")
TASK_NAMES = ("wordnet_qa", "bible_translate", "wordnet_define", "json_format", "easy_vqa", "safety")


class ConfigError(ValueError):
    """A config file has a field that is missing, unknown or of a value that is not allowed."""


@dataclass
class TrainingConfig:
    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    controller_lr: float | None = None
    """Peak learning rate of the controller's parameters (None: `lr`). The controller's heads start at zero and
    their gradient is proportional to the sites' U, which starts at zero too, so at small budgets the codes barely
    leave c ≡ 1; a larger controller rate (as LoRA+ gives B a larger rate than A) lets routing move sooner.
    Same warm-up and decay as `lr`."""
    weight_decay: float = 0.0
    warmup_steps: int = 10
    """Linear warm-up, then linear decay to 0 at `steps`."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    max_length: int = 256
    """Tokens per training example (prompt + target)."""
    train_items: int = 2000
    """Training items per task (evenly spread through the train split)."""


@dataclass
class EvalConfig:
    items: int = 200
    """Test items per task."""
    batch_size: int = 16
    split: Literal["test", "dev"] = "test"
    swap_seeds: int | None = None
    """Evaluate the index-swap conditions (SPEC §6) for the first N seeds of the experiment only (null: every seed).
    Not part of the config hash: it changes no clean score, only how many units also get the swapped conditions."""


@dataclass
class Gates:
    latency_ratio: float = 1.15
    """p50 latency must be ≤ this × the anchor's."""
    memory_ratio: float = 1.05
    parity_tolerance: float = 0.05
    """Added parameters and FLOPs/token within ±this of the anchor's."""
    alpha: float = 0.05
    """Benjamini–Hochberg level."""


@dataclass
class ExperimentConfig:
    name: str
    """Unique name; the file name without .yaml."""
    description: str = ""
    model: str = "smollm2-135m"
    """Embedded model name or a local Hugging Face folder."""
    bem: BEMConfig = field(default_factory=BEMConfig)
    tasks: list[str] = field(default_factory=lambda: ["wordnet_qa", "bible_translate"])
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    anchor: str | None = None
    """Experiment every verdict compares against (None: this is a baseline; experiments/_defaults.yaml sets S1_anchor)."""
    parity_with: str | None = None
    """Experiment whose added parameters and FLOPs/token this one must match within
    gates.parity_tolerance (default: the anchor). Baselines with `anchor: null` name it here."""
    side_inputs: bool = True
    """Feed each task's side inputs (evidence / image features) to the controller."""
    gates: Gates = field(default_factory=Gates)
    source: str = field(default="", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["bem"] = self.bem.to_dict()
        return d

    def config_hash(self) -> str:
        """Hash of everything that changes results (the description does not). Optional fields added after
        results were stored (`HASH_OPTIONAL`) count only when set, so stored units keep their hashes."""
        d = self.to_dict()
        d.pop("description")
        d.pop("seeds")
        for section, key in HASH_OPTIONAL:
            if d[section].get(key) is None:
                d[section].pop(key, None)
        for section, key in HASH_EXCLUDED:
            d[section].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# (section, field) of config fields that default to None and leave the hash unchanged while None
HASH_OPTIONAL = (("training", "controller_lr"),)
# (section, field) of config fields that change no stored result (how much extra is evaluated), never hashed
HASH_EXCLUDED = (("evaluation", "swap_seeds"),)


# --- loading ----------------------------------------------------------------------------------------
def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp) if f.name != 'source']}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(tp, str(tp))


def _convert(tp, value, where: str, source: str):
    def fail():
        raise ConfigError(f"{source}: {where} = {value!r} is not allowed; expected {_describe(tp)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        return value if value in typing.get_args(tp) else fail()
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _convert(option, value, where, source)
            except ConfigError:
                continue
        fail()
    if origin is list:
        if not isinstance(value, list):
            fail()
        return [_convert(typing.get_args(tp)[0], v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if tp is BEMConfig:
        if not isinstance(value, dict):
            fail()
        try:
            return BEMConfig.from_dict(value, source=f"{source}: {where}")
        except BEMConfigError as err:
            raise ConfigError(str(err)) from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is type(None):
        return None if value is None else fail()
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail()
    if tp is str:
        return value if isinstance(value, str) else fail()
    raise TypeError(f"unsupported config type {tp}")


def _build(cls, data, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'the file'} must be {_describe(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: unknown field(s) {[prefix + u for u in unknown]}; allowed: {names}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k, source) for k, v in data.items()}
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        raise ConfigError(f"{source}: missing field(s) {required}")
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: base inheritance loops through {[p.name for p in seen]}")
    if not path.is_file():
        raise ConfigError(f"{seen[-1] if seen else path}: experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of fields, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base = {base!r} is not allowed; expected the name of another experiment file")
    return _merge(_raw(path.parent / f"{base}.yaml", seen + (path,)), data)


def load_experiment(name_or_path: str | Path, directory: Path = EXPERIMENTS_DIR,
                    overlay: str | None = None) -> ExperimentConfig:
    """An experiment by name (experiments/<name>.yaml) or path, with its `base:` chain merged in,
    then an overlay file of the same folder (e.g. `_quick`) merged on top."""
    path = Path(name_or_path)
    if path.suffix != ".yaml":
        path = directory / f"{name_or_path}.yaml"
    data = _raw(path)
    if overlay is not None:
        data = _merge(data, _raw(path.parent / f"{overlay}.yaml"))
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise ConfigError(f"{path}: name = {data['name']!r} must equal the file name {path.stem!r}")
    config = _build(ExperimentConfig, data, "", str(path))
    config.source = str(path)
    _check(config, str(path))
    check_parity(config, path.parent)
    return config


def parity_reference(config: ExperimentConfig) -> str | None:
    reference = config.anchor or config.parity_with
    return None if reference == config.name else reference


def parity_ratios(config: ExperimentConfig, reference: ExperimentConfig) -> tuple[float, float]:
    """(added parameters, added FLOPs/token) of `config` over those of `reference`."""
    from bem.budget import budget

    ours, theirs = budget(config.model, config.bem), budget(reference.model, reference.bem)
    return ours.parameters / theirs.parameters, ours.flops_per_token / theirs.flops_per_token


def check_parity(config: ExperimentConfig, directory: Path) -> None:
    """SPEC §7: added parameters and FLOPs/token within ±tolerance of the reference, or an error with both ratios."""
    name = parity_reference(config)
    if name is None:
        return
    reference = load_experiment(name, directory)
    p_ratio, f_ratio = parity_ratios(config, reference)
    tol = config.gates.parity_tolerance
    if abs(p_ratio - 1) > tol or abs(f_ratio - 1) > tol:
        raise ConfigError(f"{config.source}: budget parity with {name} fails: added parameters ×{p_ratio:.3f}, "
                          f"added FLOPs/token ×{f_ratio:.3f}; both must be within ×{1 - tol:.2f}..×{1 + tol:.2f} "
                          f"(gates.parity_tolerance = {tol}). Change bem.rank, bem.controller_hidden or the variant's size.")


def _check(config: ExperimentConfig, source: str) -> None:
    for i, task in enumerate(config.tasks):
        if task not in TASK_NAMES:
            raise ConfigError(f"{source}: tasks[{i}] = {task!r} is not allowed; expected one of {TASK_NAMES}")
    positive = {"training.steps": config.training.steps, "training.batch_size": config.training.batch_size,
                "training.grad_accum": config.training.grad_accum, "training.checkpoint_every": config.training.checkpoint_every,
                "training.max_length": config.training.max_length, "training.train_items": config.training.train_items,
                "evaluation.items": config.evaluation.items, "evaluation.batch_size": config.evaluation.batch_size}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: {name} = {value!r} is not allowed; expected an integer >= 1")
    if config.evaluation.swap_seeds is not None and config.evaluation.swap_seeds < 1:
        raise ConfigError(f"{source}: evaluation.swap_seeds = {config.evaluation.swap_seeds!r} is not allowed; expected "
                          "an integer >= 1 or null (every seed)")
    if config.training.lr <= 0:
        raise ConfigError(f"{source}: training.lr = {config.training.lr!r} is not allowed; expected a number > 0")
    controller_lr = config.training.controller_lr
    if controller_lr is not None and controller_lr <= 0:
        raise ConfigError(f"{source}: training.controller_lr = {controller_lr!r} is not allowed; expected a number > 0 "
                          "or null (the controller trains at training.lr)")
    if controller_lr is not None and config.bem.controller == "static":
        raise ConfigError(f"{source}: training.controller_lr = {controller_lr!r} is not allowed with bem.controller = "
                          "'static' (no controller to train); expected null")
    from bem.tasks import side_layout, side_width

    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"{source}: seeds = {config.seeds!r} is not allowed; expected a non-empty list of distinct integers")

    if config.side_inputs and config.bem.controller != "static":
        width = side_width(side_layout(config.tasks))
        if config.bem.side_dim != width:
            raise ConfigError(f"{source}: bem.side_dim = {config.bem.side_dim} is not allowed; the side inputs of "
                              f"tasks {config.tasks} are {width} wide (wordnet_qa 5, easy_vqa 1280), or set side_inputs: false")


def list_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml") if not p.stem.startswith("_"))
