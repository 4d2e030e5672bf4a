"""Is routing alive? measure_routing against a direct per-item computation, c ≡ 1 for a fresh controller,
the results table and the report section."""
import numpy as np
import pytest
import torch

from bem import BEMConfig, attach_bem, bem_layers
from bem.data.batches import prompt_ids
from bem.models import tiny
from bem.routing_stats import MOVED_THRESHOLD, measure_routing

PROMPTS = ["Define the noun \"dog\".", "Translate: en el principio", "Hi", "What colour is the sky over the sea at noon?"]
REPLIES = ["A domesticated carnivorous mammal that barks and is kept as a pet or for work.",
           "In the beginning God created the heaven and the earth.\nAnd the earth was without form.",
           "", "Blue."]


@pytest.fixture(scope="module")
def tokenizer():
    from bem.models import load_base

    return load_base("smollm2-135m")[1]


def routed(tokenizer, perturb: float | None = 0.5, **options):
    """A tiny llama with a chunk-routed BEM (PT1 gates on o_proj and FiLM on every block): random U, and the
    controller random (`perturb` = its weight scale) or as attach_bem leaves it (None: zero heads)."""
    model = tiny("llama", vocab_size=len(tokenizer))
    config = {"rank": 4, "alpha": 8.0, "sites": ["o_proj", "down_proj"], "controller": "chunk", "chunk_size": 4,
              "side_dim": 3, "head_groups": 2, "film": 4, "hysteresis_tau": 0.05, **options}
    attach_bem(model, BEMConfig(**config))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in bem_layers(model).values():
            layer.adapter_parameters()["U"].copy_(torch.randn(layer.adapter_parameters()["U"].shape, generator=gen) * 0.3)
        if perturb is not None:
            for p in model.bem_controller.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * perturb)
    return model


def direct(model, tokenizer, side):
    """The definition, one item at a time (no padding): each (item, segment)'s routing vector, and per item the
    chunk boundaries after the prompt's chunk and how many of them changed the code."""
    runtime, vectors, boundaries, changes = model._bem_runtime, [], 0, 0
    size = model.bem_config.chunk_size
    for k, (prompt, reply) in enumerate(zip(PROMPTS, REPLIES)):
        p = prompt_ids(tokenizer, prompt)
        ids = torch.tensor([p + tokenizer(reply, add_special_tokens=False)["input_ids"]])
        seen, read = {}, runtime.read

        def record(hidden):
            read(hidden)
            seen["codes"] = runtime._codes[0, runtime._segment[0]]  # (T, W): the vector each token was routed with
        runtime.read = record
        try:
            with torch.no_grad():
                model(ids, bem_prompt_len=len(p), bem_side=side[k:k + 1])
        finally:
            runtime.read = read
        codes = seen["codes"]
        segment = [-1] * len(p) + [t // size for t in range(ids.shape[1] - len(p))]
        firsts = [segment.index(s) for s in sorted(set(segment))]
        vectors.append(codes[firsts])
        chunks = [codes[i] for i in firsts[1:]]  # chunk 0 keeps the prompt code; switches happen after
        boundaries += max(0, len(chunks) - 1)
        changes += sum(int(not torch.equal(a, b)) for a, b in zip(chunks, chunks[1:]))
    return torch.cat(vectors).double().numpy(), boundaries, changes


def test_stats_equal_a_direct_computation_over_a_left_padded_batch(tokenizer):
    model = routed(tokenizer)
    side = torch.randn(len(PROMPTS), 3, generator=torch.Generator().manual_seed(3))
    stats = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=side, batch_size=3)
    vectors, boundaries, changes = direct(model, tokenizer, side)
    spans = model.bem_controller.heads.spans
    sites = {layer.site_index: name for name, layer in bem_layers(model).items() if layer.site_index is not None}
    assert len(sites) == 4 and len(spans["gate"]) == 2 and len(spans["film"]) == 2
    for index, (offset, width) in enumerate(spans["code"]):
        c = vectors[:, offset:offset + width]
        got = stats[sites[index]]
        assert got["code_std"] == pytest.approx(c.std(0).mean(), abs=1e-6)
        assert got["code_mean_abs_dev"] == pytest.approx(np.abs(c - 1).mean(), abs=1e-6)
        assert (got["code_min"], got["code_max"]) == pytest.approx((c.min(), c.max()), abs=1e-6)
        assert got["code_std"] > 0.01  # a random controller routes items and chunks differently
    offset, width = spans["gate"][0]
    g = vectors[:, offset:offset + width]
    gate = stats["gate:model.layers.0.self_attn.o_proj"]
    assert (gate["gate_min"], gate["gate_max"]) == pytest.approx((g.min(), g.max()), abs=1e-6)
    offset, width = spans["film"][1]
    gamma, beta = vectors[:, offset:offset + width // 2], vectors[:, offset + width // 2:offset + width]
    film = stats["film:model.layers.1"]
    assert film["gamma_mean_abs_dev"] == pytest.approx(np.abs(gamma - 1).mean(), abs=1e-6)
    assert (film["beta_min"], film["beta_max"]) == pytest.approx((beta.min(), beta.max()), abs=1e-6)
    summary = stats["all"]
    assert summary["samples"] == len(vectors) and summary["items"] == len(PROMPTS)
    assert (summary["boundaries"], summary["switches"]) == (boundaries, changes)
    assert boundaries >= 5 and changes > 0
    assert summary["switch_rate"] == pytest.approx(changes / boundaries)
    assert summary["moved"] == 1.0
    sticky = measure_routing(routed(tokenizer, hysteresis_tau=100.0), tokenizer, PROMPTS, REPLIES, side=side)
    assert sticky["all"]["switches"] == 0 and sticky["all"]["switch_rate"] == 0.0  # τ: no chunk code is replaced
    assert sticky["all"]["boundaries"] == boundaries and sticky["all"]["code_mean_std"] > 0.01  # items still differ


def test_feature_shift_is_how_far_codes_follow_swapped_side_inputs(tokenizer):
    """feature_shift: mean |c(previous item's side) − c(own side)| over the code entries, from the direct computation;
    0 when the controller's side columns are zero, and absent when every item has the same side inputs."""
    model = routed(tokenizer)
    side = torch.randn(len(PROMPTS), 3, generator=torch.Generator().manual_seed(3))
    runtime = model._bem_runtime
    stats = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=side, batch_size=3)["all"]
    own, _, _ = direct(model, tokenizer, side)
    swapped, _, _ = direct(model, tokenizer, side.roll(1, 0))
    columns = np.concatenate([np.arange(o, o + w) for o, w in model.bem_controller.heads.spans["code"]])
    want = np.abs(swapped[:, columns] - own[:, columns]).mean()
    assert want > 0.01 and stats["feature_shift"] == pytest.approx(want, abs=1e-6)
    assert stats["feature_shift_ratio"] == pytest.approx(want / stats["code_mean_std"], rel=1e-6)
    gates = np.concatenate([np.arange(o, o + w) for o, w in model.bem_controller.heads.spans["gate"]])
    assert stats["gate_feature_shift"] == pytest.approx(np.abs(swapped[:, gates] - own[:, gates]).mean(), abs=1e-6)
    assert stats["gate_feature_shift_ratio"] == pytest.approx(
        stats["gate_feature_shift"] / own[:, gates].std(0).mean(), rel=1e-6)
    runtime.switches = 0
    again = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=side, batch_size=3)["all"]
    assert runtime.switches == again["switches"] == stats["switches"]  # the swapped pass is not counted
    with torch.no_grad():
        model.bem_controller.inp.weight[:, -3:] = 0  # the side columns: the controller cannot read them
    blind = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=side)["all"]
    assert blind["feature_shift"] == 0.0 and blind["code_mean_std"] > 0.01
    same = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=torch.ones(len(PROMPTS), 3))["all"]
    assert "feature_shift" not in same and "feature_shift" not in measure_routing(model, tokenizer, PROMPTS, REPLIES)["all"]


def test_a_fresh_controller_is_c_equal_1_and_did_not_move(tokenizer):
    model = routed(tokenizer, perturb=None)
    stats = measure_routing(model, tokenizer, PROMPTS, REPLIES, side=torch.ones(len(PROMPTS), 3))
    for site, values in stats.items():
        if "code_mean_abs_dev" in values:
            assert values["code_mean_abs_dev"] == 0.0 and values["code_std"] == 0.0
            assert values["code_min"] == values["code_max"] == 1.0
    assert stats["all"]["code_max_mean_abs_dev"] == 0.0 and stats["all"]["gate_max_mean_abs_dev"] == 0.0
    assert stats["all"]["film_max_mean_abs_dev"] == 0.0
    assert stats["all"]["switches"] == 0 and stats["all"]["moved"] == 0.0
    with torch.no_grad():  # codes 2σ(b): bias 0.001 → |c − 1| ≈ 0.0005, still c ≡ 1; 0.05 → 0.025: moved
        model.bem_controller.out.bias.fill_(0.001)
    assert measure_routing(model, tokenizer, PROMPTS, REPLIES)["all"]["moved"] == 0.0
    with torch.no_grad():
        model.bem_controller.out.bias.fill_(0.05)
    stats = measure_routing(model, tokenizer, PROMPTS, REPLIES)
    assert stats["all"]["code_max_mean_abs_dev"] == pytest.approx(2 * torch.sigmoid(torch.tensor(0.05)).item() - 1, abs=1e-6)
    assert stats["all"]["code_max_mean_abs_dev"] > MOVED_THRESHOLD and stats["all"]["moved"] == 1.0
    with torch.no_grad():  # FiLM alone moving counts too: β = 0.5·tanh(0.1)
        model.bem_controller.out.bias.zero_()
        model.bem_controller.film.bias.fill_(0.1)
    assert measure_routing(model, tokenizer, PROMPTS, REPLIES)["all"]["moved"] == 1.0


def test_errors_name_the_problem(tokenizer):
    static = tiny("llama", vocab_size=len(tokenizer))
    attach_bem(static, BEMConfig(rank=4, sites=["o_proj"], controller="static"))
    with pytest.raises(ValueError, match="static BEM"):
        measure_routing(static, tokenizer, PROMPTS, REPLIES)
    with pytest.raises(ValueError, match="4 prompts and 3 replies"):
        measure_routing(routed(tokenizer), tokenizer, PROMPTS, REPLIES[:3])


def _db_with_units(tmp_path):
    from bem.experiments.config import ExperimentConfig
    from bem.experiments.results import ResultsDB

    db = ResultsDB(tmp_path / "results.sqlite")
    run = db.start_run("test", False)
    units = {}
    for name, seed in (("moving", 0), ("moving", 1), ("still", 0), ("lora", 0)):
        config = ExperimentConfig(name, bem=BEMConfig(controller="static" if name == "lora" else "chunk"))
        units[(name, seed)] = db.write_unit(run, name, config.config_hash(), config.to_dict(), seed, [], [], [], 1.0, 1.0)
    return db, units


def _summary(deviation, switches, boundaries, moved):
    return {"all": {"code_max_mean_abs_dev": deviation, "code_mean_std": deviation / 2, "switches": switches,
                    "boundaries": boundaries, "moved": moved, "samples": 10.0, "items": 4.0},
            "model.layers.0.mlp.down_proj": {"code_std": deviation / 2, "code_mean_abs_dev": deviation,
                                             "code_min": 1 - deviation, "code_max": 1 + deviation}}


def test_routing_rows_round_trip_and_the_report_section(tmp_path):
    import sqlite3

    from bem.experiments.report import _routing_lines

    db, units = _db_with_units(tmp_path)
    conn = sqlite3.connect(db.path)
    meta = {name: {"config": {"bem": {"controller": "static" if name == "lora" else "chunk"}}}
            for name in ("moving", "still", "lora")}
    empty = "\n".join(_routing_lines(conn, meta))
    assert "No routing statistics stored for moving, still" in empty and "`bem run` measures them" in empty
    db.write_routing(units[("moving", 0)], "wordnet_qa", _summary(0.2, 3.0, 10.0, 1.0))
    db.write_routing(units[("moving", 1)], "wordnet_qa", _summary(0.1, 1.0, 10.0, 1.0))
    db.write_routing(units[("still", 0)], "wordnet_qa", _summary(0.0, 0.0, 10.0, 0.0))
    db.write_routing(units[("still", 0)], "wordnet_qa", _summary(0.004, 0.0, 5.0, 0.0))  # replaces the row above
    assert db.routing(units[("moving", 1)]) == {"wordnet_qa": _summary(0.1, 1.0, 10.0, 1.0)}
    with pytest.raises(ValueError, match="unit id 99"):
        db.write_routing(99, "wordnet_qa", _summary(0.0, 0.0, 1.0, 0.0))
    lines = _routing_lines(sqlite3.connect(db.path), meta)
    rows = [line for line in lines if line.startswith("| moving") or line.startswith("| still")]
    assert rows == ["| moving | 2 | 0.1500 | 0.0750 | 0.1000 | 0.200 | — | — | — | yes | yes | — |",
                    "| still | 1 | 0.0040 | 0.0020 | 0.0020 | 0.000 | — | — | — | **no** | **no** | — |"]
    text = "\n".join(lines)
    assert "**still: its codes did not move** (largest mean |c − 1| of any site 0.004 < 0.01" in text
    assert "**moving: its codes did not move**" not in text and "indistinguishable from static LoRA" in text
    assert "barely vary with context" not in text
    for seed in (0, 1):  # codes away from 1 but (nearly) the same for every item and chunk: a static adapter in effect
        flat = _summary(0.2, 3.0, 10.0, 1.0)
        flat["model.layers.0.mlp.down_proj"]["code_std"] = 0.004
        db.write_routing(units[("moving", seed)], "wordnet_qa", flat)
    text = "\n".join(_routing_lines(sqlite3.connect(db.path), meta))
    assert "**moving: its codes moved away from 1 but barely vary with context** (largest per-site std of c over " \
           "items × chunks 0.004 < 0.01)" in text
    assert "barely follow its side inputs" not in text
    for seed, ratio in ((0, 0.02), (1, 0.06)):  # side inputs measured: the mean ratio, and a sentence under 0.1
        summary = _summary(0.2, 3.0, 10.0, 1.0)
        summary["all"].update(feature_shift=0.002, feature_shift_ratio=ratio)
        db.write_routing(units[("moving", seed)], "wordnet_qa", summary)
    lines = _routing_lines(sqlite3.connect(db.path), meta)
    assert [line for line in lines if line.startswith("| moving")][0].endswith("| yes | yes | ×0.040 |")
    assert "**moving: its codes barely follow its side inputs** (swapping only them moves c by ×0.040 of the code " \
           "std, mean over 2 units × tasks; < 0.1)" in "\n".join(lines)
    summary["all"].update(gate_feature_shift=0.05, gate_feature_shift_ratio=0.5)  # gates that do read them
    db.write_routing(units[("moving", 1)], "wordnet_qa", summary)
    lines = _routing_lines(sqlite3.connect(db.path), meta)
    assert [line for line in lines if line.startswith("| moving")][0].endswith("| ×0.040 (gates ×0.500) |")
    assert "barely follow its side inputs" not in "\n".join(lines)


def test_controller_lr_gives_the_controller_its_own_learning_rate(tokenizer):
    from bem.experiments.config import TrainingConfig
    from bem.experiments.training import _lr_lambda, build_optimizer

    model = routed(tokenizer)
    controller = {id(p) for p in model.bem_controller.parameters()}
    sites = {id(p) for layer in bem_layers(model).values() for p in layer.adapter_parameters().values()}
    optimizer = build_optimizer(model, TrainingConfig(lr=1e-3, controller_lr=2e-2))
    groups = [({id(p) for p in g["params"]}, g["lr"]) for g in optimizer.param_groups]
    assert groups == [(sites, 1e-3), (controller, 2e-2)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(10, 100))  # one schedule scales both
    assert scheduler.get_last_lr() == pytest.approx([1e-4, 2e-3])
    (single,) = build_optimizer(model, TrainingConfig(lr=1e-3)).param_groups
    assert {id(p) for p in single["params"]} == sites | controller and single["lr"] == 1e-3
    static = tiny("llama", vocab_size=len(tokenizer))
    attach_bem(static, BEMConfig(rank=4, sites=["o_proj"], controller="static"))
    with pytest.raises(ValueError, match="controller_lr = 0.01 is not allowed for a model without a BEM controller"):
        build_optimizer(static, TrainingConfig(controller_lr=0.01))


def test_shipped_config_hashes_are_unchanged_and_controller_lr_counts_only_when_set(tmp_path):
    """Stored units keep their hashes (docs/results/v13_cpu with the _cpu overlay, v13_gpu with none); a set
    controller_lr is a new config."""
    import dataclasses
    import sqlite3
    from pathlib import Path

    from bem.experiments.config import ConfigError, load_experiment

    results = Path(__file__).resolve().parents[1] / "docs" / "results"
    for run, overlay in (("v13_cpu", "_cpu"), ("v13_gpu", None)):
        stored = sqlite3.connect(results / run / "results.sqlite").execute(
            "SELECT DISTINCT experiment, config_hash FROM units").fetchall()
        assert stored
        for experiment, config_hash in stored:
            config = load_experiment(experiment, overlay=overlay)
            if run == "v13_gpu":  # run before length batching, bf16 and batches of 32 became the defaults
                config.training.batching, config.evaluation.batch_size = "random", 16
                config.training.precision = config.evaluation.precision = "fp32"
            else:  # the _cpu preset pins both
                assert config.training.batching == "random" and config.training.precision == "fp32"
            assert config.config_hash() == config_hash, (run, experiment)
            config.training.batching = "length"
            assert config.config_hash() != config_hash
            config.training.batching, config.evaluation.precision = "random", "bf16"
            assert config.config_hash() != config_hash
    config = load_experiment("S1_anchor", overlay="_cpu")
    assert config.training.controller_lr is None and config.to_dict()["training"]["controller_lr"] is None
    faster = dataclasses.replace(config, training=dataclasses.replace(config.training, controller_lr=1e-2))
    assert faster.config_hash() != config.config_hash()
    shipped = Path(__file__).resolve().parents[1] / "experiments"
    for name, value, match in (("S1_anchor", -1.0, "training.controller_lr = -1.0 is not allowed; expected a number > 0"),
                               ("L0_lora", 0.01, "controller_lr = 0.01 is not allowed with bem.controller = 'static'")):
        folder = tmp_path / name
        folder.mkdir()
        for path in shipped.glob("*.yaml"):
            (folder / path.name).write_text(path.read_text())
        with open(folder / f"{name}.yaml", "a") as f:
            f.write(f"training:\n  controller_lr: {value}\n")
        with pytest.raises(ConfigError, match=match):
            load_experiment(name, directory=folder)
