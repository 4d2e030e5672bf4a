"""BEMConfig: the options of the module and its controller, validated at the edge."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from bem.errors import BEMError

CONTROLLERS = ("static", "prefix", "chunk")
PREFIX_SCOPES = ("prompt", "chunk")


class BEMConfigError(BEMError, ValueError):
    """A BEM option has a value that is not allowed; the message names the field and what is allowed.
    `field`, `value` and `allowed` say the same for callers that name the field their own way."""

    def __init__(self, message: str, hint: str = "", field: str | None = None, value: Any = None, allowed: str = ""):
        super().__init__(message, hint)
        self.field, self.value, self.allowed = field, value, allowed


class Limit(NamedTuple):
    """Allowed range of a numeric option: low..high (low itself excluded when `low_open`)."""

    low: int | float
    high: int | float | str
    """The largest value, or the (dotted) name of the option that bounds this one."""
    meaning: str
    """What the number counts or means (its unit)."""
    low_open: bool = False
    null: str = ""
    """What null means, for options that may be null ("" : null is not allowed)."""

    def interval(self) -> str:
        """E.g. `[1, 4096]`, `(0, 1]`, `[0, training.steps]`."""
        return f"{'(' if self.low_open else '['}{self.low}, {self.high}]"

    def allows(self, value: Any, bound: int | float | None = None) -> bool:
        """Whether `value` is a finite number (never a bool) in range; `bound` is the value of a named `high`."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        high = self.high if bound is None else bound
        return (value > self.low if self.low_open else value >= self.low) and (isinstance(high, str) or value <= high)

    def text(self, integer: bool, bound: int | float | None = None) -> str:
        """What is allowed, in words, for error messages."""
        kind = "an integer" if integer else "a number"
        if isinstance(self.high, str):
            low = f"{self.low} < k" if self.low_open else f"{self.low} <= k"
            shown = self.high if bound is None else f"{self.high} ({bound})"
            out = f"{kind} k with {low} <= {shown} ({self.meaning})"
        else:
            out = f"{kind} {'>' if self.low_open else '>='} {self.low} and <= {self.high} ({self.meaning})"
        return out + (f", or null ({self.null})" if self.null else "")


SIDE_PROJECTORS = (None, "linear", "mlp2x_gelu")
LIMITS: dict[str, Limit] = {
    "rank": Limit(1, 4096, "basis directions per site"),
    "alpha": Limit(0, 65536, "scale numerator: s = alpha / rank", low_open=True),
    "chunk_size": Limit(1, 65536, "tokens per chunk"),
    "hysteresis_tau": Limit(0, 100, "RMS code change needed to switch codes; 0 = always switch"),
    "read_layer": Limit(0, 4096, "hidden state the controller reads: 0 = token embeddings, k = output of block k-1"),
    "side_dim": Limit(0, 65536, "width of the side-input vector; 0 = none"),
    "controller_hidden": Limit(1, 65536, "hidden width of the controller MLP"),
    "tau_sigma": Limit(0, 1_000_000, "trust region on the spectral norm of each example's ΔW", low_open=True, null="off"),
    "tau_fro": Limit(0, 1_000_000, "trust region on the Frobenius norm of each example's ΔW", low_open=True, null="off"),
    "layers": Limit(0, 4095, "block index", null="every block"),
    "head_groups": Limit(0, 4096, "head groups per gated site; 0 = off"),
    "dynamic_rank": Limit(1, "rank", "directions kept per example and chunk", null="off"),
    "kron_factor": Limit(1, 65536, "rows, columns of each A factor"),
    "kron_terms": Limit(1, 4096, "Kronecker terms per site", null="rank"),
    "film": Limit(0, 65536, "FiLM channel groups per block; 0 = off"),
    "film_gamma_max": Limit(0, 100, "clamp on |γ − 1|", low_open=True),
    "film_beta_max": Limit(0, 100, "clamp on |β|", low_open=True),
    "experts": Limit(1, "rank", "blocks (experts) the r directions are split into; 1 = no bank"),
    "max_switches": Limit(0, 65536, "chunk-code switches allowed per sequence", null="unlimited"),
}
"""Allowed ranges of BEMConfig's numeric options (of each element, for the lists `layers` and
`kron_factor`); `bem.experiments.config.LIMITS` holds them too, under `bem.`."""

_SITES = "a layer-name suffix or a list of non-empty suffixes such as ['o_proj', 'down_proj']"
RULES: dict[str, str] = {
    "sites": _SITES.replace("a list", "a non-empty list"),
    "head_gate_sites": _SITES + " (used when head_groups > 0)",
    "kron_sites": _SITES + "; [] = off",
    "layers": f"null (every block) or a non-empty list of distinct block indices, each an integer in {LIMITS['layers'].interval()}",
    "gate_features": "[] (off) or a list of distinct indices into the side vector, each an integer in "
                     "[0, side_dim - 1]; needs head_groups > 0",
    "kron_factor": f"null or [rows, columns] of each A factor, two integers in {LIMITS['kron_factor'].interval()}; "
                   "required when kron_sites is set",
}
"""What is allowed for BEMConfig's list options, in words (used in messages and docs/configuration.md)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(source: str, name: str, value: Any, allowed: str) -> None:
    where = f"{source}: " if source else ""
    raise BEMConfigError(f"{where}BEMConfig.{name} = {value!r} is not allowed; expected {allowed}",
                         field=name, value=value, allowed=allowed)


def _check(source: str, name: str, value: Any, integer: bool, bound: int | float | None = None) -> None:
    """`value` within LIMITS[name] (None where the limit allows null), else a BEMConfigError."""
    limit = LIMITS[name]
    if value is None and limit.null:
        return
    if not limit.allows(value, bound) or (integer and not _is_int(value)):
        _fail(source, name, value, limit.text(integer, bound))


@dataclass
class BEMConfig:
    """Options of the module y = W0 x + s·U diag(c ⊙ m) Vᵀ x and of the controller that makes c."""

    rank: int = 8
    """r, the number of basis directions per site."""
    alpha: float = 16.0
    """Scale numerator: s = alpha / rank (LoRA's convention)."""
    sites: tuple[str, ...] = ("o_proj", "down_proj")
    """Name suffixes of the linear layers to wrap (`o_proj`, `down_proj`; GPT-2: `attn.c_proj`, `mlp.c_proj`)."""
    controller: Literal["static", "prefix", "chunk"] = "chunk"
    """static: c ≡ 1 (plain LoRA). prefix: one code per sequence from the prompt.
    chunk: prefix code for the prompt, then a new code every `chunk_size` tokens from earlier tokens."""
    prefix_scope: Literal["prompt", "chunk"] = "prompt"
    """prompt: all prompt tokens share the code read from the whole prompt.
    chunk: the prompt is cut into chunks too, so shared leading chunks get identical codes (KV reuse)."""
    chunk_size: int = 32
    """N, tokens per chunk."""
    hysteresis_tau: float = 0.0
    """τ: a new chunk code replaces the current one only if their RMS difference exceeds τ."""
    read_layer: int = 0
    """Hidden state the controller pools: 0 = token embeddings, k = output of block k-1.
    Sites in blocks before `read_layer` run before the controller reads and use c ≡ 1."""
    side_dim: int = 0
    """Width of the optional per-example side-input vector (retrieval evidence, image features)."""
    controller_hidden: int = 64
    """Hidden width of the controller MLP."""
    side_projector: Literal["linear", "mlp2x_gelu"] | None = None
    """How side inputs enter the controller. None: concatenated as they are to the summary (the controller's first
    layer is then a linear projector of them). 'linear' or 'mlp2x_gelu' (LLaVA's projectors): LayerNorm, then one
    linear layer, or linear-GELU-linear, to `controller_hidden` channels before the concatenation. For wide image
    features (easy_vqa: 1280 EfficientNet-Lite0 channels)."""
    tau_sigma: float | None = None
    """Trust region on the spectral norm of each example's ΔW (None: off)."""
    tau_fro: float | None = None
    """Trust region on the Frobenius norm of each example's ΔW (None: off)."""
    layers: tuple[int, ...] | None = None
    """Block indices that get sites (None: every block)."""
    # --- v1.3 performance variants (SPEC §3); all off by default, all compose ---------------------
    head_groups: int = 0
    """PT1: split the input of each head-gated site (the attention output projection) into this many
    groups of whole heads, each scaled by its own gate 2σ(z) ∈ (0, 2) from the controller (0: off)."""
    head_gate_sites: tuple[str, ...] = ("o_proj", "attn.c_proj")
    """Site suffixes whose input is split by head groups when head_groups > 0."""
    dynamic_rank: int | None = None
    """PT2/V1: keep the top-k of the r directions per example and chunk (a k-hot mask, straight-through
    estimator; GEMM shapes stay rank r). None: off. Sites with t terms keep max(1, round(k·t/r))."""
    gate_features: tuple[int, ...] = ()
    """V2: indices into the side vector of the evidence features (margin, entropy, agreement) that shape
    PT1's gates, with a learned temperature per head group; computed once per sequence. (): off."""
    kron_sites: tuple[str, ...] = ()
    """PT3/V3: site suffixes whose update is ΔW = s · Σ_t c_t (A_t ⊗ B_t) instead of U diag(c) Vᵀ."""
    kron_factor: tuple[int, int] | None = None
    """(rows, columns) of each A_t; B_t is (d_out/rows) × (d_in/columns). Must divide the site's shape."""
    kron_terms: int | None = None
    """Number of Kronecker terms t at Kronecker sites (None: rank)."""
    film: int = 0
    """PT4/V4: residual FiLM on every block after read_layer with this many channel groups:
    out = h + γ ⊙ (block(h) − h) + β, γ = 1 + γ_max·tanh(z), β = β_max·tanh(z'), identity at init (0: off)."""
    film_gamma_max: float = 0.5
    """Clamp |γ − 1| ≤ this."""
    film_beta_max: float = 0.5
    """Clamp |β| ≤ this."""
    # --- expert bank and router (SPEC §1, §4) ------------------------------------------------------
    experts: int = 1
    """E: the r directions of every site split into E consecutive blocks of r/E ("experts"); a code or mask
    that is non-zero on one block selects that expert (bem.experts). 1: no bank. Must divide rank."""
    max_switches: int | None = None
    """Plan limit: at most this many accepted chunk-code switches per sequence (the router's is 3); None: no limit."""
    source: str = field(default="", compare=False, repr=False)
    """Where this config came from (file name), used in error messages only."""

    def __post_init__(self) -> None:
        src = self.source
        for name in ("sites", "head_gate_sites", "kron_sites"):
            value = getattr(self, name)
            names = (value,) if isinstance(value, str) else value
            if (not isinstance(names, (list, tuple)) or not all(isinstance(s, str) and s for s in names)
                    or (name == "sites" and not names)):
                _fail(src, name, value, RULES[name])
            setattr(self, name, tuple(names))
        if not isinstance(self.gate_features, (list, tuple)):
            _fail(src, "gate_features", self.gate_features, RULES["gate_features"])
        self.gate_features = tuple(self.gate_features)
        if self.kron_factor is not None:
            if (not isinstance(self.kron_factor, (list, tuple)) or len(self.kron_factor) != 2
                    or not all(_is_int(v) and LIMITS["kron_factor"].allows(v) for v in self.kron_factor)):
                _fail(src, "kron_factor", self.kron_factor, RULES["kron_factor"])
            self.kron_factor = tuple(self.kron_factor)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)):
                _fail(src, "layers", self.layers, RULES["layers"])
            self.layers = tuple(self.layers)
        self.validate()

    def validate(self) -> None:
        src = self.source
        _check(src, "rank", self.rank, integer=True)
        _check(src, "alpha", self.alpha, integer=False)
        if not self.sites or not all(isinstance(s, str) and s for s in self.sites):
            _fail(src, "sites", self.sites, RULES["sites"])
        if self.controller not in CONTROLLERS:
            _fail(src, "controller", self.controller, f"one of {CONTROLLERS}")
        if self.prefix_scope not in PREFIX_SCOPES:
            _fail(src, "prefix_scope", self.prefix_scope, f"one of {PREFIX_SCOPES}")
        if self.controller == "prefix" and self.prefix_scope == "chunk":
            _fail(src, "prefix_scope", self.prefix_scope,
                  "'prompt' when controller='prefix' (chunked prompts need controller='chunk')")
        for name in ("chunk_size", "read_layer", "side_dim", "controller_hidden"):
            _check(src, name, getattr(self, name), integer=True)
        if self.side_projector not in SIDE_PROJECTORS:
            _fail(src, "side_projector", self.side_projector, f"one of {list(SIDE_PROJECTORS)} (null: concatenate as is)")
        if self.side_projector is not None and not self.side_dim:
            _fail(src, "side_projector", self.side_projector, "null when side_dim is 0 (there is nothing to project)")
        for name in ("hysteresis_tau", "tau_sigma", "tau_fro"):
            _check(src, name, getattr(self, name), integer=False)
        if self.layers is not None and (
                not self.layers or not all(_is_int(i) and LIMITS["layers"].allows(i) for i in self.layers)
                or len(set(self.layers)) != len(self.layers)):
            _fail(src, "layers", list(self.layers), RULES["layers"])
        self._validate_variants()

    def _validate_variants(self) -> None:
        src, routed = self.source, self.controller != "static"
        for name in ("head_groups", "kron_terms", "film"):
            _check(src, name, getattr(self, name), integer=True)
        _check(src, "dynamic_rank", self.dynamic_rank, integer=True, bound=self.rank)
        _check(src, "experts", self.experts, integer=True, bound=self.rank)
        if self.rank % self.experts:
            _fail(src, "experts", self.experts, f"a divisor of rank = {self.rank} (each expert gets rank / experts "
                  "directions)")
        _check(src, "max_switches", self.max_switches, integer=True)
        for name in ("film_gamma_max", "film_beta_max"):
            _check(src, name, getattr(self, name), integer=False)
        if (not all(_is_int(i) and 0 <= i < self.side_dim for i in self.gate_features)
                or len(set(self.gate_features)) != len(self.gate_features)):
            _fail(src, "gate_features", list(self.gate_features), f"{RULES['gate_features']} (side_dim = {self.side_dim})")
        needs_controller = {"head_groups": self.head_groups > 0, "dynamic_rank": self.dynamic_rank is not None,
                            "gate_features": bool(self.gate_features), "film": self.film > 0}
        for name, used in needs_controller.items():
            if used and not routed:
                _fail(src, name, getattr(self, name), "its default when controller='static' (this variant is "
                      "driven by the controller)")
        if self.gate_features and self.head_groups == 0:
            _fail(src, "gate_features", list(self.gate_features), "[] unless head_groups > 0 (V2 shapes PT1's gates)")
        if self.kron_sites:
            if self.kron_factor is None:
                _fail(src, "kron_factor", self.kron_factor, RULES["kron_factor"])
            if self.tau_sigma is not None:
                _fail(src, "tau_sigma", self.tau_sigma, "null when kron_sites is set (Kronecker sites support tau_fro only)")

    @property
    def kron_width(self) -> int:
        """Number of Kronecker terms (the code width) at a Kronecker site."""
        return self.kron_terms if self.kron_terms is not None else self.rank

    @property
    def scaling(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        for name in ("sites", "head_gate_sites", "kron_sites", "gate_features"):
            d[name] = list(getattr(self, name))
        d["kron_factor"] = None if self.kron_factor is None else list(self.kron_factor)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> "BEMConfig":
        if not isinstance(data, dict):
            raise BEMConfigError(f"{source or 'BEMConfig'}: expected a mapping of options, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"source"}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            where = f"{source}: " if source else ""
            raise BEMConfigError(f"{where}unknown BEMConfig field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**data, source=source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
