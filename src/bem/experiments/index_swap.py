"""Index swap (SPEC §6): does a system use the evidence it is given?

Every unit with `wordnet_qa` among its tasks is evaluated on the same test items three times (`bem run`):
`clean` (the retrieved evidence), `shuffled` (another query's passages, features recomputed for them) and
`corrupt` (its own passages with the answers replaced). Clean scores are in `item_scores`, the other two in
`condition_scores`. Per system (experiment, latest config) this module reads only the seeds that have all three
conditions, averages each item's score over those seeds, and computes paired BCa 95% CIs of

    clean − shuffled      (what the right evidence is worth over unrelated evidence)
    shuffled − corrupt    (what unrelated evidence is worth over evidence that points to a wrong answer)

Monotonicity verdict (SPEC §6: a retrieval-aware method must be monotone clean ≥ shuffled ≥ corrupt), on each
metric, the system's verdict being that of the primary metric (F1):
- "monotone" when both CIs have lower bound > 0;
- "not monotone" when either CI has upper bound < 0;
- "inconclusive" otherwise; "too few items" when fewer than `min_items` items are paired.

Routed systems (a controller other than static) against static LoRA (L0_lora, which reads the evidence text
only): per item (clean_r − shuffled_r) − (clean_L0 − shuffled_L0), with a paired BCa CI; a lower bound > 0 means
the routed system depends on the evidence more than static LoRA does. Both conditions swap the text and the features
together, so this does not separate what the controller takes from the features from what the (differently trained)
model takes from the prompt text. The features-only swap does: systems whose controller reads the evidence features
are also evaluated under `features_shuffled` (the clean passages in the prompt, another query's features to the
controller), and clean − features_shuffled (paired BCa CI) is what the controller takes from the features; a CI
containing 0 says the routing ignores them.

Image swap (issue 17): every unit whose controller reads easy_vqa's image features is also evaluated under
`features_shuffled` (the question as it is, another image's features: `bem.evaluate.image_swap`); clean −
features_shuffled of accuracy, with a paired BCa CI, is what the routing takes from the image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bem.stats import BootstrapResult, paired_bca

TASK = "wordnet_qa"
CONDITIONS = ("clean", "shuffled", "corrupt")
FEATURES = "features_shuffled"  # clean text, swapped features: the controller's share
IMAGE_TASK, IMAGE_METRIC = "easy_vqa", "accuracy"  # the image swap (issue 17): the question as it is, another image
METRICS = ("f1", "em")  # the primary metric first: the system's verdict is about it
BASELINE = "L0_lora"
MIN_ITEMS = 100  # as analysis.MIN_ITEMS: fewer paired items than this, no verdict
RULE = ("monotone: the CIs of clean − shuffled and shuffled − corrupt both lie above 0; not monotone: either CI "
        "lies below 0; inconclusive: otherwise")


def _systems(conn, task: str = TASK) -> dict[str, dict]:
    """Experiments whose latest config (what the analysis compares) has `task` among its tasks."""
    out = {}
    for experiment, config_hash, config_json in conn.execute(
            "SELECT u.experiment, u.config_hash, c.json FROM units u JOIN configs c ON c.hash = u.config_hash "
            "GROUP BY u.experiment HAVING u.finished = MAX(u.finished) ORDER BY u.experiment"):
        config = json.loads(config_json)
        if task in config["tasks"] and "bem" in config:  # not a stored baseline system (zero-shot, majority)
            routed = config["bem"]["controller"] != "static"
            out[experiment] = {"hash": config_hash, "routed": routed,
                               "reads_features": routed and config.get("side_inputs") is True}
    return out


def _scores(conn, experiment: str, config_hash: str, metric: str,
            task: str = TASK) -> dict[str, dict[int, dict[str, float]]]:
    """{condition: {seed: {item: value}}} of one system."""
    out: dict[str, dict[int, dict[str, float]]] = {c: {} for c in CONDITIONS + (FEATURES,)}
    clean = conn.execute("SELECT u.seed, s.item_id, s.value FROM item_scores s JOIN units u ON u.id = s.unit_id "
                         "WHERE u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=?",
                         (experiment, config_hash, task, metric))
    for seed, item, value in clean:
        out["clean"].setdefault(seed, {})[item] = value
    swapped = conn.execute("SELECT s.condition, u.seed, s.item_id, s.value FROM condition_scores s JOIN units u "
                           "ON u.id = s.unit_id WHERE u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=?",
                           (experiment, config_hash, task, metric))
    for condition, seed, item, value in swapped:
        if condition in out:
            out[condition].setdefault(seed, {})[item] = value
    return out


def item_means(conn, experiment: str, config_hash: str, metric: str,
               only: list[int] | None = None) -> tuple[list[int], list[str], dict[str, np.ndarray]]:
    """(seeds with all three conditions (of `only` when given), items scored by every one of them, {condition: per-item
    mean over those seeds}), items in sorted order."""
    scores = _scores(conn, experiment, config_hash, metric)
    scores.pop(FEATURES)
    seeds = set.intersection(*(set(by_seed) for by_seed in scores.values()))
    seeds = sorted(seeds if only is None else seeds & set(only))
    if not seeds:
        return [], [], {}
    items = sorted(set.intersection(*(set(scores[c][s]) for c in CONDITIONS for s in seeds)))
    means = {c: np.array([np.mean([scores[c][s][i] for s in seeds]) for i in items]) for c in CONDITIONS}
    return seeds, items, means


def _interval(r: BootstrapResult) -> dict:
    return {"estimate": r.estimate, "low": r.low, "high": r.high, "note": r.note}


def verdict(clean_minus_shuffled: dict, shuffled_minus_corrupt: dict, n: int, min_items: int = MIN_ITEMS) -> str:
    """The monotonicity verdict of RULE from the two CIs."""
    if n < max(2, min_items):
        return "too few items"
    if clean_minus_shuffled["low"] > 0 and shuffled_minus_corrupt["low"] > 0:
        return "monotone"
    if clean_minus_shuffled["high"] < 0 or shuffled_minus_corrupt["high"] < 0:
        return "not monotone"
    return "inconclusive"


def analyze(db_path: Path, n_resamples: int = 10_000, min_items: int = MIN_ITEMS) -> dict:
    """Per system: condition means, the two paired differences with BCa CIs and the verdict; per routed system:
    its clean − shuffled drop against L0_lora's. Plain dicts, read from the database only (it is not written)."""
    from bem.experiments.results import open_for_analysis

    conn = open_for_analysis(db_path)
    try:
        systems = _systems(conn) if conn.execute("SELECT 1 FROM sqlite_master WHERE name='units'").fetchone() else {}
        result = {"task": TASK, "metrics": list(METRICS), "rule": RULE, "n_resamples": n_resamples,
                  "min_items": min_items, "systems": [], "versus_baseline": [], "without_conditions": [], "feature_swap": [],
                  "image_swap": []}
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE name='condition_scores'").fetchone():
            result["without_conditions"] = list(systems)  # a database written before the index swap existed
            return result
        per_item: dict[tuple[str, str], tuple[list[int], list[str], dict[str, np.ndarray]]] = {}
        for name, system in systems.items():
            row = {"experiment": name, "config_hash": system["hash"], "routed": system["routed"],
                   "reads_features": system["reads_features"], "metrics": {}}
            for metric in METRICS:
                seeds, items, means = item_means(conn, name, system["hash"], metric)
                if not items:
                    break
                per_item[(name, metric)] = (seeds, items, means)
                drop = _interval(paired_bca(means["shuffled"], means["clean"], n_resamples=n_resamples))
                step = _interval(paired_bca(means["corrupt"], means["shuffled"], n_resamples=n_resamples))
                row["metrics"][metric] = {
                    "n": len(items), "seeds": seeds, **{c: float(means[c].mean()) for c in CONDITIONS},
                    "clean_minus_shuffled": drop, "shuffled_minus_corrupt": step,
                    "verdict": verdict(drop, step, len(items), min_items)}
            if not row["metrics"]:
                result["without_conditions"].append(name)
                continue
            primary = row["metrics"][METRICS[0]]
            row.update(n=primary["n"], seeds=primary["seeds"], verdict=primary["verdict"])
            result["systems"].append(row)
        result["feature_swap"] = [row for name, system in systems.items() if system["reads_features"]
                                  for row in [_feature_swap(conn, name, system["hash"], n_resamples, min_items)] if row]
        result["image_swap"] = [row for name, system in _systems(conn, IMAGE_TASK).items() if system["reads_features"]
                                for row in [_feature_swap(conn, name, system["hash"], n_resamples, min_items,
                                                          IMAGE_TASK, IMAGE_METRIC)] if row]
        for name, system in systems.items():
            if not system["routed"] or name == BASELINE:
                continue
            for metric in METRICS:
                if (name, metric) not in per_item or (BASELINE, metric) not in per_item:
                    continue
                ours, theirs = per_item[(name, metric)], per_item[(BASELINE, metric)]
                shared = sorted(set(ours[0]) & set(theirs[0]))  # both drops over the same seeds (see shared_seeds)
                if shared:
                    ours, theirs = (item_means(conn, n, systems[n]["hash"], metric, shared) for n in (name, BASELINE))
                result["versus_baseline"].append(_versus(ours, theirs, name, metric, n_resamples, min_items))
        return result
    finally:
        conn.close()


def _feature_swap(conn, name: str, config_hash: str, n_resamples: int, min_items: int, task: str = TASK,
                  metric: str = METRICS[0]) -> dict | None:
    """clean − features_shuffled of `task`'s primary metric, over the seeds and items that have both."""
    scores = _scores(conn, name, config_hash, metric, task)
    clean, swapped = scores["clean"], scores[FEATURES]
    seeds = sorted(set(clean) & set(swapped))
    items = sorted(set.intersection(*(set(clean[s]) & set(swapped[s]) for s in seeds))) if seeds else []
    if not items:
        return None
    a = np.array([np.mean([swapped[s][i] for s in seeds]) for i in items])
    b = np.array([np.mean([clean[s][i] for s in seeds]) for i in items])
    r = paired_bca(a, b, n_resamples=n_resamples)
    outcome = ("too few items" if len(items) < max(2, min_items) else
               "uses the features" if r.low > 0 else "features hurt" if r.high < 0 else "no evidence it uses them")
    return {"experiment": name, "task": task, "metric": metric, "n": len(items), "seeds": seeds, "clean": float(b.mean()),
            "features_shuffled": float(a.mean()), **_interval(r), "verdict": outcome,
            "identical_predictions": _same_predictions(conn, name, config_hash, seeds, task, metric)}


def _same_predictions(conn, name: str, config_hash: str, seeds: list[int], task: str = TASK,
                      metric: str = METRICS[0]) -> float:
    """Share of items whose reply is the same with clean and with swapped features (1.0: the features changed nothing)."""
    rows = conn.execute(
        "SELECT s.prediction = c.prediction FROM item_scores s JOIN units u ON u.id = s.unit_id JOIN condition_scores c "
        "ON c.unit_id = s.unit_id AND c.task = s.task AND c.item_id = s.item_id AND c.metric = s.metric "
        f"WHERE u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=? AND c.condition=? "
        f"AND u.seed IN ({','.join('?' * len(seeds))})", (name, config_hash, task, metric, FEATURES, *seeds)).fetchall()
    return float(np.mean([r[0] for r in rows])) if rows else float("nan")


def _versus(ours: tuple, theirs: tuple, name: str, metric: str, n_resamples: int, min_items: int) -> dict:
    """(clean − shuffled) of a routed system minus that of L0_lora, paired over the items both scored (each side's
    means over the seeds both ran, when they share any)."""
    (seeds_r, items_r, means_r), (seeds_l, items_l, means_l) = ours, theirs
    common = sorted(set(items_r) & set(items_l))
    index_r, index_l = {i: k for k, i in enumerate(items_r)}, {i: k for k, i in enumerate(items_l)}
    pick_r, pick_l = [index_r[i] for i in common], [index_l[i] for i in common]
    drop_r = means_r["clean"][pick_r] - means_r["shuffled"][pick_r]
    drop_l = means_l["clean"][pick_l] - means_l["shuffled"][pick_l]
    r = paired_bca(drop_l, drop_r, n_resamples=n_resamples)
    if len(common) < max(2, min_items):
        outcome = "too few items"
    else:
        outcome = "larger drop" if r.low > 0 else "smaller drop" if r.high < 0 else "inconclusive"
    return {"experiment": name, "versus": BASELINE, "metric": metric, "n": len(common), "seeds": seeds_r,
            "seeds_versus": seeds_l, "drop": float(drop_r.mean()) if common else float("nan"),
            "drop_versus": float(drop_l.mean()) if common else float("nan"), **_interval(r), "verdict": outcome}


def report_lines(result: dict) -> list[str]:
    """The report's "Index swap (SPEC §6)" section, and its "Image swap" section when easy_vqa units have one."""
    return _index_lines(result) + image_swap_lines(result)


IMAGE_OUTCOMES = {"uses the features": "uses the image", "features hurt": "the image hurts",
                  "no evidence it uses them": "no evidence it uses the image"}


def image_swap_lines(result: dict) -> list[str]:
    """easy_vqa's image swap (issue 17): the question as it is, another image's features to the controller. If the
    routing uses the image, accuracy drops: clean − features_shuffled with a paired BCa 95% CI."""
    rows = result.get("image_swap") or []
    if not rows:
        return []
    lines = ["", "## Image swap (easy_vqa)", "", "Each question keeps its text; the controller reads another image's "
             "features (a seeded cyclic shift over the distinct images: no image keeps its own). clean − "
             "features_shuffled is what the routing takes from the image (paired BCa 95% CI; per item, the mean over "
             "the seeds that have both).", "",
             "| experiment | metric | n | seeds | clean | image swapped | difference | 95% CI | same reply | outcome |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in rows:
        lines.append(f"| {f['experiment']} | {f['metric']} | {f['n']} | {','.join(map(str, f['seeds']))} | "
                     f"{f['clean']:.4f} | {f['features_shuffled']:.4f} | {f['estimate']:+.4f} | "
                     f"[{f['low']:+.4f}, {f['high']:+.4f}] | {f['identical_predictions']:.1%} | "
                     f"{IMAGE_OUTCOMES.get(f['verdict'], f['verdict'])} |")
    return lines


def _index_lines(result: dict) -> list[str]:
    if not result["systems"] and not result["without_conditions"] and result.get("image_swap"):
        return []  # an easy_vqa folder: its image swap is the section
    lines = ["", "## Index swap (SPEC §6)", ""]
    if not result["systems"] and not result["without_conditions"]:
        lines.append(f"No experiment in this folder has {TASK} among its tasks: there is no index to swap.")
        return lines
    if not result["systems"]:
        lines.append(f"No index-swap conditions are stored for {TASK}: run the same `bem run ...` again with `--out` "
                     "this folder; it evaluates only the missing conditions of finished units.")
        return lines
    lines += [f"`{TASK}` test items evaluated with the clean index, a shuffled one (another query's passages and "
              "features) and a corrupted one (answers replaced in the passages). Per item, the score is averaged over "
              "the seeds that have all three conditions; paired BCa 95% CIs, "
              f"{result['n_resamples']:,} resamples. Verdict ({METRICS[0]} decides): {RULE}; fewer than "
              f"{result['min_items']} items: too few items.", "",
              "| experiment | metric | n | seeds | clean | shuffled | corrupt | clean − shuffled | 95% CI | "
              "shuffled − corrupt | 95% CI | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["systems"]:
        for metric, m in s["metrics"].items():
            a, b = m["clean_minus_shuffled"], m["shuffled_minus_corrupt"]
            lines.append(f"| {s['experiment']} | {metric} | {m['n']} | {','.join(map(str, m['seeds']))} | "
                         f"{m['clean']:.4f} | {m['shuffled']:.4f} | {m['corrupt']:.4f} | {a['estimate']:+.4f} | "
                         f"[{a['low']:+.4f}, {a['high']:+.4f}] | {b['estimate']:+.4f} | [{b['low']:+.4f}, {b['high']:+.4f}] "
                         f"| {m['verdict']} |")
    if result["without_conditions"]:
        lines += ["", "Without stored conditions (run the same `bem run ...` again with `--out` this folder): "
                  + ", ".join(result["without_conditions"]) + "."]
    if result.get("feature_swap"):
        lines += ["", "Features-only swap: the clean passages in the prompt, another query's evidence features to the "
                  "controller. clean − features_shuffled is what the routing takes from the features (paired BCa 95% CI).",
                  "", "| experiment | metric | n | seeds | clean | features shuffled | difference | 95% CI | same reply | outcome |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for f in result["feature_swap"]:
            lines.append(f"| {f['experiment']} | {f['metric']} | {f['n']} | {','.join(map(str, f['seeds']))} | "
                         f"{f['clean']:.4f} | {f['features_shuffled']:.4f} | {f['estimate']:+.4f} | "
                         f"[{f['low']:+.4f}, {f['high']:+.4f}] | {f['identical_predictions']:.1%} | {f['verdict']} |")
    lines += ["", f"Routed systems against {BASELINE} (reads the evidence text only): the routed system's clean − "
              f"shuffled drop minus {BASELINE}'s, paired by item, each averaged over the seeds both ran; a CI above 0 (larger drop): the routed system "
              f"depends on the evidence more than {BASELINE} does (text and features are swapped together, so this "
              "does not say which of the two it reads).", ""]
    if not result["versus_baseline"]:
        lines.append(f"No pair: this folder needs a routed system and {BASELINE}, both with conditions stored.")
        return lines
    lines += ["| experiment | versus | metric | n | drop | drop of versus | difference | 95% CI | outcome |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in result["versus_baseline"]:
        lines.append(f"| {v['experiment']} | {v['versus']} | {v['metric']} | {v['n']} | {v['drop']:+.4f} | "
                     f"{v['drop_versus']:+.4f} | {v['estimate']:+.4f} | [{v['low']:+.4f}, {v['high']:+.4f}] | "
                     f"{v['verdict']} |")
    return lines
