"""Experiment configs: YAML files under `experiments/`, with `base:` inheritance, loaded into typed objects.

Every error names the file, the field (as a dotted path), the bad value and what is allowed; an unknown
key is an error, never ignored. The allowed ranges are `LIMITS`, the other rules `RULES`; docs/configuration.md
is `schema_markdown()`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bem.module.config import LIMITS as BEM_LIMITS
from bem.module.config import RULES as BEM_RULES
from bem.module.config import BEMConfig, BEMConfigError, Limit
from bem.errors import BEMError

# $BEM_EXPERIMENTS, else the repository's experiments/ folder
EXPERIMENTS_DIR = Path(os.environ.get("BEM_EXPERIMENTS") or Path(__file__).resolve().parents[3] / "experiments")
TASK_NAMES = ("wordnet_qa", "bible_translate", "wordnet_define", "json_format", "easy_vqa", "safety")
MAX_SEEDS = 100
"""Most seeds (units) one experiment may list."""


class ConfigError(BEMError, ValueError):
    """A config file has a field that is missing, unknown or of a value that is not allowed."""


LIMITS: dict[str, Limit] = {
    "seeds": Limit(0, 2**31 - 1, "random seed of one unit"),
    "training.steps": Limit(1, 1_000_000, "optimizer steps"),
    "training.batch_size": Limit(1, 4096, "examples per micro-batch"),
    "training.grad_accum": Limit(1, 1024, "micro-batches per optimizer step"),
    "training.lr": Limit(0, 1, "peak learning rate of AdamW", low_open=True),
    "training.controller_lr": Limit(0, 1, "peak learning rate of the controller's parameters", low_open=True,
                                    null="the controller trains at training.lr"),
    "training.weight_decay": Limit(0, 1, "AdamW weight decay"),
    "training.warmup_steps": Limit(0, "training.steps", "optimizer steps of linear warm-up"),
    "training.max_grad_norm": Limit(0, 10_000, "global L2 norm gradients are clipped to", low_open=True),
    "training.checkpoint_every": Limit(1, 1_000_000, "optimizer steps between resumable checkpoints"),
    "training.max_length": Limit(8, 32768, "tokens per training example, prompt + target"),
    "training.train_items": Limit(1, 10_000_000, "training items per task"),
    "evaluation.items": Limit(1, 100_000, "test items per task"),
    "evaluation.batch_size": Limit(1, 4096, "prompts per generation batch"),
    "evaluation.swap_seeds": Limit(1, MAX_SEEDS, "first seeds also evaluated under the index-swap conditions",
                                   null="every seed"),
    "gates.latency_ratio": Limit(1, 10, "decode p50 latency allowed, × the anchor's"),
    "gates.memory_ratio": Limit(1, 10, "peak memory allowed, × the anchor's"),
    "gates.parity_tolerance": Limit(0, 0.25, "largest |ratio − 1| of added parameters and FLOPs/token to the anchor's"),
    "gates.alpha": Limit(0, 0.5, "Benjamini–Hochberg false discovery rate", low_open=True),
    "router.hidden": Limit(1, 65536, "hidden width of the policy MLP"),
    "router.tau": Limit(0, 100, "log-probability gain needed to switch actions; 0 = switch to any better action"),
    "router.budgets": Limit(0, 1, "fraction of an expert's directions kept on", low_open=True),
    "router.scales": Limit(0, 100, "scale of the code", low_open=True),
    "router.switch_cost": Limit(0, 10, "λ: reward lost per switch"),
    "router.train_mixed": Limit(0, 100_000, "train episodes of the mixed stream"),
    "router.train_composite": Limit(0, 100_000, "train composite episodes"),
    "router.test_mixed": Limit(0, 100_000, "test episodes of the mixed stream"),
    "router.test_composite": Limit(0, 100_000, "test composite episodes"),
    "router.bc_epochs": Limit(1, 1_000_000, "epochs of behaviour cloning"),
    "router.bc_lr": Limit(0, 1, "Adam learning rate of behaviour cloning", low_open=True),
    "router.pg_updates": Limit(0, 100_000, "trust-region updates of AR1"),
    "router.pg_episodes": Limit(1, 100_000, "episodes rolled out per update"),
    "router.pg_lr": Limit(0, 1, "Adam learning rate of AR1", low_open=True),
    "router.target_kl": Limit(0, 1, "KL(π_old ‖ π_new) allowed per update", low_open=True),
    "router.clip_coef": Limit(0, 1, "PPO's ε: ratios clipped to [1 − ε, 1 + ε]", low_open=True),
    "router.ent_coef": Limit(0, 1, "entropy bonus β"),
    "router.update_epochs": Limit(1, 1000, "passes over an update's decisions"),
    "router.rollout_batch": Limit(1, 4096, "episodes per generation batch"),
    "online.delay": Limit(0, 1_000_000, "requests between a request and its feedback"),
    "online.batch": Limit(1, 4096, "requests per serving step"),
    "online.lr": Limit(0, 1, "AdamW learning rate of the online learners", low_open=True),
    "online.update_batch": Limit(1, 4096, "feedback examples per online gradient step"),
    "online.ewc": Limit(0, 1e9, "λ of the EWC penalty"),
    "online.prox": Limit(0, 1e9, "μ of the proximal term"),
    "online.replay": Limit(1, 1_000_000, "examples kept in the replay reservoir"),
    "online.replay_share": Limit(0, 0.9, "share of a shadow update drawn from replay"),
    "online.fisher_items": Limit(1, 100_000, "replayed examples the Fisher is estimated on"),
    "online.canary_items": Limit(2, 100_000, "canary items per task"),
    "online.watch_items": Limit(2, 100_000, "watch items per task"),
    "online.check_every": Limit(1, 1_000_000, "feedback items between scheduled canary checks"),
    "online.delta": Limit(0, 0.25, "total false-promotion risk δ over the stream", low_open=True),
    "online.max_checks": Limit(1, 100_000, "canary checks planned (Bonferroni)"),
    "online.false_alarms": Limit(0, 10_000, "false alarms per 10,000 stable items allowed", low_open=True),
    "online.calibration_items": Limit(8, 100_000, "stable scores the detectors are calibrated on"),
    "online.phases[].items": Limit(1, 10_000_000, "requests in a phase"),
    "online.phases[].weights": Limit(0, 1e6, "mixture weight of a task", low_open=True, null="equal weights"),
    "online.phases[].feedback": Limit(0, 1, "fraction of requests with feedback"),
    "online.phases[].noise": Limit(0, 1, "fraction of a reference's words replaced"),
    "safety.block_rank": Limit(1, 4096, "directions of the safety block at every site"),
    "safety.k": Limit(1, 64, "replies sampled per safety train prompt (best-of-k targets)"),
    "safety.prompts": Limit(1, 1_000_000, "safety train prompts given targets", null="all of the train split"),
    "safety.guard_items": Limit(0, 1_000_000, "wordnet_qa train items trained with the block on (the guard)"),
    "safety.temperature": Limit(0, 10, "sampling temperature of the best-of-k replies", low_open=True),
    "safety.top_p": Limit(0, 1, "nucleus of the best-of-k sampling", low_open=True),
    "safety.knobs": Limit(0, 100, "a value of the knob λ the curve measures"),
    **{f"bem.{name}": limit._replace(high=f"bem.{limit.high}") if isinstance(limit.high, str) else limit
       for name, limit in BEM_LIMITS.items()},
}
"""Allowed range of every numeric field (of each element, for lists), by dotted name: (low, high, meaning,
low excluded?, what null means). `high` may name the field that bounds it. Numbers must be finite and never
true/false."""

RULES: dict[str, str] = {
    "name": "the file name without .yaml (may be left out)",
    "description": "any text (not part of the config hash)",
    "model": "an embedded model name (bem.models.EMBEDDED) or a local Hugging Face folder holding config.json "
             "(a relative path is read from the working directory); never downloaded",
    "tasks": f"a non-empty list of distinct task names from {TASK_NAMES}",
    "seeds": f"a list of 1..{MAX_SEEDS} distinct integers, each in {LIMITS['seeds'].interval()}",
    "anchor": "null (this is a baseline) or the name of another experiment of the same folder",
    "parity_with": "null (the anchor) or the name of another experiment of the same folder",
    "safety.skill": "an experiment beside this file or a .yaml path: a static LoRA of rank bem.rank − "
                    "safety.block_rank on the same sites, with the same alpha / rank",
    "side_inputs": "true, false, or zeroed (the controller's side-input width kept, zeros fed)",
    "baseline": "null (L0_lora) or the name of the static-LoRA experiment of the same folder that every verdict is "
                "also drawn against",
    **{f"bem.{name}": text for name, text in BEM_RULES.items()},
}
"""What is allowed for the fields that are not numbers (nor a fixed set of values), in words."""


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
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """fp32, or bf16 autocast (BEM's weights and AdamW's state stay fp32); auto: bf16 where the hardware runs it
    natively, else fp32 (bem.precision). Resolved when the config is loaded; the hash holds the resolved value."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N optimizer steps (and at the end)."""
    max_length: int = 256
    """Tokens per training example (prompt + target)."""
    train_items: int = 2000
    """Training items per task (evenly spread through the train split)."""
    init_bank: str | None = None
    """An expert bank's experiment (trained first in the same run folder) whose trained U, V this unit starts from and
    keeps frozen: only the controller trains (the router's end-to-end soft-routing baseline). null: fresh modules."""
    batching: Literal["length", "random"] = "length"
    """How examples are grouped into micro-batches. length: each seeded window of 32 batches' worth of examples is
    sorted by length and cut into batches (shuffled within the window), so little of a batch is padding; every
    example once per epoch. random: consecutive examples of one seeded permutation (how stored results before
    this field were trained; left out of the config hash)."""


@dataclass
class EvalConfig:
    items: int = 200
    """Test items per task."""
    batch_size: int = 16
    split: Literal["test", "dev"] = "test"
    """Split the items are drawn from."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """fp32, or the whole model cast to bf16 for the evaluation (no autocast, no per-call casts); auto as for
    training. Hashed only when bf16 (stored results were evaluated in fp32)."""
    decoding: Literal["auto", "dynamic", "static", "compiled"] = "auto"
    """How replies are decoded (bem.decoding): dynamic (a growing KV cache; rows that ended leave the batch), static (a
    static KV cache of one length per task), compiled (static, the decode step under torch.compile: CUDA graphs on a
    GPU), auto (compiled on a GPU, dynamic on the CPU; routers always dynamic). Greedy replies are the same in every
    mode (tested), so it is not part of the config hash."""
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
class RouterConfig:
    """The agentic router (SPEC §4) over an expert bank; `bem.*` describes the routed model it runs in."""

    algorithm: Literal["bc", "pg"] = "bc"
    """bc: AR0, behaviour cloning of measured oracle traces. pg: AR1, PPO with an exact-KL trust region from AR0."""
    bank: str = "experts_bank"
    """The expert bank's experiment (trained in the same run folder first); its rank, alpha, sites and experts
    must equal this file's `bem.*`."""
    controller: str = "router_controller"
    """The end-to-end baseline's experiment: BEM's chunk controller trained over the frozen bank (soft routing)."""
    multitask: str = "router_multitask_lora"
    """The multi-task LoRA baseline's experiment (a static LoRA of the bank's rank on the union of its tasks)."""
    hidden: int = 64
    """Hidden width of the policy MLP."""
    tau: float = 0.0
    """Hysteresis: switch only if log π(new | s) − log π(now | s) > tau."""
    budgets: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """Rank budgets of the action set: fractions of an expert's directions kept on."""
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5])
    """Scales of the action set."""
    switch_cost: float = 0.02
    """λ: the reward is the mean part score − λ · switches."""
    train_mixed: int = 64
    """Train episodes of the mixed stream (oracle traces, rollouts)."""
    train_composite: int = 64
    """Train episodes with two parts that need different experts."""
    test_mixed: int = 100
    """Test episodes of the mixed stream."""
    test_composite: int = 100
    """Test composite episodes."""
    bc_epochs: int = 300
    """Epochs of behaviour cloning over the oracle states."""
    bc_lr: float = 3e-3
    pg_updates: int = 8
    """AR1: trust-region updates, each on fresh rollouts."""
    pg_episodes: int = 32
    """AR1: train episodes rolled out (sampling actions) per update."""
    pg_lr: float = 1e-3
    target_kl: float = 0.01
    """Trust region: KL(π_old ‖ π_new) ≤ target_kl per update (measured; a step past it is undone)."""
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    update_epochs: int = 4
    rollout_batch: int = 16
    """Episodes per generation batch (one KV cache and routing stream each)."""


@dataclass
class Phase:
    """One phase of the online stream (SPEC §5): its length, its task mixture and what its feedback is like."""

    name: str
    """A label for the report (stable, drift, noise, poisoned, recovery, ...)."""
    items: int
    """Requests in the phase."""
    tasks: list[str]
    """The tasks its requests are drawn from."""
    weights: list[float] | None = None
    """Mixture weights of `tasks` (normalised); null: equal."""
    feedback: float = 0.5
    """Fraction of requests whose reference reply comes back as feedback."""
    noise: float = 0.0
    """Fraction of each feedback reference's words replaced by words of other references (noisy feedback)."""
    poison: bool = False
    """Feedback references shuffled across the phase's requests (wrong references, across tasks)."""


@dataclass
class OnlineConfig:
    """Online shadow mode (SPEC §5, OL): a shadow copy of the live controller learns from delayed feedback while the
    live copy serves; a drift monitor and a canary gate decide promotions; a significant drop rolls back."""

    live: str = "online_live"
    """The experiment whose trained unit serves at the start (trained in the run folder first)."""
    phases: list[Phase] = field(default_factory=list)
    """The stream, in order; its phase boundaries are known, so detection delay and false alarms are measured."""
    delay: int = 32
    """Feedback for request i arrives with request i + delay."""
    batch: int = 32
    """Requests served per step (one generation batch); feedback arriving in it is learnt from after it."""
    lr: float = 1.0e-3
    """AdamW learning rate of the online learners (naive and shadow)."""
    update_batch: int = 8
    """Feedback examples per online gradient step."""
    train_module: bool = False
    """Also learn the sites' U and V online (default: the controller only)."""
    ewc: float = 0.1
    """λ of EWC: (λ/2) Σ F_i (θ_i − θ*_i)², F the per-example (diagonal, empirical) Fisher of the live weights θ*, scaled
    to mean 1. Measured on the controller over the bank: gradients ~7e-3 rms per parameter, trained weights ~0.03 rms;
    λ = 0.1 lets a parameter of average Fisher move ~0.07 before the pull-back matches its gradient (λ = 100 would
    hold it within ~1e-4: no learning)."""
    prox: float = 0.01
    """μ of the proximal term (μ/2) ‖θ − θ_live‖², a weak backstop for the directions the Fisher calls unimportant."""
    replay: int = 256
    """Size of the reservoir replay buffer (seeded with the live unit's training items)."""
    replay_share: float = 0.5
    """Share of each shadow update's examples drawn from the replay buffer."""
    fisher_items: int = 32
    """Replayed examples the per-example Fisher is estimated on (at the start and after each promotion)."""
    canary_items: int = 24
    """Held-out canary items per task (dev split), scored by live and shadow before a promotion."""
    watch_items: int = 24
    """Held-out watch items per task (dev split, disjoint from the canary): after a promotion a drift alarm compares the
    live version with its predecessor there, and a significant drop rolls back."""
    check_every: int = 128
    """Feedback items between scheduled canary checks (a drift alarm also triggers one)."""
    delta: float = 0.05
    """Total risk of a false promotion over the stream; each of `max_checks` canary checks runs at delta / max_checks."""
    max_checks: int = 12
    """Canary checks planned (Bonferroni); after that the shadow is not promoted again."""
    false_alarms: float = 10.0
    """Target false alarms per 10,000 items each drift detector is calibrated to, by simulation on stable scores."""
    calibration_items: int = 128
    """Live scores on stable-phase train items the detectors are calibrated on (resampled into simulated streams)."""


@dataclass
class SafetyConfig:
    """The safety basis (SPEC §5, VC): a block of `block_rank` directions added after the skill unit's, kept orthogonal
    to them, trained towards best-of-k safe replies with the wordnet_qa guard; the knob λ scales it (bem.safety)."""

    skill: str = "vc_skill"
    """The experiment whose trained unit gives the skill block (a static LoRA; trained in the run folder first)."""
    block_rank: int = 8
    """r_s: the safety block's directions per site; bem.rank must be the skill's rank + r_s."""
    k: int = 4
    """Replies sampled from the base model per safety train prompt; the least violating is the target."""
    prompts: int | None = None
    """Safety train prompts given a target (null: all of the split)."""
    guard_items: int = 400
    """wordnet_qa train items trained with the block on, so benign behaviour is kept (the guard)."""
    temperature: float = 1.0
    """Sampling temperature of the best-of-k replies."""
    top_p: float = 0.95
    """Nucleus of the best-of-k sampling."""
    knobs: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0])
    """The knob values the curve measures (λ = 0 is the skill unit alone, the reference of every comparison)."""


@dataclass
class ExperimentConfig:
    name: str
    """Unique name; the file name without .yaml."""
    description: str = ""
    """Free text, shown by `bem list --json`."""
    model: str = "smollm2-135m"
    """Embedded model name or a local Hugging Face folder."""
    bem: BEMConfig = field(default_factory=BEMConfig)
    tasks: list[str] = field(default_factory=lambda: ["wordnet_qa", "bible_translate"])
    """Tasks trained on together and evaluated one by one."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One unit (training run and evaluation) per seed."""
    anchor: str | None = None
    """Experiment every verdict compares against (None: this is a baseline; experiments/_defaults.yaml sets S1_anchor)."""
    parity_with: str | None = None
    """Experiment whose added parameters and FLOPs/token this one must match within
    gates.parity_tolerance (default: the anchor). Baselines with `anchor: null` name it here."""
    side_inputs: bool | Literal["zeroed"] = True
    """Feed each task's side inputs (evidence / image features) to the controller. `zeroed`: the controller keeps its
    side-input width (and projector) but reads zeros in training and evaluation: the same parameters, no side
    information (the text-only controller of the multimodal baselines)."""
    baseline: str | None = None
    """The static-LoRA experiment every verdict is also drawn against, besides the anchor; null: L0_lora. Changes no
    result: not hashed."""
    gates: Gates = field(default_factory=Gates)
    router: RouterConfig | None = None
    """The agentic router over an expert bank (experiments ar0_bc, ar1_pg); null: a module variant."""
    online: OnlineConfig | None = None
    """Online shadow mode over a stream (experiment ol_shadow, `bem online simulate`); null: not an online run."""
    safety: SafetyConfig | None = None
    """The safety basis and its knob (experiment vc_safety, `bem safety curve`); null: no safety block."""
    source: str = field(default="", compare=False, repr=False)
    preset: str | None = field(default=None, compare=False, repr=False)
    """The preset overlay the config was loaded with (`_quick`, `_cpu`, ...), for experiments that load others."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        d.pop("preset")
        d["bem"] = self.bem.to_dict()
        return d

    def config_hash(self) -> str:
        """Hash of everything that changes results (the description does not). Fields added after results were
        stored (`HASH_OPTIONAL`) count only when they differ from what those were trained with, so stored units
        keep their hashes."""
        from bem.precision import resolve

        d = self.to_dict()
        d.pop("description")
        d.pop("seeds")
        d.pop("baseline")  # which experiment verdicts are also drawn against changes no result
        for section in ("router", "online", "safety"):  # added after results were stored
            if d[section] is None:
                d.pop(section)
        for section in ("training", "evaluation"):  # a config built in code may still say auto
            d[section]["precision"] = resolve(d[section]["precision"])
        for (section, key), stored in HASH_OPTIONAL.items():
            if d[section].get(key) == stored:
                d[section].pop(key, None)
        for section, key in HASH_EXCLUDED:
            if section in d:
                d[section].pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# (section, field): the value of a field added after results were stored that those results were trained with;
# the field is hashed only when it differs from it
HASH_OPTIONAL = {("training", "controller_lr"): None, ("training", "batching"): "random",
                 ("evaluation", "precision"): "fp32", ("bem", "experts"): 1, ("bem", "max_switches"): None,
                 ("training", "init_bank"): None, ("bem", "side_projector"): None}
# (section, field) of config fields that change no stored result (how much extra is evaluated; which experiment the
# controller baseline is, added after router results were stored), never hashed
HASH_EXCLUDED = (("evaluation", "swap_seeds"), ("router", "controller"), ("evaluation", "decoding"))


# --- loading ----------------------------------------------------------------------------------------
_UNIONS = (types.UnionType, typing.Union)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in _UNIONS:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp) if f.name != 'source']}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(tp, str(tp))


def _key(where: str) -> str:
    """The LIMITS/RULES key of a dotted field: list elements (`seeds[2]`) share their list's, fields of list elements
    (`online.phases[1].items`) their element type's (`online.phases[].items`)."""
    return re.sub(r"\[\d+\]$", "", re.sub(r"\[\d+\]\.", "[].", where))


def _allowed(tp, where: str) -> str:
    """What `where` (of type `tp`) allows, in words: its limit, its rule, or its type."""
    limit, origin = LIMITS.get(_key(where)), typing.get_origin(tp)
    if origin in _UNIONS:
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if limit is not None and options in ([int], [float]):
            return limit.text(options == [int])
        if where in RULES:
            return RULES[where]
        return " or ".join(_allowed(a, where) for a in options) + " or null"
    if limit is not None and tp in (int, float):
        return limit.text(tp is int)
    if where in RULES:
        return RULES[where]
    return _describe(tp)


def _numeric_text(tp, value) -> str:
    """A hint for a number YAML read as text (YAML 1.1 reads 1e-3 and 1.0e5 as strings, 1.0e-3 and 1.0e+5 as numbers)."""
    if not isinstance(value, str) or not {int, float} & {tp, *typing.get_args(tp)}:
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (YAML reads this as text: write numbers unquoted, an exponent with a dot and a sign, e.g. 1.0e-3, 1.0e+5)"


def _convert(tp, value, where: str, source: str):
    def fail():
        raise ConfigError(f"{source}: {where} = {value!r} is not allowed; expected {_allowed(tp, where)}"
                          + _numeric_text(tp, value))

    origin = typing.get_origin(tp)
    if origin is Literal:
        return value if value in typing.get_args(tp) else fail()
    if origin in _UNIONS:
        if value is None and type(None) in typing.get_args(tp):
            return None
        sections = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and sections:  # an optional section: its own field errors, not "expected … or null"
            return _convert(sections[0], value, where, source)
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
        return _bem(value, where, source) if isinstance(value, dict) else fail()
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if tp is type(None):
        return None if value is None else fail()
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    limit = LIMITS.get(_key(where))
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int if tp is int else (int, float)):
            fail()
        if limit is not None and not limit.allows(value):  # a named upper bound is checked by _check
            fail()
        return value if tp is int else float(value)
    if tp is str:
        return value if isinstance(value, str) else fail()
    raise TypeError(f"unsupported config type {tp}")


def _bem(data: dict, where: str, source: str) -> BEMConfig:
    """The `bem:` mapping as a BEMConfig; its errors name the file and the dotted field."""
    names = [f.name for f in dataclasses.fields(BEMConfig) if f.name != "source"]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {[f'{where}.{u}' for u in unknown]}; allowed: {names}")
    try:
        return BEMConfig.from_dict(data, source=f"{source}: {where}")
    except BEMConfigError as err:
        if err.field is None:
            raise ConfigError(f"{source}: {where}: {err}") from None
        raise ConfigError(f"{source}: {where}.{err.field} = {err.value!r} is not allowed; expected {err.allowed}") from None


def _build(cls, data, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'the file'} must be {_describe(cls)}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "preset")]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{source}: unknown field(s) {[f'{prefix}{u}' for u in unknown]}; allowed: {names}")
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


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first[key])
                first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _read(path: Path) -> Any:
    """The YAML document of `path`: UTF-8 text, no key twice in a mapping."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset {err.start}); "
                          "expected a UTF-8 encoded YAML file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: duplicate key {err.key!r} on line {err.line} (first on line {err.first}); "
                          "expected each key once per mapping") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def _raw(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path.resolve() in [p.resolve() for p in seen]:
        raise ConfigError(f"{path}: base inheritance loops through {[p.name for p in seen]}")
    if not path.is_file():
        if seen:
            raise ConfigError(f"{seen[-1]}: base = {path.stem!r} is not allowed: experiment file {path} does not exist; "
                              f"expected one of {sorted(p.stem for p in path.parent.glob('*.yaml'))}")
        raise ConfigError(f"{path}: experiment file {path} does not exist")
    data = _read(path)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of fields (an experiment needs at least "
                          "`base: _defaults`)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a mapping of fields, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base = {base!r} is not allowed; expected the name of another experiment file")
    return _merge(_raw(path.parent / f"{base}.yaml", seen + (path,)), data)


def load_experiment(name_or_path: str | Path, directory: Path = EXPERIMENTS_DIR,
                    overlay: str | None = None) -> ExperimentConfig:
    """An experiment by name (experiments/<name>.yaml) or path, with its `base:` chain merged in,
    then a preset overlay of the same folder (e.g. `_quick`) merged on top."""
    return _load(name_or_path, directory, overlay, parity=True)


def _load(name_or_path: str | Path, directory: Path, overlay: str | None, parity: bool) -> ExperimentConfig:
    path = Path(name_or_path)
    if path.suffix != ".yaml":
        path = directory / f"{name_or_path}.yaml"
    if path.stem.startswith("_"):
        raise ConfigError(f"{path}: {path.stem} is a base/preset file (merged into experiments), not an experiment; "
                          f"expected one of the experiments {list_experiments(path.parent)}")
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file {path} does not exist; expected one of the experiments "
                          f"{list_experiments(path.parent)}")
    data, source = _raw(path), str(path)
    if overlay is not None:
        presets = list_presets(path.parent)
        if not (isinstance(overlay, str) and overlay.startswith("_") and overlay[1:] in presets):
            raise ConfigError(f"{path}: unknown preset {overlay!r}; expected one of {['_' + p for p in presets]} "
                              f"(the files _NAME.yaml of {path.parent} except _defaults.yaml)")
        preset = _raw(path.parent / f"{overlay}.yaml")
        for section in ("router", "online", "safety"):  # a preset's router: / online: / safety: sizes those only
            if section not in data:
                preset.pop(section, None)
        data = _merge(data, preset)
        source = f"{path} (preset {overlay[1:]})"
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise ConfigError(f"{source}: name = {data['name']!r} is not allowed; expected the file name {path.stem!r} "
                          "(or leave it out)")
    config = _build(ExperimentConfig, data, "", source)
    config.source, config.preset = str(path), overlay
    _check(config, source)
    from bem.precision import resolve

    config.training.precision = resolve(config.training.precision)  # `auto` → what this machine runs natively
    config.evaluation.precision = resolve(config.evaluation.precision)
    if parity:
        _check_references(config, path.parent, source)
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
    reference = _load(name, directory, None, parity=False)  # its own anchor is checked when it is loaded itself
    p_ratio, f_ratio = parity_ratios(config, reference)
    tol = config.gates.parity_tolerance
    if abs(p_ratio - 1) > tol or abs(f_ratio - 1) > tol:
        raise ConfigError(f"{config.source}: budget parity with {name} fails: added parameters ×{p_ratio:.3f}, "
                          f"added FLOPs/token ×{f_ratio:.3f}; both must be within ×{1 - tol:.2f}..×{1 + tol:.2f} "
                          f"(gates.parity_tolerance = {tol}). Change bem.rank, bem.controller_hidden or the variant's size.")


def _check_references(config: ExperimentConfig, directory: Path, source: str) -> None:
    """`anchor`, `parity_with` and `baseline` name experiments of the same folder."""
    experiments = list_experiments(directory)
    for name in ("anchor", "parity_with", "baseline"):
        value = getattr(config, name)
        if value is not None and value not in experiments:
            raise ConfigError(f"{source}: {name} = {value!r} is not allowed; expected null or one of the experiments "
                              f"{experiments}")


def _value(config: ExperimentConfig, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check(config: ExperimentConfig, source: str) -> None:
    """The rules one field's type and range cannot say: lists, names, and fields bounded by other fields."""
    if not config.tasks or len(set(config.tasks)) != len(config.tasks):
        twice = sorted({t for t in config.tasks if config.tasks.count(t) > 1})
        raise ConfigError(f"{source}: tasks = {config.tasks!r} is not allowed; expected {RULES['tasks']}"
                          + (f" ({', '.join(twice)} listed more than once)" if twice else ""))
    for i, task in enumerate(config.tasks):
        if task not in TASK_NAMES:
            raise ConfigError(f"{source}: tasks[{i}] = {task!r} is not allowed; expected one of {TASK_NAMES}")
    if not 1 <= len(config.seeds) <= MAX_SEEDS or len(set(config.seeds)) != len(config.seeds):
        raise ConfigError(f"{source}: seeds = {config.seeds!r} is not allowed; expected {RULES['seeds']}")
    for name, limit in LIMITS.items():
        if isinstance(limit.high, str) and not name.startswith("bem."):  # BEMConfig checks its own
            value, bound = _value(config, name), _value(config, limit.high)
            if value is not None and not limit.allows(value, bound):
                raise ConfigError(f"{source}: {name} = {value!r} is not allowed; expected "
                                  f"{limit.text(isinstance(value, int), bound)}")
    controller_lr = config.training.controller_lr
    if controller_lr is not None and config.bem.controller == "static":
        raise ConfigError(f"{source}: training.controller_lr = {controller_lr!r} is not allowed with bem.controller = "
                          "'static' (no controller to train); expected null")
    if config.router is not None and config.evaluation.decoding in ("static", "compiled"):
        raise ConfigError(f"{source}: evaluation.decoding = {config.evaluation.decoding!r} is not allowed with a router "
                          "(its decisions run per chunk on the host); expected 'auto' or 'dynamic'")
    _check_bank(config, source)
    from bem.models import EMBEDDED, known_base

    if not known_base(config.model):
        raise ConfigError(f"{source}: model = {config.model!r} is not allowed; expected an embedded model name "
                          f"{sorted(EMBEDDED)} or a local Hugging Face folder holding config.json (models are never "
                          "downloaded)")
    from bem.tasks import side_layout, side_width

    if config.side_inputs and config.bem.controller != "static":
        width = side_width(side_layout(config.tasks))
        if config.bem.side_dim != width:
            raise ConfigError(f"{source}: bem.side_dim = {config.bem.side_dim} is not allowed; the side inputs of "
                              f"tasks {config.tasks} are {width} wide (wordnet_qa 5, easy_vqa 1280), or set side_inputs: false")


def _check_bank(config: ExperimentConfig, source: str) -> None:
    """An expert bank (bem.experts > 1) is static, with one trainable task per expert: expert e trains on tasks[e]."""
    experts, controller, tasks = config.bem.experts, config.bem.controller, config.tasks
    if config.training.init_bank is not None:
        _check_named(source, "training.init_bank", config.training.init_bank, Path(source.split(" (preset ")[0]).parent)
    if config.router is not None:
        _check_router(config, source)
        return
    if config.online is not None:
        _check_online(config, source)
    if config.safety is not None:
        _check_safety(config, source)
    if experts == 1:
        return
    if controller != "static" and config.training.init_bank is None:
        raise ConfigError(f"{source}: bem.experts = {experts} is not allowed with bem.controller = {controller!r}; "
                          "expected 1 or bem.controller: static (a bank of one expert per task); a routed bank needs a "
                          "router: section or training.init_bank (a controller over a trained bank)")
    if controller != "static":
        return  # a controller over a trained bank: trained on the union of the tasks, no per-task masks
    if experts != len(tasks):
        raise ConfigError(f"{source}: bem.experts = {experts} is not allowed with {len(tasks)} tasks {tasks}; expected "
                          f"{len(tasks)}: a static bank trains expert e on tasks[e] alone")
    if "safety" in tasks:
        raise ConfigError(f"{source}: tasks[{tasks.index('safety')}] = 'safety' is not allowed in an expert bank "
                          "(bem.experts > 1); expected tasks with training targets (safety has none)")


def _check_router(config: ExperimentConfig, source: str) -> None:
    """A router runs over a bank: a chunk-routed BEM of E > 1 experts with plain sites, over the router's four tasks."""
    from bem.router.env import ROUTER_TASKS

    bem, r = config.bem, config.router
    rules = [("bem.controller", bem.controller, bem.controller == "chunk", "'chunk' (the router decides at chunk boundaries)"),
             ("bem.experts", bem.experts, bem.experts > 1, "an integer > 1 (the bank's experts)"),
             ("tasks", config.tasks, config.tasks == list(ROUTER_TASKS), f"{list(ROUTER_TASKS)} (the bank's experts)"),
             ("router.budgets", r.budgets, bool(r.budgets) and len(set(r.budgets)) == len(r.budgets),
              "a non-empty list of distinct fractions"),
             ("router.scales", r.scales, bool(r.scales) and len(set(r.scales)) == len(r.scales),
              "a non-empty list of distinct numbers")]
    rules += [(f"bem.{name}", getattr(bem, name), not getattr(bem, name), "off (the router's codes are plain expert blocks)")
              for name in ("head_groups", "dynamic_rank", "film", "kron_sites")]
    for split in ("train", "test"):
        mixed, composite = getattr(r, f"{split}_mixed"), getattr(r, f"{split}_composite")
        rules.append((f"router.{split}_mixed", mixed, mixed + composite > 0,
                      f"> 0 when router.{split}_composite is 0 (the router needs {split} episodes)"))
    for field_name, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{source}: {field_name} = {value!r} is not allowed with a router: section; expected {allowed}")
    for field_name in ("bank", "multitask", "controller"):
        _check_named(source, f"router.{field_name}", getattr(r, field_name), Path(source.split(" (preset ")[0]).parent)


def _check_online(config: ExperimentConfig, source: str) -> None:
    """An online stream: phases over the tasks that give feedback, each listed in the experiment's tasks."""
    from bem.online.stream import ONLINE_TASKS

    c = config.online
    if not c.phases:
        raise ConfigError(f"{source}: online.phases = [] is not allowed; expected at least one phase "
                          "(name, items, tasks, ...)")
    for i, phase in enumerate(c.phases):
        where = f"online.phases[{i}]"
        if not phase.tasks or len(set(phase.tasks)) != len(phase.tasks):
            raise ConfigError(f"{source}: {where}.tasks = {phase.tasks!r} is not allowed; expected a non-empty list of "
                              f"distinct tasks from {list(ONLINE_TASKS)}")
        for j, task in enumerate(phase.tasks):
            if task not in ONLINE_TASKS or task not in config.tasks:
                raise ConfigError(f"{source}: {where}.tasks[{j}] = {task!r} is not allowed; expected one of "
                                  f"{[t for t in ONLINE_TASKS if t in config.tasks]} (tasks with a reference reply, "
                                  "listed in the experiment's tasks)")
        if phase.weights is not None and len(phase.weights) != len(phase.tasks):
            raise ConfigError(f"{source}: {where}.weights = {phase.weights!r} is not allowed; expected null or one "
                              f"weight per task ({len(phase.tasks)})")
    names = [p.name for p in c.phases]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: online.phases names {names} are not allowed; expected distinct names")
    _check_named(source, "online.live", c.live, Path(source.split(" (preset ")[0]).parent)


def _check_safety(config: ExperimentConfig, source: str) -> None:
    """The safety basis: a static site of the skill's rank + the block, on the safety prompts and the wordnet_qa guard."""
    c, bem = config.safety, config.bem
    rules = [("bem.controller", bem.controller, bem.controller == "static", "'static' (the knob is the code's mask)"),
             ("bem.experts", bem.experts, bem.experts == 1, "1 (the blocks are the skill's and the safety block)"),
             ("bem.rank", bem.rank, bem.rank > c.block_rank, f"> safety.block_rank = {c.block_rank} (skill + block)"),
             ("tasks", config.tasks, config.tasks == ["safety", "wordnet_qa"], "['safety', 'wordnet_qa'] (the block's "
              "prompts, then the guard)"),
             ("safety.knobs", c.knobs, 0.0 in c.knobs and len(set(c.knobs)) == len(c.knobs),
              "distinct values including 0.0 (the reference of the curve)")]
    rules += [(f"bem.{name}", getattr(bem, name), not getattr(bem, name), "off (plain sites: the blocks are columns)")
              for name in ("head_groups", "dynamic_rank", "film", "kron_sites")]
    for field_name, value, ok, allowed in rules:
        if not ok:
            raise ConfigError(f"{source}: {field_name} = {value!r} is not allowed with a safety: section; expected "
                              f"{allowed}")
    _check_named(source, "safety.skill", c.skill, Path(source.split(" (preset ")[0]).parent)


def _check_named(source: str, field_name: str, name: str, directory: Path) -> None:
    """A field that names another experiment (a name beside this file, or a .yaml path): that file must exist."""
    path = Path(name) if name.endswith(".yaml") else directory / f"{name}.yaml"
    if not path.is_file() or path.stem.startswith("_"):
        raise ConfigError(f"{source}: {field_name} = {name!r} is not allowed; expected an experiment of "
                          f"{directory} ({list_experiments(directory)}) or a .yaml path")


def list_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml") if not p.stem.startswith("_"))


def list_presets(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the preset overlays (`_NAME.yaml`, except the base `_defaults.yaml`): `bem run --preset NAME`."""
    return sorted(p.stem[1:] for p in directory.glob("_*.yaml") if p.stem != "_defaults")


# --- docs/configuration.md ------------------------------------------------------------------------
SECTIONS = (("", ExperimentConfig), ("bem", BEMConfig), ("training", TrainingConfig), ("evaluation", EvalConfig),
            ("gates", Gates), ("router", RouterConfig), ("online", OnlineConfig), ("online.phases[]", Phase),
            ("safety", SafetyConfig))
"""The mappings of an experiment file, in the order docs/configuration.md lists them."""

_INTRO = """# Configuration reference

Every field of an experiment file (`experiments/NAME.yaml`), with its type, what is allowed and its default.
Generated by `bem.experiments.config.schema_markdown()` from the dataclasses and the `LIMITS` and `RULES` tables
the loader checks with; a test keeps this file equal to it. Regenerate with
`python -c "from bem.experiments.config import schema_markdown; print(schema_markdown(), end='')" > docs/configuration.md`.

## Files
- `NAME.yaml` is an experiment; its `name`, if given, must be `NAME`. Files starting with `_` are not
  experiments and cannot be loaded as one: `_defaults.yaml` is the base the shipped experiments name with
  `base: _defaults`, and every other `_NAME.yaml` is a preset merged on top by `bem run --preset NAME`
  (`--quick` is `_quick.yaml`). An unknown preset is an error that lists the allowed ones.
- `base: OTHER` merges `OTHER.yaml` underneath (mappings merge, lists and values replace); a missing base or
  a loop is an error.
- A file is UTF-8 YAML holding a mapping; an empty file, a list, a key given twice in one mapping and an unknown
  key are errors. Every error names the file, the dotted field, the value and what is allowed.
- Numbers are finite (no `.nan`, `.inf`) and never `true`/`false`; an integer field takes integers only (`3.0`
  is not one), a number field takes integers too. YAML reads `1e-3` and `1.0e5` as text: write `1.0e-3`, `1.0e+5`.
- Ranges below are inclusive unless written `(low, high]`; a range bounded by another field (`[0, training.steps]`)
  is checked against that field's value.

## Rules across fields
- `training.controller_lr` must be null when `bem.controller` is `static`.
- `bem.side_dim` must equal the width of the tasks' side inputs (wordnet_qa 5, easy_vqa 1280, in task order)
  unless `side_inputs: false` or `bem.controller: static`.
- An expert bank (`bem.experts` > 1) needs `bem.controller: static` (a routed bank is not supported yet) and
  exactly `bem.experts` tasks, none of them `safety`: expert e trains on `tasks[e]` alone and is evaluated on it
  alone.
- `bem.prefix_scope: chunk` needs `bem.controller: chunk`; `bem.head_groups`, `bem.dynamic_rank`,
  `bem.gate_features` and `bem.film` need a controller (not `static`); `bem.gate_features` needs
  `bem.head_groups > 0`; `bem.kron_sites` needs `bem.kron_factor` and `bem.tau_sigma: null`.
- Budget parity (SPEC §7): added parameters and FLOPs/token within ±`gates.parity_tolerance` of the `anchor`'s (of
  `parity_with`'s for a baseline), checked at load with both ratios in the error.
- Checked when the model is built or a run starts, not at load: `bem.read_layer`, `bem.layers` against the model's
  blocks, site names against its layers, `evaluation.items` against the items of the task's split.
"""


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "string"
    if origin in _UNIONS:
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and Ellipsis not in args:
            return f"list of {len(args)} {_type_name(args[0])}s"
        return f"list of {_type_name(args[0])}s"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}[tp]


def _field_allowed(tp, key: str) -> str:
    limit = LIMITS.get(key)
    if key in RULES:
        return RULES[key]
    if limit is not None:
        return limit.interval() + (" or null" if limit.null else "")
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in typing.get_args(tp))
    return "true or false" if tp is bool else _describe(tp)


def _field_docs(cls) -> dict[str, str]:
    """{field: the docstring under it, on one line} from the source of `cls` ({} where it is unavailable)."""
    import ast
    import inspect
    import textwrap

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError):
        return {}
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            text = " ".join(after.value.value.split())
            docs[node.target.id] = re.sub(r"\bNone\b", "null", text).rstrip(".")
    return docs


def _field_meaning(key: str, doc: str) -> str:
    limit = LIMITS.get(key)
    if limit is None or key in RULES:
        return doc
    return limit.meaning + (f"; null: {limit.null}" if limit.null else "")


def _default(f: dataclasses.Field) -> str:
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "the file name"
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)}`"


def schema_markdown() -> str:
    """docs/configuration.md: every field of every section with its type, allowed values (LIMITS, RULES), unit or
    meaning (LIMITS, else the field's docstring) and default."""
    lines = [_INTRO]
    for section, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        lines += [f"## `{section}:`" if section else "## Top level", ""]
        if section:
            lines += [f"A mapping; keys left out keep their defaults ({cls.__name__}).", ""]
        lines += ["| Field | Type | Allowed | Unit / meaning | Default |", "|---|---|---|---|---|"]
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in ("source", "preset") or (not section and dataclasses.is_dataclass(hints[f.name])):
                continue
            key = f"{section}.{f.name}" if section else f.name
            allowed, meaning = _field_allowed(hints[f.name], key), _field_meaning(key, docs.get(f.name, ""))
            cells = [f"`{key}`", _type_name(hints[f.name]), allowed, meaning, _default(f)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
