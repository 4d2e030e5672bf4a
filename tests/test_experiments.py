"""Experiment configs, training with resume, the results database and the runner, on a tiny model."""
import json
import sqlite3
from pathlib import Path

import pytest

from bem.experiments.config import ConfigError, list_experiments, load_experiment


def write(path, text):
    path.write_text(text)
    return path


def test_shipped_experiments_load():
    names = list_experiments()
    assert {"L0_lora", "S1_anchor", "B1_bem"} <= set(names)
    lora, anchor = load_experiment("L0_lora"), load_experiment("S1_anchor")
    assert lora.bem.controller == "static" and anchor.bem.controller == "chunk" and anchor.anchor is None
    assert lora.training.steps == anchor.training.steps == 200  # inherited from _defaults
    quick = load_experiment("S1_anchor", overlay="_quick")
    assert quick.training.steps == 24 and quick.seeds == [0] and quick.config_hash() != anchor.config_hash()


@pytest.mark.parametrize("body,message", [
    ("training:\n  stpes: 3\n", r"x\.yaml: unknown field\(s\) \['training\.stpes'\]"),
    ("training:\n  steps: many\n", r"x\.yaml: training\.steps = 'many' is not allowed; expected an integer"),
    ("training:\n  precision: fp8\n", r"training\.precision = 'fp8' is not allowed; expected one of 'auto', 'fp32', 'bf16'"),
    ("tasks: [wordnet_qa, squad]\n", r"tasks\[1\] = 'squad' is not allowed; expected one of"),
    ("bem:\n  rank: 0\n", r"x\.yaml: bem\.rank = 0 is not allowed; expected an integer >= 1"),
    ("bem:\n  side_dim: 3\n", r"bem\.side_dim = 3 is not allowed; the side inputs of tasks"),
    ("base: nowhere\n", r"experiment file .*nowhere\.yaml does not exist"),
    ("seeds: []\n", r"seeds = \[\] is not allowed"),
    ("evaluation:\n  swap_seeds: 0\n", r"x\.yaml: evaluation\.swap_seeds = 0 is not allowed; expected an integer >= 1 .*, or null"),
    ("- a list\n", r"x\.yaml: must hold a mapping"),
])
def test_config_errors_name_file_field_value_and_allowed(tmp_path, body, message):
    write(tmp_path / "x.yaml", body)
    with pytest.raises(ConfigError, match=message):
        load_experiment("x", tmp_path)


def test_parity_violation_at_load_prints_both_ratios(tmp_path):
    write(tmp_path / "S1_anchor.yaml", "bem:\n  rank: 8\n  side_dim: 5\n")
    write(tmp_path / "big.yaml", "anchor: S1_anchor\nbem:\n  rank: 12\n  side_dim: 5\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: budget parity with S1_anchor fails: added parameters "
                                          r"×1\.4\d\d, added FLOPs/token ×1\.4\d\d"):
        load_experiment("big", tmp_path)
    write(tmp_path / "ok.yaml", "parity_with: S1_anchor\nbem:\n  rank: 8\n  side_dim: 5\n  controller_hidden: 60\n")
    assert load_experiment("ok", tmp_path).parity_with == "S1_anchor"


def test_shipped_experiments_are_within_parity_in_bem_list_json():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bem.cli", "list", "--json"], capture_output=True, text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    for name in ("S1_anchor", "L0_lora", "v1_dynrank", "v2_gateshaping", "v3_kron", "v4_film"):
        assert rows[name]["within_parity"] is True, rows[name]
        assert rows[name]["parity_with"] == "S1_anchor"
        assert abs(rows[name]["parameter_ratio"] - 1) <= 0.05 and abs(rows[name]["flops_ratio"] - 1) <= 0.05


def test_base_inheritance_merges_and_detects_loops(tmp_path):
    write(tmp_path / "_b.yaml", "training:\n  steps: 7\n  warmup_steps: 2\n  lr: 0.01\nbem:\n  rank: 4\n  side_dim: 5\n")
    write(tmp_path / "child.yaml", "base: _b\ntraining:\n  steps: 9\n")
    c = load_experiment("child", tmp_path)
    assert (c.training.steps, c.training.lr, c.bem.rank) == (9, 0.01, 4)
    write(tmp_path / "loop1.yaml", "base: loop2\n")
    write(tmp_path / "loop2.yaml", "base: loop1\n")
    with pytest.raises(ConfigError, match="loops"):
        load_experiment("loop1", tmp_path)


# --- training, resume and the runner on a tiny model --------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny llama with SmolLM2's tokenizer saved as a local HF folder, and a small prepared data folder."""
    from bem.data.prepare import prepare
    from bem.models import load_base, tiny

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prepare(["wordnet_define", "json_format"], root / "data")
    experiments = root / "experiments"
    experiments.mkdir()
    common = (f"model: {root / 'model'}\ntasks: [wordnet_define, json_format]\nseeds: [0]\nanchor: null\n"
              "side_inputs: false\nbem:\n  rank: 4\n  sites: [o_proj, down_proj]\n  controller: {ctrl}\n  chunk_size: 4\n"
              "training:\n  steps: 6\n  batch_size: 2\n  grad_accum: 2\n  lr: 0.01\n  warmup_steps: 2\n"
              "  checkpoint_every: 2\n  max_length: 48\n  train_items: 20\nevaluation:\n  items: 4\n  batch_size: 4\n")
    # at width 32 a controller of the default width outweighs the sites (×3.5 parameters): hidden width 2 keeps
    # tiny_bem within ×1.17 parameters and ×1.03 FLOPs/token of tiny_lora
    write(experiments / "tiny_bem.yaml", common.format(ctrl="chunk").replace("anchor: null", "anchor: tiny_lora")
          .replace("  chunk_size: 4\n", "  chunk_size: 4\n  controller_hidden: 2\n") + "gates:\n  parity_tolerance: 0.2\n")
    write(experiments / "tiny_lora.yaml", common.format(ctrl="static"))
    return root


def _scores(db_path):
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT u.experiment, u.seed, s.task, s.item_id, s.metric, s.value, s.prediction "
                        "FROM item_scores s JOIN units u ON u.id = s.unit_id ORDER BY 1, 2, 3, 4, 5").fetchall()
    curve = conn.execute("SELECT step, loss FROM curves ORDER BY step").fetchall()
    conn.close()
    return rows, curve


def test_killed_run_resumes_to_the_same_scores(tiny_setup, tmp_path, monkeypatch):
    from bem.experiments import runner
    from bem.experiments.adapters import unit_data
    from bem.experiments.training import latest_checkpoint, train_unit

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    experiments = tiny_setup / "experiments"
    straight = tmp_path / "straight"
    assert runner.run(["tiny_bem"], straight, directory=experiments) == [("tiny_bem", 0, "done")]

    killed = tmp_path / "killed"
    config = load_experiment("tiny_bem", experiments)
    checkpoint = killed / "checkpoints" / runner.unit_name(config, 0)
    identity = {"config_hash": config.config_hash(), "data": unit_data(config)}  # what runner.run_unit passes
    partial = train_unit(config, 0, checkpoint, stop_after=3, identity=identity)  # the run "dies" after step 3
    saved, step = latest_checkpoint(checkpoint)
    assert len(partial.curve) == 3 and step == 3 and json.loads((saved / "progress.json").read_text())["step"] == 3
    runner.run(["tiny_bem"], killed, directory=experiments)  # starts again, resumes from the checkpoint
    rows_a, curve_a = _scores(straight / "results.sqlite")
    rows_b, curve_b = _scores(killed / "results.sqlite")
    assert len(rows_a) == 4 * 1 + 4 * 2 and rows_a == rows_b
    assert len(curve_a) == 6 and curve_a == curve_b
    assert not checkpoint.exists() and (killed / "adapters" / runner.unit_name(config, 0) / "bem_weights.safetensors").is_file()


def test_rerun_skips_finished_units_and_a_changed_config_is_a_new_unit(tiny_setup, tmp_path, monkeypatch):
    from bem.experiments import runner

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    experiments = tmp_path / "experiments"
    shutil_copy = __import__("shutil").copytree
    shutil_copy(tiny_setup / "experiments", experiments)
    out = tmp_path / "run"
    assert runner.run(["tiny_lora"], out, directory=experiments) == [("tiny_lora", 0, "done")]
    assert runner.run(["tiny_lora"], out, directory=experiments) == [("tiny_lora", 0, "skipped")]
    from bem.cli import main

    assert main(["report", str(out)]) == 0  # nothing to compare with yet: the report says so
    assert "None yet: a verdict compares" in (out / "report.md").read_text()
    path = experiments / "tiny_lora.yaml"
    path.write_text(path.read_text().replace("lr: 0.01", "lr: 0.02"))
    assert runner.run(["tiny_lora"], out, directory=experiments) == [("tiny_lora", 0, "done")]
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("SELECT COUNT(DISTINCT config_hash), COUNT(*) FROM units").fetchone() == (2, 2)


def test_nan_loss_stops_the_unit_without_scores(tiny_setup, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from bem.experiments import runner
    from bem.experiments.training import TrainingDiverged

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    broken = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    with torch.no_grad():
        broken.model.norm.weight[0] = float("nan")  # a corrupted base checkpoint
    broken.save_pretrained(tmp_path / "broken")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        __import__("shutil").copy(tiny_setup / "model" / name, tmp_path / "broken")
    experiments = tmp_path / "experiments"
    __import__("shutil").copytree(tiny_setup / "experiments", experiments)
    path = experiments / "tiny_bem.yaml"
    path.write_text(path.read_text().replace(str(tiny_setup / "model"), str(tmp_path / "broken")))
    with pytest.raises(TrainingDiverged, match="tiny_bem seed 0: loss is nan at step 0"):
        runner.run(["tiny_bem"], tmp_path / "run", directory=experiments)
    conn = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM units").fetchone() == (0,)
    assert conn.execute("SELECT COUNT(*) FROM item_scores").fetchone() == (0,)


def test_report_is_regenerated_identically_and_matches_the_database(tiny_setup, tmp_path, monkeypatch):
    import re

    from bem.cli import main
    from bem.experiments import runner

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    out = tmp_path / "run"
    runner.run(["tiny_lora", "tiny_bem"], out, directory=tiny_setup / "experiments")
    assert main(["report", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")}
    assert set(first) == {"report.md", "curves.png", "forest.png", "quality_latency.png"}
    assert any("seconds_per_item" in line for line in first["report.md"].decode().splitlines())
    assert main(["report", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".md", ".png")} == first
    report = first["report.md"].decode()
    conn = sqlite3.connect(out / "results.sqlite")
    expected = {(e, t, m): v for e, t, m, v in conn.execute(
        "SELECT u.experiment, m.task, m.metric, AVG(m.value) FROM metrics m JOIN units u ON u.id = m.unit_id GROUP BY 1, 2, 3")}
    shown = {(e, t, m): float(v) for e, t, m, v in re.findall(r"^\| (tiny_\w+) \| (\w+) \| (\w+) \| ([-\d.]+) \|$", report, re.M)}
    assert shown.keys() == expected.keys() and all(abs(shown[k] - expected[k]) <= 1e-4 for k in expected)  # 4 decimals shown
    # 4 items per task: the report says plainly that this is too small for a verdict
    assert "(too small)" in report and "NO VERDICT" in report and "sample too small" in report
    assert main(["analyze", str(out), "--json"]) == 0
    assert conn.execute("SELECT experiment, versus, verdict FROM verdicts").fetchall() == [("tiny_bem", "tiny_lora", "no verdict")]
    from bem.experiments.analysis import analyze

    default, seeds = analyze(out, n_resamples=500), analyze(out, n_resamples=500, hierarchical=True)
    assert seeds["method"].startswith("seed × item") and default["method"].startswith("BCa")
    for d, h in zip(default["comparisons"], seeds["comparisons"]):  # one seed: the estimate is the same
        assert (d["metric"], d["difference"]) == (h["metric"], pytest.approx(h["difference"]))
        assert h["note"].startswith("percentile") or h["metric"].startswith("corpus")


def test_wrappers_and_bem2_api_smoke(tiny_setup, tmp_path, monkeypatch):
    """Every seed entry point through its real code path, at a tiny budget on the tiny model."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "BEM_DATA": str(tiny_setup / "data"),
           "BEM_EXPERIMENTS": str(tiny_setup / "experiments"), "HF_HUB_OFFLINE": "1"}

    def script(*args):
        result = subprocess.run([sys.executable, str(root / args[0]), *args[1:]], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    listing = script("run_bem_experiments.py", "--list-experiments")
    assert "tiny_bem" in listing and "tiny_lora" in listing
    out = script("run_bem_experiments.py", "--experiments", "tiny_lora", "tiny_bem", "--out", "runs/w")
    assert "tiny_bem" in out and (tmp_path / "runs/w/report.md").is_file()
    assert "NO VERDICT" in script("v13_final_analysis.py", "runs/w")
    assert "0 problems" in script("validate_structure.py")
    profile = script("bem_profile.py", "--experiments", "tiny_lora", "tiny_bem", "--prompt-len", "8", "--out", "runs/w")
    assert "base" in profile and "tiny_bem vs tiny_lora: decode_p50_ms" in profile
    conn = sqlite3.connect(tmp_path / "runs/w/results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM profiles WHERE experiment='tiny_bem'").fetchone() == (6,)
    raw = dict(conn.execute("SELECT experiment, value FROM profiles WHERE metric='decode_p50_ms'").fetchall())
    ratios = dict(conn.execute("SELECT versus, ratio FROM profile_ratios WHERE experiment='tiny_bem' "
                               "AND metric='decode_p50_ms'").fetchall())
    assert ratios["tiny_lora"] == pytest.approx(raw["tiny_bem"] / raw["tiny_lora"])
    assert ratios["base"] == pytest.approx(raw["tiny_bem"] / raw["base"])
    from bem.cli import main

    assert main(["report", str(tmp_path / "runs/w")]) == 0  # with profiles: gates table, latency from the profile
    report = (tmp_path / "runs/w/report.md").read_text()
    assert "| tiny_bem | tiny_lora | cpu | " in report and f"{ratios['tiny_lora']:.3f}" in report
    assert "reproduce_v13_stack" in (root / "reproduce_v13_stack.py").read_text()

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    monkeypatch.chdir(tmp_path)
    from bem2 import BEMExperimentRunner

    runner = BEMExperimentRunner(base_model=str(tiny_setup / "model"), experiments=["tiny_lora", "tiny_bem"],
                                 statistical_validation=True, output_dir=str(tmp_path / "runs/bem2"),
                                 experiments_dir=tiny_setup / "experiments")
    result = runner.run_with_validation()
    assert result["verdicts"][0]["verdict"] == "no verdict" and (tmp_path / "runs/bem2/report.md").is_file()


def test_accelerate_launch_runs_the_same_code_with_ddp(tiny_setup, tmp_path):
    """Two CPU processes (gloo DDP) through `accelerate launch`: one unit, written once, by rank 0."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    launcher = Path(sys.executable).parent / "accelerate"
    env = {**os.environ, "BEM_DATA": str(tiny_setup / "data"), "BEM_EXPERIMENTS": str(tiny_setup / "experiments"),
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bem.cli", "run",
                             "--experiments", "tiny_bem", "--out", str(tmp_path / "ddp")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("results in") == 1
    conn = sqlite3.connect(tmp_path / "ddp" / "results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM units").fetchone() == (1,)
    assert conn.execute("SELECT COUNT(*) FROM runs").fetchone() == (1,)
    assert conn.execute("SELECT COUNT(*) FROM item_scores").fetchone() == (12,)


def test_bf16_training_runs(tiny_setup, tmp_path, monkeypatch):
    import math

    from bem.experiments.training import train_unit

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    config = load_experiment("tiny_bem", tiny_setup / "experiments")
    config.training.precision = "bf16"
    unit = train_unit(config, 0, tmp_path / "ckpt", stop_after=2)
    assert len(unit.curve) == 2 and all(math.isfinite(c["loss"]) for c in unit.curve)
    assert all(p.dtype.is_floating_point and p.dtype != __import__("torch").bfloat16
               for p in unit.model.parameters() if p.requires_grad)  # modules stay fp32 under autocast


def test_corpus_comparisons_recompute_the_stored_corpus_scores(tmp_path):
    """On the committed quick run: corpus chrF/BLEU rows exist, and their point values equal the corpus scores
    that sacrebleu computed at evaluation time (metrics table), from the stored predictions and references."""
    import shutil

    from bem.experiments.analysis import compare

    shutil.copy(Path(__file__).parents[1] / "docs/results/quick/results.sqlite", tmp_path / "results.sqlite")
    comparisons, verdicts, units = compare(tmp_path / "results.sqlite", n_resamples=500)
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    for metric in ("corpus_chrf", "corpus_bleu"):
        row = next(c for c in comparisons if c.metric == metric)
        assert row.task == "bible_translate" and row.n == 100 and row.low < row.difference < row.high
        for experiment, value in ((row.experiment, row.mean_experiment), (row.versus, row.mean_versus)):
            stored = conn.execute("SELECT m.value FROM metrics m JOIN units u ON u.id = m.unit_id WHERE u.experiment=? "
                                  "AND u.config_hash=? AND m.task='bible_translate' AND m.metric=?",
                                  (experiment, units[experiment]["hash"], metric)).fetchone()[0]
            assert value == pytest.approx(stored, abs=1e-9)
    # verdicts are about the primary metric only; corpus rows join the BH family
    assert all("corpus" not in reason for v in verdicts for reason in v.reasons)
