"""The router report's statistics on a synthetic router folder: every score is a system's per-episode mean over the
seeds all systems ran, never one system's seeds against another's."""
import numpy as np
import pytest

from bem.experiments.results import ResultsDB
from bem.stats import paired_bca

ROUTER = {"algorithm": "bc", "bank": "tbank", "test_mixed": 30, "test_composite": 10, "train_mixed": 4,
          "train_composite": 1, "bc_epochs": 1, "pg_updates": 1, "pg_episodes": 1, "switch_cost": 0.01}
CONFIG = {"tasks": ["wordnet_qa"], "router": ROUTER, "bem": {"max_switches": 3, "chunk_size": 8},
          "gates": {"alpha": 0.05, "parity_tolerance": 0.05, "latency_ratio": 1.1}}
IDS = [f"wordnet_qa:q{i:02d}" for i in range(30)] + [f"wordnet_qa:q{i:02d}+json_format:j{i}" for i in range(10)]


def _folder(path, seeds_of: dict[str, tuple]) -> dict:
    """Units with random per-episode scores; ar0 is better than the baselines by about 0.2. Returns the truth."""
    rng, truth = np.random.default_rng(1), {}
    db = ResultsDB(path / "results.sqlite")
    for name, seeds in seeds_of.items():
        config = dict(CONFIG, **({"system": name.split("/")[1]} if "/" in name else {}))
        for seed in seeds:
            level = 0.6 if name == "ar0" else 0.4
            truth[(name, seed)] = values = np.clip(rng.normal(level, 0.2, len(IDS)), 0, 1)
            rows = [{"task": "router_composite" if "+" in i else "router_mixed", "id": i, "prediction": "p",
                     "reference": "", "scores": {"score": v, "switches": float(seed)}} for i, v in zip(IDS, values)]
            db.write_unit(0, name, f"h-{name}", config, seed, rows, [], [], 10.0 + seed, 1.0)
    db.close()
    return truth


def test_scores_are_means_over_the_seeds_every_system_ran(tmp_path):
    from bem.router import report

    truth = _folder(tmp_path, {"router/best_single": (0, 1), "router/multitask_lora": (0, 1), "ar0": (0, 1, 2)})
    result = report.analyze(tmp_path, n_resamples=2000)
    assert result["seeds"] == [0, 1] and result["left_out"] == {"ar0": [2]}
    assert result["units"]["ar0"]["train_seconds"] == pytest.approx(11.0)  # the mean of 10, 11, 12
    order = np.argsort(IDS)  # the analysis pairs episodes in sorted id order
    mean = {name: np.mean([truth[(name, s)] for s in (0, 1)], axis=0)[order] for name in ("router/best_single", "ar0")}
    (verdict,) = [v for v in result["verdicts"] if v["versus"] == "router/best_single"]
    r = paired_bca(mean["router/best_single"], mean["ar0"], n_resamples=2000)
    assert (verdict["estimate"], verdict["low"], verdict["high"]) == pytest.approx((r.estimate, r.low, r.high))
    row = {row["system"]: row for row in result["rows"]}["ar0"]
    assert row["score"] == pytest.approx(mean["ar0"].mean()) and row["switches"] == pytest.approx(0.5)
    text = report.write_report(tmp_path, n_resamples=200).read_text()
    assert "Seeds: 0, 1 (the seeds every system ran" in text and "`ar0` seed 2" in text


def test_systems_that_share_no_seed_are_an_error_that_names_each_systems_seeds(tmp_path):
    from bem.router import report

    _folder(tmp_path, {"router/best_single": (0,), "ar0": (1,)})
    with pytest.raises(ValueError, match=r"share no seed \(router/best_single: 0; ar0: 1\)"):
        report.analyze(tmp_path, n_resamples=200)
