"""BEMConfig: the options of the module and its controller, validated at the edge."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

CONTROLLERS = ("static", "prefix", "chunk")
PREFIX_SCOPES = ("prompt", "chunk")


class BEMConfigError(ValueError):
    """A BEM option has a value that is not allowed; the message names the field and what is allowed."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(source: str, name: str, value: Any, allowed: str) -> None:
    where = f"{source}: " if source else ""
    raise BEMConfigError(f"{where}BEMConfig.{name} = {value!r} is not allowed; expected {allowed}")


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
    source: str = field(default="", compare=False, repr=False)
    """Where this config came from (file name), used in error messages only."""

    def __post_init__(self) -> None:
        for name in ("sites", "head_gate_sites", "kron_sites"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, str) else tuple(value))
        self.gate_features = tuple(self.gate_features)
        if self.kron_factor is not None and not isinstance(self.kron_factor, (str, int)):
            self.kron_factor = tuple(self.kron_factor)
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        self.validate()

    def validate(self) -> None:
        src = self.source
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            _fail(src, "rank", self.rank, "an integer >= 1")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            _fail(src, "alpha", self.alpha, "a number > 0")
        if not self.sites or not all(isinstance(s, str) and s for s in self.sites):
            _fail(src, "sites", self.sites, "a non-empty list of layer-name suffixes such as ['o_proj', 'down_proj']")
        if self.controller not in CONTROLLERS:
            _fail(src, "controller", self.controller, f"one of {CONTROLLERS}")
        if self.prefix_scope not in PREFIX_SCOPES:
            _fail(src, "prefix_scope", self.prefix_scope, f"one of {PREFIX_SCOPES}")
        if self.controller == "prefix" and self.prefix_scope == "chunk":
            _fail(src, "prefix_scope", self.prefix_scope,
                  "'prompt' when controller='prefix' (chunked prompts need controller='chunk')")
        if not isinstance(self.chunk_size, int) or isinstance(self.chunk_size, bool) or self.chunk_size < 1:
            _fail(src, "chunk_size", self.chunk_size, "an integer >= 1")
        if not isinstance(self.hysteresis_tau, (int, float)) or self.hysteresis_tau < 0:
            _fail(src, "hysteresis_tau", self.hysteresis_tau, "a number >= 0")
        if not isinstance(self.read_layer, int) or self.read_layer < 0:
            _fail(src, "read_layer", self.read_layer, "an integer >= 0 (0 = token embeddings)")
        if not isinstance(self.side_dim, int) or self.side_dim < 0:
            _fail(src, "side_dim", self.side_dim, "an integer >= 0")
        if not isinstance(self.controller_hidden, int) or self.controller_hidden < 1:
            _fail(src, "controller_hidden", self.controller_hidden, "an integer >= 1")
        for name in ("tau_sigma", "tau_fro"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                _fail(src, name, value, "a number > 0, or null to switch it off")
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            _fail(src, "layers", self.layers, "null or a non-empty list of block indices >= 0")
        self._validate_variants()

    def _validate_variants(self) -> None:
        src, routed = self.source, self.controller != "static"
        needs_controller = {"head_groups": self.head_groups > 0, "dynamic_rank": self.dynamic_rank is not None,
                            "gate_features": bool(self.gate_features), "film": self.film > 0}
        for name, used in needs_controller.items():
            if used and not routed:
                _fail(src, name, getattr(self, name), "its default when controller='static' (this variant is "
                      "driven by the controller)")
        if not _is_int(self.head_groups) or self.head_groups < 0:
            _fail(src, "head_groups", self.head_groups, "an integer >= 0 (0 = off)")
        if self.dynamic_rank is not None and (not _is_int(self.dynamic_rank) or not 1 <= self.dynamic_rank <= self.rank):
            _fail(src, "dynamic_rank", self.dynamic_rank, f"null or an integer k with 1 <= k <= rank ({self.rank})")
        if self.gate_features:
            if self.head_groups == 0:
                _fail(src, "gate_features", list(self.gate_features), "[] unless head_groups > 0 (V2 shapes PT1's gates)")
            if not all(_is_int(i) and 0 <= i < self.side_dim for i in self.gate_features):
                _fail(src, "gate_features", list(self.gate_features),
                      f"indices into the side vector, each in 0..{self.side_dim - 1} (side_dim = {self.side_dim})")
        if self.kron_sites:
            if self.kron_factor is None or len(self.kron_factor) != 2 or not all(_is_int(v) and v >= 1 for v in self.kron_factor):
                _fail(src, "kron_factor", self.kron_factor, "[rows, columns] of each A factor, two integers >= 1, "
                      "when kron_sites is set")
            if self.tau_sigma is not None:
                _fail(src, "tau_sigma", self.tau_sigma, "null when kron_sites is set (Kronecker sites support tau_fro only)")
        if self.kron_terms is not None and (not _is_int(self.kron_terms) or self.kron_terms < 1):
            _fail(src, "kron_terms", self.kron_terms, "null or an integer >= 1")
        if not _is_int(self.film) or self.film < 0:
            _fail(src, "film", self.film, "an integer >= 0 (number of channel groups; 0 = off)")
        for name in ("film_gamma_max", "film_beta_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                _fail(src, name, value, "a number > 0")

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
        unknown = sorted(set(data) - known)
        if unknown:
            where = f"{source}: " if source else ""
            raise BEMConfigError(f"{where}unknown BEMConfig field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**data, source=source)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
