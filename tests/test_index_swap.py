"""Index swap (SPEC §6): shuffled/corrupt conditions evaluated by `bem run`, resumed and backfilled, analysed
with paired BCa CIs and reported; on a tiny llama with SmolLM2's tokenizer and a hand-written wordnet_qa."""
import json
import shutil
import sqlite3

import numpy as np
import pytest

from bem.data.wordnet_qa import FEATURES

WORDS = ["apple", "river", "castle", "violin", "comet", "lantern", "meadow", "falcon", "harbor", "pepper",
         "glacier", "saddle", "tulip", "anchor", "beacon", "canyon", "dagger", "ember", "fossil", "gazelle",
         "hammock", "igloo", "jasmine", "kettle"]


def _item(i: int, word: str, split: str) -> dict:
    rng = np.random.default_rng(i)
    evidence = [f"{word}: the thing number {i}.", f"{WORDS[(i + 3) % len(WORDS)]}: something else.",
                f"{WORDS[(i + 5) % len(WORDS)]}: a third thing."]
    item = {"id": f"{split}{i}", "question": f"Which word is thing number {i}?", "answers": [word],
            "evidence": evidence, "features": [round(float(v), 6) for v in rng.uniform(0, 1, len(FEATURES))],
            "slice_a": bool(i % 2)}
    return item


def _wordnet_qa(root):
    """train: 12 items; test: 6 items with their index-swap variants (as wordnet_qa._index_swaps builds them)."""
    train = [_item(i, WORDS[i], "train") for i in range(12)]
    test = [_item(i, WORDS[12 + i], "test") for i in range(6)]
    for i, it in enumerate(test):
        other = test[(i + 1) % len(test)]
        it["evidence_shuffled"] = other["evidence"]
        it["features_shuffled"] = [round(v + 10, 6) for v in other["features"]]
        it["evidence_corrupt"] = [p.replace(it["answers"][0], "zebra") for p in it["evidence"]]
        it["features_corrupt"] = [round(v + 20, 6) for v in it["features"]]
    (root / "wordnet_qa").mkdir(parents=True)
    for split, items in (("train", train), ("dev", train[:2]), ("test", test)):
        (root / "wordnet_qa" / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    from bem.data.prepare import record_task

    record_task("wordnet_qa", root, "hand-made-test")  # runs verify and identify data by the manifest
    return test


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama (SmolLM2's tokenizer), the data above, and two experiments: a chunk-routed BEM that reads the
    evidence features (tiny_bem) and static LoRA (L0_lora, the baseline the analysis compares routed systems to)."""
    from bem.models import load_base, tiny

    root = tmp_path_factory.mktemp("swap")
    tokenizer = load_base("smollm2-135m")[1]
    model = tiny("llama", vocab_size=len(tokenizer))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    test = _wordnet_qa(root / "data")
    experiments = root / "experiments"
    experiments.mkdir()
    common = (f"model: {root / 'model'}\ntasks: [wordnet_qa]\nseeds: [0]\nanchor: null\nside_inputs: {{side}}\n"
              "bem:\n  rank: 4\n  sites: [o_proj, down_proj]\n  controller: {ctrl}\n  chunk_size: 4\n  side_dim: {dim}\n"
              "training:\n  steps: 4\n  batch_size: 2\n  grad_accum: 1\n  lr: 0.01\n  warmup_steps: 1\n"
              "  checkpoint_every: 2\n  max_length: 96\n  train_items: 12\nevaluation:\n  items: 6\n  batch_size: 3\n")
    (experiments / "tiny_bem.yaml").write_text(
        common.format(side="true", ctrl="chunk", dim=5).replace("anchor: null", "anchor: L0_lora")
        .replace("  chunk_size: 4\n", "  chunk_size: 4\n  controller_hidden: 2\n")  # ×1.17 params of L0_lora
        + "gates:\n  parity_tolerance: 0.2\n")
    (experiments / "L0_lora.yaml").write_text(common.format(side="false", ctrl="static", dim=0))
    return {"root": root, "data": root / "data", "experiments": experiments, "test": test}


class Recorder:
    """Wraps bem.evaluate.generate: records each call's description, prompts and side inputs."""

    def __init__(self, monkeypatch, reply=None):
        import bem.evaluate as evaluate

        self.calls, real = [], evaluate.generate

        def generate(model, tokenizer, prompts, max_new_tokens, batch_size=16, side=None, desc="generate", bem_mask=None,
                     decoding="dynamic"):
            replies = ([reply(p) for p in prompts] if reply is not None else
                       real(model, tokenizer, prompts, max_new_tokens, batch_size, side=side, desc=desc,
                            bem_mask=bem_mask, decoding=decoding))
            self.calls.append({"desc": desc, "prompts": prompts, "side": None if side is None else side.numpy(),
                               "replies": replies})
            return replies

        monkeypatch.setattr(evaluate, "generate", generate)

    def descs(self) -> list[str]:
        return [c["desc"] for c in self.calls]


def _copy_first_passage(prompt: str) -> str:
    """An evidence copier: answers with the head word of the first passage."""
    return prompt.split("1. ", 1)[1].split(":", 1)[0]


# --- evaluate_task ----------------------------------------------------------------------------------
def test_conditions_build_prompt_and_side_from_the_swapped_evidence(setup, monkeypatch):
    from bem.evaluate import evaluate_task
    from bem.tasks import side_layout

    recorder = Recorder(monkeypatch, reply=_copy_first_passage)
    layout = side_layout(["json_format", "wordnet_qa"])  # wordnet_qa's features sit at offset 0, width 5
    scores, predictions = {}, {}
    for condition in ("clean", "shuffled", "corrupt"):
        rows, summary = evaluate_task(None, None, "wordnet_qa", 6, "test", 3, setup["data"], layout, condition=condition)
        assert summary["condition"] == condition and [r["id"] for r in rows] == [it["id"] for it in setup["test"]]
        scores[condition] = [r["scores"]["f1"] for r in rows]
        predictions[condition] = [r["prediction"] for r in rows]
    assert recorder.descs() == ["wordnet_qa", "wordnet_qa shuffled", "wordnet_qa corrupt"]
    clean, shuffled, corrupt = recorder.calls
    for k, it in enumerate(setup["test"]):
        assert all(p in shuffled["prompts"][k] for p in it["evidence_shuffled"])
        assert it["evidence"][0] not in shuffled["prompts"][k] and it["question"] in shuffled["prompts"][k]
        assert all(p in corrupt["prompts"][k] for p in it["evidence_corrupt"]) and "zebra" in corrupt["prompts"][k]
        assert np.allclose(clean["side"][k], it["features"])
        assert np.allclose(shuffled["side"][k], it["features_shuffled"])
        assert np.allclose(corrupt["side"][k], it["features_corrupt"])
    # the copier answers right from the clean index only; the shuffled one gives the next item's answer
    assert scores == {"clean": [1.0] * 6, "shuffled": [0.0] * 6, "corrupt": [0.0] * 6}
    assert predictions["shuffled"] == predictions["clean"][1:] + predictions["clean"][:1]
    assert predictions["corrupt"] == ["zebra"] * 6


def test_condition_errors_name_the_condition_task_and_what_is_allowed(setup):
    from bem.evaluate import evaluate_task

    with pytest.raises(ValueError, match=r"condition 'swapped' is not allowed; expected one of "
                                         r"\['clean', 'corrupt', 'features_shuffled', 'shuffled'\]"):
        evaluate_task(None, None, "wordnet_qa", 6, "test", 3, setup["data"], condition="swapped")
    with pytest.raises(ValueError, match=r"task 'json_format' has no condition 'shuffled': index-swap conditions "
                                         r"exist for \['wordnet_qa'\] only"):
        evaluate_task(None, None, "json_format", 6, "test", 3, setup["data"], condition="shuffled")
    with pytest.raises(ValueError, match=r"wordnet_qa item 'train0' of split 'dev' has no 'evidence_corrupt'"):
        evaluate_task(None, None, "wordnet_qa", 2, "dev", 3, setup["data"], condition="corrupt")


# --- bem run: fresh units, crashes, reruns and backfills -------------------------------------------
def _condition_rows(db_path, experiment=None):
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT u.experiment, c.condition, c.task, c.item_id, c.metric, c.value, c.prediction FROM "
                        "condition_scores c JOIN units u ON u.id = c.unit_id WHERE ? IS NULL OR u.experiment = ? "
                        "ORDER BY 1, 2, 3, 4, 5", (experiment, experiment)).fetchall()
    conn.close()
    return rows


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A run folder where `bem run` trained and evaluated both experiments, with the prompts it generated from."""
    from bem.experiments import runner

    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BEM_DATA", str(setup["data"]))
        recorder = Recorder(mp)
        assert runner.run(["tiny_bem", "L0_lora"], out, directory=setup["experiments"]) == [
            ("tiny_bem", 0, "done"), ("L0_lora", 0, "done")]
    return out, recorder


def test_fresh_run_stores_both_conditions_of_every_unit(setup, finished):
    out, recorder = finished
    # the routed unit also gets the features-only swap; static LoRA reads no features, so it does not
    assert recorder.descs() == ["wordnet_qa", "wordnet_qa shuffled", "wordnet_qa corrupt", "wordnet_qa features_shuffled",
                                "wordnet_qa", "wordnet_qa shuffled", "wordnet_qa corrupt"]
    routed, static = recorder.calls[1], recorder.calls[5]
    clean, features_only = recorder.calls[0], recorder.calls[3]
    for k, it in enumerate(setup["test"]):
        assert routed["prompts"][k] == static["prompts"][k]
        assert "\n".join(f"{i + 1}. {p}" for i, p in enumerate(it["evidence_shuffled"])) in routed["prompts"][k]
        assert np.allclose(routed["side"][k], it["features_shuffled"])  # the routed system reads the features
        assert features_only["prompts"][k] == clean["prompts"][k]  # clean text ...
        assert np.allclose(features_only["side"][k], it["features_shuffled"])  # ... another query's features
    assert static["side"] is None  # static LoRA reads the evidence text only
    conn = sqlite3.connect(out / "results.sqlite")
    clean = conn.execute("SELECT unit_id, item_id, metric, prediction FROM item_scores ORDER BY 1, 2, 3").fetchall()
    for condition in ("shuffled", "corrupt"):
        got = conn.execute("SELECT unit_id, item_id, metric FROM condition_scores WHERE condition=? AND task='wordnet_qa' "
                           "ORDER BY 1, 2, 3", (condition,)).fetchall()
        assert got == [r[:3] for r in clean] and len(got) == 2 * 6 * 2  # 2 units × 6 items × (em, f1)
    assert conn.execute("SELECT COUNT(*) FROM item_scores").fetchone() == (2 * 6 * 2,)  # clean rows unchanged
    stored = dict(((u, c, i), p) for u, c, i, p in conn.execute(
        "SELECT unit_id, condition, item_id, prediction FROM condition_scores WHERE metric='f1'"))
    ids = [it["id"] for it in setup["test"]]
    assert conn.execute("SELECT DISTINCT unit_id FROM condition_scores WHERE condition='features_shuffled'").fetchall() == [(1,)]
    for unit, condition, offset in ((1, "shuffled", 1), (1, "corrupt", 2), (1, "features_shuffled", 3),
                                    (2, "shuffled", 5), (2, "corrupt", 6)):
        assert recorder.calls[offset]["desc"] == f"wordnet_qa {condition}"
        assert [stored[(unit, condition, i)] for i in ids] == recorder.calls[offset]["replies"]


def test_crash_during_conditions_keeps_the_unit_and_a_rerun_fills_only_the_gap(setup, tmp_path, monkeypatch):
    import bem.evaluate
    from bem.experiments import runner, training

    monkeypatch.setenv("BEM_DATA", str(setup["data"]))
    out = tmp_path / "run"
    real = bem.evaluate.evaluate_task
    calls = []

    def evaluate_task(*args, condition="clean", **kwargs):
        calls.append((args[2], condition))
        if condition == "corrupt" and crash:
            raise KeyboardInterrupt("killed while evaluating the corrupt index")
        return real(*args, condition=condition, **kwargs)

    monkeypatch.setattr(runner, "evaluate_task", evaluate_task)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        runner.run(["tiny_bem"], out, directory=setup["experiments"])
    conn = sqlite3.connect(out / "results.sqlite")
    assert conn.execute("SELECT COUNT(*) FROM units").fetchone() == (1,)  # the clean unit is committed
    assert conn.execute("SELECT DISTINCT condition FROM condition_scores").fetchall() == [("shuffled",)]
    conn.close()
    shuffled_before = _condition_rows(out / "results.sqlite")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished unit was trained again")

    monkeypatch.setattr(runner, "train_unit", no_training)
    monkeypatch.setattr(training, "train_unit", no_training)
    crash, calls[:] = False, []
    assert runner.run(["tiny_bem"], out, directory=setup["experiments"]) == [("tiny_bem", 0, "backfilled")]
    assert calls == [("wordnet_qa", "corrupt"), ("wordnet_qa", "features_shuffled")]
    rows = _condition_rows(out / "results.sqlite")
    assert {r[1] for r in rows} == {"shuffled", "corrupt", "features_shuffled"} and [r for r in rows if r[1] == "shuffled"] == shuffled_before

    # delete one condition: only it comes back, from the saved adapter, with the same predictions
    conn = sqlite3.connect(out / "results.sqlite")
    with conn:
        conn.execute("DELETE FROM condition_scores WHERE condition='shuffled'")
    conn.close()
    calls[:] = []
    assert runner.run(["tiny_bem"], out, directory=setup["experiments"]) == [("tiny_bem", 0, "backfilled")]
    assert calls == [("wordnet_qa", "shuffled")] and _condition_rows(out / "results.sqlite") == rows
    calls[:] = []
    assert runner.run(["tiny_bem"], out, directory=setup["experiments"]) == [("tiny_bem", 0, "skipped")]
    assert calls == []


def test_backfill_of_a_stored_run_without_adapters_restores_them(setup, finished, tmp_path, monkeypatch):
    """Stored runs commit the database only: the backfill trains the unit again (checked against the stored curve)
    and evaluates the conditions with it; the predictions equal those of the run that kept its adapter."""
    from bem.experiments import runner

    monkeypatch.setenv("BEM_DATA", str(setup["data"]))
    out = tmp_path / "stored"
    out.mkdir()
    shutil.copy(finished[0] / "results.sqlite", out / "results.sqlite")
    conn = sqlite3.connect(out / "results.sqlite")
    with conn:
        conn.execute("DELETE FROM condition_scores")  # a run stored before the index swap existed
    conn.close()
    assert runner.run(["tiny_bem"], out, directory=setup["experiments"]) == [("tiny_bem", 0, "backfilled")]
    assert _condition_rows(out / "results.sqlite") == _condition_rows(finished[0] / "results.sqlite", "tiny_bem")
    assert (out / "adapters").is_dir()


# --- analysis and report ------------------------------------------------------------------------------
def _synthetic_db(path, n=120, l0_seeds=(0, 1)):
    """L0_lora (static) and R1 (routed, reads features): 2 seeds each with all conditions, and a third seed of R1
    without `corrupt` (left out of its analysis). R1 is clean > shuffled > corrupt; L0's shuffled ≈ clean."""
    from bem.experiments.results import ResultsDB

    rng = np.random.default_rng(0)
    ids = [f"q{i:03d}" for i in range(n)]
    db = ResultsDB(path)
    truth = {}
    for name, controller, levels, seeds in (("L0_lora", "static", (0.5, 0.49, 0.3), l0_seeds),
                                             ("R1", "chunk", (0.7, 0.4, 0.2), (0, 1, 2))):
        config = {"tasks": ["wordnet_qa"], "bem": {"controller": controller}, "side_inputs": controller != "static"}
        for seed in seeds:
            values = {c: (rng.uniform(size=n) < p).astype(float) for c, p in zip(("clean", "shuffled", "corrupt"), levels)}
            truth[(name, seed)] = values
            rows = [{"task": "wordnet_qa", "id": i, "prediction": "p", "reference": "",
                     "scores": {"em": values["clean"][k], "f1": values["clean"][k] * 0.5 + 0.25}} for k, i in enumerate(ids)]
            unit = db.write_unit(0, name, f"h{name}", config, seed, rows, [], [], 1.0, 1.0)
            values["features_shuffled"] = (rng.uniform(size=n) < 0.55).astype(float)  # R1's features matter
            conditions = ("shuffled", "corrupt") if (name, seed) != ("R1", 2) else ("shuffled",)
            for condition in conditions + (("features_shuffled",) if controller != "static" else ()):
                db.write_condition(unit, condition, [{"task": "wordnet_qa", "id": i, "prediction": "p", "scores": {
                    "em": values[condition][k], "f1": values[condition][k] * 0.5 + 0.25}} for k, i in enumerate(ids)])
    db.close()
    return truth


def test_analysis_equals_a_direct_paired_bca(tmp_path):
    from bem.experiments import index_swap
    from bem.stats import paired_bca

    truth = _synthetic_db(tmp_path / "results.sqlite")
    result = index_swap.analyze(tmp_path / "results.sqlite", n_resamples=2000)
    systems = {s["experiment"]: s for s in result["systems"]}
    assert set(systems) == {"L0_lora", "R1"} and result["without_conditions"] == []
    assert systems["R1"]["seeds"] == [0, 1] and systems["R1"]["n"] == 120 and systems["R1"]["reads_features"]
    means = {}
    for name in ("L0_lora", "R1"):
        for metric, f in (("em", lambda v: v), ("f1", lambda v: v * 0.5 + 0.25)):
            m = {c: np.mean([f(truth[(name, s)][c]) for s in (0, 1)], axis=0) for c in ("clean", "shuffled", "corrupt")}
            means[(name, metric)] = m
            got = systems[name]["metrics"][metric]
            assert got["clean"] == pytest.approx(m["clean"].mean()) and got["corrupt"] == pytest.approx(m["corrupt"].mean())
            for key, (a, b) in (("clean_minus_shuffled", ("shuffled", "clean")), ("shuffled_minus_corrupt", ("corrupt", "shuffled"))):
                r = paired_bca(m[a], m[b], n_resamples=2000)
                assert (got[key]["estimate"], got[key]["low"], got[key]["high"]) == pytest.approx((r.estimate, r.low, r.high))
            drop, step = got["clean_minus_shuffled"], got["shuffled_minus_corrupt"]
            expected = ("monotone" if drop["low"] > 0 and step["low"] > 0 else
                        "not monotone" if drop["high"] < 0 or step["high"] < 0 else "inconclusive")
            assert got["verdict"] == expected
    assert systems["R1"]["verdict"] == "monotone"  # 0.7 > 0.4 > 0.2 at 120 items and 2 seeds
    assert systems["L0_lora"]["metrics"]["f1"]["clean_minus_shuffled"]["low"] < 0 < \
        systems["L0_lora"]["metrics"]["f1"]["clean_minus_shuffled"]["high"]
    assert systems["L0_lora"]["verdict"] == "inconclusive"
    versus = {v["metric"]: v for v in result["versus_baseline"]}
    assert set(versus) == {"f1", "em"} and all(v["experiment"] == "R1" and v["versus"] == "L0_lora" for v in versus.values())
    for metric, v in versus.items():
        r_drop = means[("R1", metric)]["clean"] - means[("R1", metric)]["shuffled"]
        l_drop = means[("L0_lora", metric)]["clean"] - means[("L0_lora", metric)]["shuffled"]
        r = paired_bca(l_drop, r_drop, n_resamples=2000)
        assert (v["estimate"], v["low"], v["high"]) == pytest.approx((r.estimate, r.low, r.high))
        assert v["drop"] == pytest.approx(r_drop.mean()) and v["drop_versus"] == pytest.approx(l_drop.mean())
        assert v["verdict"] == "larger drop" and v["n"] == 120
    # features-only swap: R1 only (L0 reads no features), over R1's three seeds (all have it)
    (feature,) = result["feature_swap"]
    m = {c: np.mean([truth[("R1", s)][c] * 0.5 + 0.25 for s in (0, 1, 2)], axis=0) for c in ("clean", "features_shuffled")}
    r = paired_bca(m["features_shuffled"], m["clean"], n_resamples=2000)
    assert feature["experiment"] == "R1" and feature["seeds"] == [0, 1, 2] and feature["n"] == 120
    assert (feature["estimate"], feature["low"], feature["high"]) == pytest.approx((r.estimate, r.low, r.high))
    assert feature["verdict"] == ("uses the features" if r.low > 0 else "no evidence it uses them")
    assert feature["identical_predictions"] == 1.0  # the synthetic predictions are all "p"
    # fewer items than min_items: no verdict either way
    assert index_swap.analyze(tmp_path / "results.sqlite", n_resamples=200, min_items=500)["systems"][0]["verdict"] \
        == "too few items"
    # a database written before the index swap existed: every system is listed as lacking its conditions
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    conn.execute("DROP TABLE condition_scores")
    conn.close()
    old = index_swap.analyze(tmp_path / "results.sqlite", n_resamples=200)
    assert old["systems"] == [] and old["without_conditions"] == ["L0_lora", "R1"]
    assert "evaluates only the missing conditions" in "\n".join(index_swap.report_lines(old))
    assert "there is no index to swap" in "\n".join(index_swap.report_lines({"systems": [], "without_conditions": []}))


def test_a_routed_drop_is_compared_with_the_baselines_over_the_seeds_both_ran(tmp_path):
    """L0_lora has seed 0 only, R1 seeds 0 and 1 (2 lacks corrupt): R1's own row keeps both seeds, its comparison with
    L0_lora uses R1's seed 0 alone (one unlucky seed on one side only must not decide it)."""
    from bem.experiments import index_swap
    from bem.stats import paired_bca

    truth = _synthetic_db(tmp_path / "results.sqlite", l0_seeds=(0,))
    result = index_swap.analyze(tmp_path / "results.sqlite", n_resamples=2000)
    assert {s["experiment"]: s["seeds"] for s in result["systems"]} == {"L0_lora": [0], "R1": [0, 1]}
    (v,) = [v for v in result["versus_baseline"] if v["metric"] == "em"]
    assert v["seeds"] == v["seeds_versus"] == [0]
    r_drop = truth[("R1", 0)]["clean"] - truth[("R1", 0)]["shuffled"]
    l_drop = truth[("L0_lora", 0)]["clean"] - truth[("L0_lora", 0)]["shuffled"]
    r = paired_bca(l_drop, r_drop, n_resamples=2000)
    assert (v["estimate"], v["low"], v["high"]) == pytest.approx((r.estimate, r.low, r.high))
    assert v["drop"] == pytest.approx(r_drop.mean())


def test_monotonicity_rule():
    from bem.experiments.index_swap import verdict

    ci = lambda low, high: {"low": low, "high": high}  # noqa: E731
    assert verdict(ci(0.01, 0.2), ci(0.001, 0.1), 100) == "monotone"
    assert verdict(ci(0.01, 0.2), ci(-0.2, -0.01), 100) == "not monotone"
    assert verdict(ci(-0.3, -0.1), ci(-0.01, 0.1), 100) == "not monotone"
    assert verdict(ci(0.01, 0.2), ci(-0.01, 0.1), 100) == "inconclusive"
    assert verdict(ci(0.01, 0.2), ci(0.01, 0.1), 99) == "too few items"


def test_report_has_the_index_swap_section(setup, finished, tmp_path, monkeypatch):
    import re

    from bem.experiments import index_swap
    from bem.experiments.report import write_report

    monkeypatch.setenv("BEM_DATA", str(setup["data"]))
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    text = write_report(out, n_resamples=500).read_text()
    section = text.split("## Index swap (SPEC §6)", 1)[1].split("\n## ", 1)[0]
    result = index_swap.analyze(out / "results.sqlite", n_resamples=500)
    for s in result["systems"]:
        for metric, m in s["metrics"].items():
            row = re.search(rf"^\| {s['experiment']} \| {metric} \| 6 \| 0 \| ([-\d.]+) \| ([-\d.]+) \| ([-\d.]+) \|"
                            rf".* \| too few items \|$", section, re.M)
            assert row and [float(x) for x in row.groups()] == pytest.approx(
                [m["clean"], m["shuffled"], m["corrupt"]], abs=1e-4)
    assert re.search(r"^\| tiny_bem \| L0_lora \| f1 \| 6 \|", section, re.M)
    conn = sqlite3.connect(out / "results.sqlite")
    with conn:
        conn.execute("DELETE FROM condition_scores")
    conn.close()
    text = write_report(out, n_resamples=500).read_text()
    assert "No index-swap conditions are stored for wordnet_qa: run the same `bem run ...` again" in text


def test_routing_statistics_are_stored_for_routed_units_and_backfilled(setup, finished, tmp_path, monkeypatch):
    """`bem run` stores how far routing moves (routing_stats) for routed units only; a folder without them (stored
    before they existed) gets them from the saved adapter and the stored replies, without evaluating anything."""
    import bem.evaluate
    from bem.experiments import runner
    from bem.experiments.results import ResultsDB

    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    db = ResultsDB(out / "results.sqlite")
    before = db.routing(1)  # unit 1: tiny_bem (routed), unit 2: L0_lora (static)
    assert set(before) == {"wordnet_qa"} and db.routing(2) == {}
    assert before["wordnet_qa"]["all"]["items"] == 6 and "moved" in before["wordnet_qa"]["all"]
    with db.conn:
        db.conn.execute("DELETE FROM routing")
    db.close()

    def no_evaluation(*args, **kwargs):
        raise AssertionError("a finished unit was evaluated again")

    monkeypatch.setenv("BEM_DATA", str(setup["data"]))
    monkeypatch.setattr(runner, "evaluate_task", no_evaluation)
    monkeypatch.setattr(bem.evaluate, "generate", no_evaluation)
    assert runner.run(["tiny_bem", "L0_lora"], out, directory=setup["experiments"]) == [
        ("tiny_bem", 0, "backfilled"), ("L0_lora", 0, "skipped")]
    db = ResultsDB(out / "results.sqlite")
    after = db.routing(1)
    db.close()
    assert after.keys() == before.keys() and after["wordnet_qa"].keys() == before["wordnet_qa"].keys()
    for site, stats in before["wordnet_qa"].items():
        assert after["wordnet_qa"][site] == pytest.approx(stats, abs=1e-6)


def test_swap_seeds_limits_the_conditions_to_the_first_seeds_without_changing_the_hash(setup):
    from bem.experiments.config import load_experiment
    from bem.experiments.runner import swap_conditions

    config = load_experiment("tiny_bem", setup["experiments"])
    config.seeds = [0, 1, 2]
    everything = [("wordnet_qa", "shuffled"), ("wordnet_qa", "corrupt"), ("wordnet_qa", "features_shuffled")]
    assert swap_conditions(config, 2) == everything
    before = config.config_hash()
    config.evaluation.swap_seeds = 1
    assert swap_conditions(config, 0) == everything and swap_conditions(config, 1) == swap_conditions(config, 2) == []
    assert config.config_hash() == before  # it changes no clean score: stored units keep their hashes


def test_image_swap_gives_every_image_another_images_features():
    """issue 17's image-swap control: every item gets another image's features (no image keeps its own), questions
    about one image move together, every image's features are used once, and the question text is unchanged."""
    from bem.evaluate import image_swap, with_condition

    items = [{"id": f"test/{n}", "feature_row": row, "question": f"q{n}", "answer": "yes"}
             for n, row in enumerate([3, 3, 7, 9, 9, 9, 12, 20])]
    swapped = with_condition("easy_vqa", items, "features_shuffled")
    assert swapped == image_swap(items)  # deterministic
    assert all(s["feature_row"] != it["feature_row"] for s, it in zip(swapped, items))
    assert [s["question"] for s in swapped] == [it["question"] for it in items]
    moved = {it["feature_row"]: s["feature_row"] for s, it in zip(swapped, items)}
    assert len(set(moved.values())) == len(moved) == 5 and set(moved.values()) == set(moved)  # a permutation
    assert all(moved[it["feature_row"]] == s["feature_row"] for s, it in zip(swapped, items))  # per image
    with pytest.raises(ValueError, match="at least 2 images"):
        image_swap(items[:2])


def test_easy_vqa_question_types_are_stored_as_item_meta():
    from bem.tasks import item_meta, vqa_question_type

    assert [vqa_question_type({"answer": a}) for a in ("yes", "no", "circle", "triangle", "teal", "red")] == \
        ["yes/no", "yes/no", "shape", "shape", "colour", "colour"]
    assert item_meta("easy_vqa", {"answer": "rectangle"}) == {"qtype_shape": 1.0}
    assert item_meta("wordnet_qa", {"slice_a": True}) == {"slice_a": 1.0}
    assert item_meta("bible_translate", {}) == {}
