"""Every bad experiment file is a ConfigError at load that names the file, the dotted field, the value as written
and what is allowed; docs/configuration.md is generated from the same tables the loader checks with."""
import dataclasses
import typing
from pathlib import Path

import pytest

from bem.module.config import BEMConfigError
from bem.errors import BEMError
from bem.experiments.config import (LIMITS, SECTIONS, ConfigError, list_experiments, list_presets, load_experiment,
                                    schema_markdown)

# a valid base of our own (anchor: null, so no parity check loads a model) and one preset overlay
BASE = """model: smollm2-135m
tasks: [wordnet_qa, bible_translate]
seeds: [0, 1]
anchor: null
bem:
  rank: 8
  side_dim: 5
  controller_hidden: 24
training:
  steps: 100
  warmup_steps: 10
evaluation:
  items: 50
"""
PRESET = "training:\n  steps: 20\n  warmup_steps: 2\n"


def case(body, *fragments, **options):
    """A bad config: `body` is YAML text under `base: _defaults` in x.yaml, or the raw bytes of x.yaml."""
    shown = body.decode("latin-1") if isinstance(body, bytes) else body
    label = " ".join(shown.split())[:60] or "empty"
    if options:
        label += " " + " ".join(f"{k}={v}" for k, v in options.items() if k != "files")
    return pytest.param(body, fragments, options, id=label)


CASES = [
    # training
    case("training:\n  max_grad_norm: -1\n", "training.max_grad_norm = -1", "a number > 0 and <= 10000"),
    case("training:\n  max_grad_norm: 0\n", "training.max_grad_norm = 0", "> 0 and <= 10000"),
    case("training:\n  max_grad_norm: .inf\n", "training.max_grad_norm = inf", "> 0 and <= 10000"),
    case("training:\n  max_grad_norm: .nan\n", "training.max_grad_norm = nan", "> 0 and <= 10000"),
    case("training:\n  max_grad_norm: true\n", "training.max_grad_norm = True", "> 0 and <= 10000"),
    case("training:\n  max_grad_norm: 1.0e+5\n", "training.max_grad_norm = 100000.0", "> 0 and <= 10000"),
    case("training:\n  max_grad_norm: 1.0e5\n", "training.max_grad_norm = '1.0e5'", "> 0 and <= 10000", "1.0e+5"),
    case("training:\n  warmup_steps: -5\n", "training.warmup_steps = -5", "0 <= k <= training.steps"),
    case("training:\n  warmup_steps: 101\n", "training.warmup_steps = 101", "0 <= k <= training.steps (100)"),
    case("training:\n  warmup_steps: 2.5\n", "training.warmup_steps = 2.5", "an integer"),
    case("steps: 1000000000000\n", "unknown field(s) ['steps']", "allowed:"),
    case("training:\n  steps: 1000000000000\n", "training.steps = 1000000000000", "an integer >= 1 and <= 1000000"),
    case("training:\n  steps: 0\n", "training.steps = 0", "an integer >= 1 and <= 1000000"),
    case("training:\n  steps: true\n", "training.steps = True", "an integer >= 1"),
    case("training:\n  steps: 3.0\n", "training.steps = 3.0", "an integer >= 1"),
    case("training:\n  steps: many\n", "training.steps = 'many'", "an integer >= 1"),
    case("training:\n  batch_size: 0\n", "training.batch_size = 0", ">= 1 and <= 4096"),
    case("training:\n  batch_size: 5000\n", "training.batch_size = 5000", ">= 1 and <= 4096"),
    case("training:\n  grad_accum: 0\n", "training.grad_accum = 0", ">= 1 and <= 1024"),
    case("training:\n  grad_accum: 2048\n", "training.grad_accum = 2048", ">= 1 and <= 1024"),
    case("training:\n  lr: .nan\n", "training.lr = nan", "a number > 0 and <= 1"),
    case("training:\n  lr: .inf\n", "training.lr = inf", "a number > 0 and <= 1"),
    case("training:\n  lr: 0\n", "training.lr = 0", "a number > 0 and <= 1"),
    case("training:\n  lr: -0.001\n", "training.lr = -0.001", "a number > 0 and <= 1"),
    case("training:\n  lr: 2.0\n", "training.lr = 2.0", "a number > 0 and <= 1"),
    case("training:\n  lr: true\n", "training.lr = True", "a number > 0 and <= 1"),
    case("training:\n  lr: 1e-3\n", "training.lr = '1e-3'", "a number > 0", "1.0e-3"),
    case("training:\n  lr: [0.001]\n", "training.lr = [0.001]", "a number > 0"),
    case("training:\n  controller_lr: -1.0\n", "training.controller_lr = -1.0", "a number > 0 and <= 1", "or null"),
    case("training:\n  controller_lr: .nan\n", "training.controller_lr = nan", "a number > 0 and <= 1"),
    case("training:\n  controller_lr: false\n", "training.controller_lr = False", "or null"),
    case("bem:\n  controller: static\ntraining:\n  controller_lr: 0.01\n", "training.controller_lr = 0.01",
         "bem.controller = 'static'", "expected null"),
    case("evaluation:\n  decoding: fast\n", "evaluation.decoding = 'fast'",
         "expected one of 'auto', 'dynamic', 'static', 'compiled'"),
    case("router: {}\nevaluation:\n  decoding: static\n", "evaluation.decoding = 'static'", "with a router",
         "expected 'auto' or 'dynamic'"),
    case("training:\n  weight_decay: -1\n", "training.weight_decay = -1", "a number >= 0 and <= 1"),
    case("training:\n  weight_decay: 1.5\n", "training.weight_decay = 1.5", "a number >= 0 and <= 1"),
    case("training:\n  weight_decay: .nan\n", "training.weight_decay = nan", "a number >= 0 and <= 1"),
    case("training:\n  checkpoint_every: 0\n", "training.checkpoint_every = 0", ">= 1 and <= 1000000"),
    case("training:\n  checkpoint_every: 2000000\n", "training.checkpoint_every = 2000000", "<= 1000000"),
    case("training:\n  max_length: 4\n", "training.max_length = 4", "an integer >= 8 and <= 32768"),
    case("training:\n  max_length: 100000\n", "training.max_length = 100000", ">= 8 and <= 32768"),
    case("training:\n  train_items: 0\n", "training.train_items = 0", ">= 1 and <= 10000000"),
    case("training:\n  train_items: 100000000\n", "training.train_items = 100000000", "<= 10000000"),
    case("training:\n  precision: fp8\n", "training.precision = 'fp8'", "one of 'auto', 'fp32', 'bf16'"),
    case("training:\n  batching: sorted\n", "training.batching = 'sorted'", "one of 'length', 'random'"),
    case("evaluation:\n  precision: half\n", "evaluation.precision = 'half'", "one of 'auto', 'fp32', 'bf16'"),
    case("training:\n  precision: [fp32]\n", "training.precision = ['fp32']", "one of 'auto', 'fp32', 'bf16'"),
    case("training:\n  stpes: 3\n", "unknown field(s) ['training.stpes']", "'steps'"),
    case("training: 5\n", "training must be a mapping", "got 5"),
    case("training: null\n", "training must be a mapping", "got None"),
    # evaluation
    case("evaluation:\n  items: 1000000000\n", "evaluation.items = 1000000000", "an integer >= 1 and <= 100000"),
    case("evaluation:\n  items: 0\n", "evaluation.items = 0", ">= 1 and <= 100000"),
    case("evaluation:\n  items: -3\n", "evaluation.items = -3", ">= 1 and <= 100000"),
    case("evaluation:\n  batch_size: 0\n", "evaluation.batch_size = 0", ">= 1 and <= 4096"),
    case("evaluation:\n  batch_size: 10000\n", "evaluation.batch_size = 10000", ">= 1 and <= 4096"),
    case("evaluation:\n  swap_seeds: 0\n", "evaluation.swap_seeds = 0", ">= 1 and <= 100", "or null"),
    case("evaluation:\n  swap_seeds: 101\n", "evaluation.swap_seeds = 101", ">= 1 and <= 100"),
    case("evaluation:\n  swap_seeds: true\n", "evaluation.swap_seeds = True", ">= 1 and <= 100"),
    case("evaluation:\n  split: train\n", "evaluation.split = 'train'", "one of 'test', 'dev'"),
    case("evaluation:\n  itemz: 3\n", "unknown field(s) ['evaluation.itemz']", "'items'"),
    # gates
    case("gates:\n  parity_tolerance: 100\n", "gates.parity_tolerance = 100", "a number >= 0 and <= 0.25"),
    case("gates:\n  parity_tolerance: -0.1\n", "gates.parity_tolerance = -0.1", ">= 0 and <= 0.25"),
    case("gates:\n  parity_tolerance: .nan\n", "gates.parity_tolerance = nan", ">= 0 and <= 0.25"),
    case("gates:\n  latency_ratio: 0.5\n", "gates.latency_ratio = 0.5", "a number >= 1 and <= 10"),
    case("gates:\n  latency_ratio: 11\n", "gates.latency_ratio = 11", ">= 1 and <= 10"),
    case("gates:\n  memory_ratio: .inf\n", "gates.memory_ratio = inf", ">= 1 and <= 10"),
    case("gates:\n  memory_ratio: false\n", "gates.memory_ratio = False", ">= 1 and <= 10"),
    case("gates:\n  alpha: 0\n", "gates.alpha = 0", "a number > 0 and <= 0.5"),
    case("gates:\n  alpha: 0.9\n", "gates.alpha = 0.9", "> 0 and <= 0.5"),
    case("gates:\n  alpha: true\n", "gates.alpha = True", "> 0 and <= 0.5"),
    case("gates:\n  bh: 0.1\n", "unknown field(s) ['gates.bh']", "'alpha'"),
    # top level
    case("tasks: [wordnet_qa, wordnet_qa]\n", "tasks = ['wordnet_qa', 'wordnet_qa']", "distinct task names",
         "wordnet_qa listed more than once"),
    case("tasks: []\n", "tasks = []", "a non-empty list of distinct task names"),
    case("tasks: [squad]\n", "tasks[0] = 'squad'", "one of ('wordnet_qa'"),
    case("tasks: wordnet_qa\n", "tasks = 'wordnet_qa'", "a non-empty list of distinct task names"),
    case("seeds: [-1]\n", "seeds[0] = -1", "an integer >= 0 and <= 2147483647"),
    case("seeds: [2147483648]\n", "seeds[0] = 2147483648", ">= 0 and <= 2147483647"),
    case("seeds: [true]\n", "seeds[0] = True", ">= 0 and <= 2147483647"),
    case("seeds: [0.5]\n", "seeds[0] = 0.5", "an integer"),
    case("seeds: [0, 0]\n", "seeds = [0, 0]", "1..100 distinct integers"),
    case("seeds: []\n", "seeds = []", "1..100 distinct integers"),
    case(f"seeds: {list(range(101))}\n", "seeds = [0, 1, 2", "1..100 distinct integers"),
    case("seeds: 3\n", "seeds = 3", "1..100 distinct integers"),
    case("model: no_such_model\n", "model = 'no_such_model'", "smollm2-135m", "config.json"),
    case("model: 5\n", "model = 5", "config.json"),
    case("name: other\n", "name = 'other'", "the file name 'x'"),
    case("side_inputs: maybe\n", "side_inputs = 'maybe'", "true, false, or zeroed"),
    case("description: [a, b]\n", "description = ['a', 'b']", "any text"),
    case("anchor: nowhere\n", "anchor = 'nowhere'", "one of the experiments ['x']"),
    case("parity_with: _defaults\n", "parity_with = '_defaults'", "one of the experiments ['x']"),
    case("anchor: 3\n", "anchor = 3", "the name of another experiment"),
    case("bem:\n  side_dim: 3\n", "bem.side_dim = 3", "are 5 wide"),
    case("foo: 1\n", "unknown field(s) ['foo']", "'tasks'"),
    case("1: 2\nfoo: 3\n", "unknown field(s) ['1', 'foo']", "'tasks'"),
    # bem
    case("bem:\n  alpha: true\n", "bem.alpha = True", "a number > 0 and <= 65536"),
    case("bem:\n  alpha: .nan\n", "bem.alpha = nan", "a number > 0 and <= 65536"),
    case("bem:\n  alpha: 0\n", "bem.alpha = 0", "a number > 0"),
    case("bem:\n  alpha: 1.0e+9\n", "bem.alpha = 1000000000.0", "<= 65536"),
    case("bem:\n  layers: abc\n", "bem.layers = 'abc'", "a non-empty list of distinct block indices"),
    case("bem:\n  layers: []\n", "bem.layers = []", "a non-empty list of distinct block indices"),
    case("bem:\n  layers: [true]\n", "bem.layers = [True]", "distinct block indices"),
    case("bem:\n  layers: [1, 1]\n", "bem.layers = [1, 1]", "distinct block indices"),
    case("bem:\n  layers: [-1]\n", "bem.layers = [-1]", "each an integer in [0, 4095]"),
    case("bem:\n  layers: 3\n", "bem.layers = 3", "distinct block indices"),
    case("bem:\n  sites: 5\n", "bem.sites = 5", "a layer-name suffix or a non-empty list"),
    case("bem:\n  sites: []\n", "bem.sites = []", "a layer-name suffix or a non-empty list"),
    case("bem:\n  sites: [o_proj, '']\n", "bem.sites = ['o_proj', '']", "non-empty suffixes"),
    case("bem:\n  head_gate_sites: 3\n", "bem.head_gate_sites = 3", "a layer-name suffix"),
    case("bem:\n  kron_sites: [1]\n", "bem.kron_sites = [1]", "a layer-name suffix"),
    case("bem:\n  rank: 0\n", "bem.rank = 0", "an integer >= 1 and <= 4096"),
    case("bem:\n  rank: 5000\n", "bem.rank = 5000", "an integer >= 1 and <= 4096"),
    case("bem:\n  rank: 8.0\n", "bem.rank = 8.0", "an integer >= 1"),
    case("bem:\n  rank: true\n", "bem.rank = True", "an integer >= 1"),
    case("bem:\n  chunk_size: 0\n", "bem.chunk_size = 0", ">= 1 and <= 65536"),
    case("bem:\n  chunk_size: 100000\n", "bem.chunk_size = 100000", ">= 1 and <= 65536"),
    case("bem:\n  controller_hidden: 0\n", "bem.controller_hidden = 0", ">= 1 and <= 65536"),
    case("bem:\n  controller_hidden: 100000\n", "bem.controller_hidden = 100000", "<= 65536"),
    case("bem:\n  side_dim: -1\n", "bem.side_dim = -1", ">= 0 and <= 65536"),
    case("bem:\n  hysteresis_tau: -0.1\n", "bem.hysteresis_tau = -0.1", "a number >= 0"),
    case("bem:\n  hysteresis_tau: .inf\n", "bem.hysteresis_tau = inf", "a number >= 0"),
    case("bem:\n  tau_sigma: 0\n", "bem.tau_sigma = 0", "a number > 0", "or null"),
    case("bem:\n  tau_fro: .nan\n", "bem.tau_fro = nan", "a number > 0", "or null"),
    case("bem:\n  film_gamma_max: 0\n", "bem.film_gamma_max = 0", "a number > 0 and <= 100"),
    case("bem:\n  film_beta_max: .inf\n", "bem.film_beta_max = inf", "a number > 0 and <= 100"),
    case("bem:\n  kron_factor: [2]\n", "bem.kron_factor = [2]", "two integers in [1, 65536]"),
    case("bem:\n  kron_factor: 2\n", "bem.kron_factor = 2", "two integers in [1, 65536]"),
    case("bem:\n  controller: dynamic\n", "bem.controller = 'dynamic'", "one of ('static', 'prefix', 'chunk')"),
    case("bem:\n  dynamic_rank: 9\n", "bem.dynamic_rank = 9", "1 <= k <= rank (8)"),
    case("bem:\n  head_groups: -1\n", "bem.head_groups = -1", "an integer >= 0"),
    case("bem:\n  read_layer: -1\n", "bem.read_layer = -1", "an integer >= 0"),
    case("bem:\n  gate_features: 7\n", "bem.gate_features = 7", "indices into the side vector"),
    case("bem:\n  film: true\n", "bem.film = True", "an integer >= 0"),
    case("bem:\n  rnak: 4\n", "unknown field(s) ['bem.rnak']", "'rank'"),
    case("bem: [1]\n", "bem = [1]", "a mapping with keys"),
    # files
    case("", "_defaults is a base/preset file", "one of the experiments ['x']", load="_defaults", file="_defaults.yaml"),
    case("", "_small is a base/preset file", "one of the experiments ['x']", load="_small.yaml", file="_small.yaml"),
    case("", "unknown preset '_nosuch'", "one of ['_small']", overlay="_nosuch"),
    case("", "unknown preset '_defaults'", "one of ['_small']", overlay="_defaults"),
    case("", "unknown preset 'small'", "one of ['_small']", overlay="small"),
    case("", "experiment file", "nowhere.yaml does not exist", "one of the experiments ['x']", load="nowhere",
         file="nowhere.yaml"),
    case("training:\n  steps: 5\n  steps: 6\n", "duplicate key 'steps' on line 4 (first on line 3)"),
    case("seeds: [0]\nseeds: [1]\n", "duplicate key 'seeds' on line 3 (first on line 2)"),
    case(b"base: _defaults\ndescription: caf\xe9\n", "not UTF-8 text", "b'\\xe9'", "UTF-8 encoded"),
    case(b"", "the file is empty", "a mapping of fields"),
    case(b"# only a comment\n", "the file is empty", "a mapping of fields"),
    case(b"- a list\n", "must hold a mapping of fields", "got list"),
    case(b"just text\n", "must hold a mapping of fields", "got str"),
    case(b"training: [1,\n", "not valid YAML"),
    case(b"base: _defaults\nx: !!python/object:os.system {}\n", "not valid YAML"),
    case(b"base: y\n", "base inheritance loops", files={"y.yaml": "base: x\n"}),
    case(b"base: nowhere\n", "base = 'nowhere'", "nowhere.yaml does not exist", "expected one of"),
    case(b"base: 5\n", "base = 5", "the name of another experiment file"),
]


@pytest.mark.parametrize("body,fragments,options", CASES)
def test_bad_config_is_an_error_naming_file_field_value_and_allowed(tmp_path, body, fragments, options):
    (tmp_path / "_defaults.yaml").write_text(BASE)
    (tmp_path / "_small.yaml").write_text(PRESET)
    for name, text in options.get("files", {}).items():
        (tmp_path / name).write_text(text)
    (tmp_path / "x.yaml").write_bytes(body if isinstance(body, bytes) else ("base: _defaults\n" + body).encode())
    load = options.get("load", "x")
    with pytest.raises(ConfigError) as err:
        load_experiment(tmp_path / load if load.endswith(".yaml") else load, tmp_path, overlay=options.get("overlay"))
    message = str(err.value)
    assert options.get("file", "x.yaml") in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_test_base_and_preset_are_valid(tmp_path):
    assert len(CASES) >= 60
    (tmp_path / "_defaults.yaml").write_text(BASE)
    (tmp_path / "_small.yaml").write_text(PRESET)
    (tmp_path / "x.yaml").write_text("base: _defaults\n")
    assert list_presets(tmp_path) == ["small"] and list_experiments(tmp_path) == ["x"]
    assert load_experiment("x", tmp_path).training.steps == 100
    assert load_experiment("x", tmp_path, overlay="_small").training.steps == 20


def test_error_classes_are_bem_errors_and_value_errors():
    for cls in (ConfigError, BEMConfigError):
        assert issubclass(cls, BEMError) and issubclass(cls, ValueError)


def test_shipped_experiments_load_with_every_preset():
    assert list_presets() == ["cpu", "mm_cpu", "online_cpu", "quick", "router_cpu", "safety_cpu"]
    for name in list_experiments():
        for overlay in (None, "_cpu", "_online_cpu", "_quick", "_router_cpu"):  # a preset's router: / online: sizes
            config = load_experiment(name, overlay=overlay)                    # those experiments only
            assert config.name == name
            assert (config.router is None) == (name not in ("ar0_bc", "ar1_pg"))
            assert (config.online is None) == (name != "ol_shadow")


def test_configuration_doc_is_the_generated_schema():
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text(encoding="utf-8") == schema_markdown(), (
        "regenerate: python -c \"from bem.experiments.config import schema_markdown; "
        "print(schema_markdown(), end='')\" > docs/configuration.md")
    for section, cls in SECTIONS:  # every numeric field has a range in LIMITS
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if {int, float} & {tp, *typing.get_args(tp)} and f.name != "gate_features":
                assert (f"{section}.{f.name}" if section else f.name) in LIMITS, f.name
