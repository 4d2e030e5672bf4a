"""`bem analyze`: paired comparisons, BH-FDR and verdicts, computed from the results database only."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bem.errors import DataError
from bem.stats import benjamini_hochberg, cohens_dz, hierarchical_test, paired_bca_family, permutation_pvalues
from bem.tasks import QUESTION_TYPE_KEYS, SPECS

LOWER_IS_BETTER = {"violation", "violation_prob"}
MIN_ITEMS = 100  # fewer paired items than this: no verdict
BASELINE = "L0_lora"
TEXT_BASELINES = ("mm/majority", "mm/zero_shot")
"""easy_vqa's systems that never see the image (bem.mm), stored beside every easy_vqa unit: every experiment that
scores easy_vqa is also compared with them."""
NOT_APPLICABLE = "note:"


@dataclass
class Comparison:
    experiment: str
    versus: str
    task: str
    slice: str
    metric: str
    n: int
    seeds: int
    mean_experiment: float
    mean_versus: float
    difference: float  # improvement: positive = the experiment is better
    low: float
    high: float
    p: float  # from the same resamples as [low, high]: p < 0.05 exactly when the 95% interval excludes 0
    p_bh: float = 1.0  # Benjamini–Hochberg over every comparison's p
    effect_size: float = 0.0
    note: str = ""
    p_signflip: float = float("nan")  # secondary: sign-flip (corpus: approximate-randomisation) permutation p


@dataclass
class Verdict:
    experiment: str
    versus: str
    verdict: str  # promote | reject | no verdict
    reasons: list[str] = field(default_factory=list)


def _units(conn) -> dict[str, dict]:
    """Per experiment: its latest config hash, config and seeds."""
    out = {}
    for experiment, config_hash, config_json, data in conn.execute(
            "SELECT u.experiment, u.config_hash, c.json, u.data_fingerprint FROM units u JOIN configs c ON "
            "c.hash = u.config_hash GROUP BY u.experiment HAVING u.finished = MAX(u.finished) ORDER BY u.experiment"):
        seeds = [s for (s,) in conn.execute("SELECT seed FROM units WHERE experiment=? AND config_hash=? ORDER BY seed",
                                            (experiment, config_hash))]
        profile: dict[str, dict[str, float]] = {}  # device -> metric -> value
        for device, metric, value in conn.execute("SELECT device, metric, value FROM profiles WHERE experiment=? "
                                                  "AND config_hash=?", (experiment, config_hash)):
            profile.setdefault(device, {})[metric] = value
        ratios: dict[str, dict[str, dict[str, float]]] = {}  # versus -> device -> metric -> ratio
        for versus, device, metric, ratio in conn.execute("SELECT versus, device, metric, ratio FROM profile_ratios "
                                                          "WHERE experiment=? AND config_hash=?", (experiment, config_hash)):
            ratios.setdefault(versus, {}).setdefault(device, {})[metric] = ratio
        profiled = {}  # device -> status of the profiled modules (trained | untrained); none: profiled before it was stored
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name='profile_units'").fetchone():
            profiled = dict(conn.execute("SELECT device, status FROM profile_units WHERE experiment=? AND config_hash=?",
                                         (experiment, config_hash)).fetchall())
        out[experiment] = {"hash": config_hash, "data": json.loads(data) if data else None,
                           "config": json.loads(config_json), "seeds": seeds, "profile": profile,
                           "ratios": ratios, "profiled": profiled}
    return out


def shared_seeds(units: dict, name: str, versus: str) -> list[int] | None:
    """The seeds a comparison of `name` with `versus` uses: those both ran, so that neither side's mean includes a seed
    the other lacks (a seed fixes data order and initialisation, and one unlucky seed on one side only would decide
    the comparison); None when they share no seed or when `versus` is a stored baseline system (majority, zero-shot:
    deterministic, stored as seed 0 and the same for every seed), so each side's own seeds are used, unpaired."""
    if "system" in units[versus]["config"]:
        return None
    common = sorted(set(units[name]["seeds"]) & set(units[versus]["seeds"]))
    return common or None


def _seed_scores(conn, experiment: str, config_hash: str, task: str, metric: str,
                 seeds: list[int] | None = None) -> list[dict[str, float]]:
    """Per seed (in seed order; only `seeds` when given), each item's score: the seed × item bootstrap's input."""
    by_seed: dict[int, dict[str, float]] = {}
    for seed, item, value in conn.execute(
            "SELECT u.seed, s.item_id, s.value FROM item_scores s JOIN units u ON u.id = s.unit_id WHERE "
            "u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=?", (experiment, config_hash, task, metric)):
        if seeds is None or seed in seeds:
            by_seed.setdefault(seed, {})[item] = value
    return [scores for _, scores in sorted(by_seed.items())]


def _item_means(conn, experiment: str, config_hash: str, task: str, metric: str,
                seeds: list[int] | None = None) -> dict[str, float]:
    """Per item, the mean over seeds (only `seeds` when given) that scored it."""
    totals: dict[str, list[float]] = {}
    for scores in _seed_scores(conn, experiment, config_hash, task, metric, seeds):
        for item, value in scores.items():
            totals.setdefault(item, []).append(value)
    return {item: float(np.mean(values)) for item, values in totals.items()}


def compare(db_path: Path, n_resamples: int = 10_000,
            hierarchical: bool = False) -> tuple[list[Comparison], list[Verdict], dict]:
    """Paired comparisons of every experiment with its anchor and with static LoRA, and their verdicts.
    Per-item metrics: BCa of the per-item means over seeds and the BCa p of the same resamples; with
    `hierarchical`, a seed × item percentile bootstrap and its p instead (seed-to-seed variance in the interval;
    seeds paired across the two systems when both ran the same seeds, since a seed fixes data order and
    initialisation). The p of each comparison agrees with its interval and is the one BH and the verdict use;
    the sign-flip permutation p of the per-item means is kept beside it as `p_signflip`."""
    from bem.experiments.results import open_for_analysis

    conn = open_for_analysis(db_path)
    units = _units(conn)
    slice_a = {(t, i) for t, i in conn.execute("SELECT task, item_id FROM item_meta WHERE key='slice_a' AND value=1")}
    qtypes = {}  # easy_vqa: question type → its items (slices besides B)
    for t, i, key in conn.execute("SELECT task, item_id, key FROM item_meta WHERE key LIKE 'qtype_%' AND value=1"):
        qtypes.setdefault(key, set()).add((t, i))
    comparisons = []
    pairs, apart = [], {}
    for name, unit in units.items():
        if "system" in unit["config"]:  # a stored baseline system (zero-shot, majority): compared with, never a subject
            continue
        baseline = (unit["config"].get("baseline") or BASELINE) if unit["config"]["bem"].get("experts", 1) == 1 else None
        text = TEXT_BASELINES if "easy_vqa" in unit["config"]["tasks"] else []  # a bank's experts are not v13 variants
        for versus in dict.fromkeys([unit["config"]["anchor"], baseline, *text]):
            if versus and versus != name and versus in units:
                differ = _different_builds(units[name], units[versus])
                if differ:
                    apart[(name, versus)] = differ
                else:
                    pairs.append((name, versus))
    rows = []  # (name, versus, task, slice, metric, ids, a, b, sign, (A, B) seeds × items or None)
    for name, versus in pairs:
        for task in units[name]["config"]["tasks"]:
            metric, seeds = SPECS[task].primary, shared_seeds(units, name, versus)
            ours = _item_means(conn, name, units[name]["hash"], task, metric, seeds)
            theirs = _item_means(conn, versus, units[versus]["hash"], task, metric, seeds)
            common = sorted(set(ours) & set(theirs))
            if hierarchical:  # only items that every seed of both systems scored
                seeds_ours = _seed_scores(conn, name, units[name]["hash"], task, metric, seeds)
                seeds_theirs = _seed_scores(conn, versus, units[versus]["hash"], task, metric, seeds)
                common = [i for i in common if all(i in scores for scores in seeds_ours + seeds_theirs)]
            if not common:  # a task the other system does not score (a text baseline scores easy_vqa only)
                continue
            slices = [("B", common)] + ([("A", [i for i in common if (task, i) in slice_a])] if task == "wordnet_qa" else [])
            if task == "easy_vqa":  # by question type: yes/no, shape, colour
                slices += [(label, [i for i in common if (task, i) in qtypes.get(key, ())])
                           for label, key in QUESTION_TYPE_KEYS.items()]
                slices = [(label, ids) for label, ids in slices if ids]
            for slice_name, ids in slices:
                sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
                per_seed = ((sign * np.array([[sc[i] for i in ids] for sc in seeds_theirs]),
                             sign * np.array([[sc[i] for i in ids] for sc in seeds_ours])) if hierarchical else None)
                rows.append((name, versus, task, slice_name, metric, ids, sign * np.array([theirs[i] for i in ids]),
                             sign * np.array([ours[i] for i in ids]), sign, per_seed))
    # comparisons on the same items share their resamples (stats.paired_bca_family): one pass per item set
    groups: dict[tuple, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault((row[2], row[3], tuple(row[5])), []).append(k)
    results: dict[int, tuple] = {}
    for members in groups.values():
        a = np.array([rows[k][6] for k in members]).reshape(len(members), -1)
        b = np.array([rows[k][7] for k in members]).reshape(len(members), -1)
        signflip = permutation_pvalues(a, b, n_resamples=n_resamples)
        if hierarchical:  # the same seed numbers in both systems share data order and init: paired seeds
            for k, p_signflip in zip(members, signflip):
                name, versus = rows[k][:2]
                paired = shared_seeds(units, name, versus) is not None  # then both sides hold exactly those seeds
                results[k] = (hierarchical_test(*rows[k][9], n_resamples=n_resamples, paired_seeds=paired)[0],
                              float(p_signflip))
            continue
        intervals = paired_bca_family(a, b, n_resamples=n_resamples)
        results.update({k: (r, float(p)) for k, r, p in zip(members, intervals, signflip)})
    for k, (name, versus, task, slice_name, metric, ids, a, b, sign, _) in enumerate(rows):
        r, p_signflip = results[k]
        comparisons.append(Comparison(
            name, versus, task, slice_name, metric, len(ids), _seed_count(units, name, versus),
            float(np.mean(b) * sign) if len(ids) else float("nan"), float(np.mean(a) * sign) if len(ids) else float("nan"),
            r.estimate, r.low, r.high, r.p, effect_size=cohens_dz(a, b), note=r.note, p_signflip=p_signflip))
    comparisons += _corpus_comparisons(conn, units, pairs, n_resamples)
    adjusted, _ = benjamini_hochberg([c.p for c in comparisons])
    for c, p in zip(comparisons, adjusted):
        c.p_bh = float(p)
    verdicts = [_verdict(name, versus, [c for c in comparisons if (c.experiment, c.versus) == (name, versus)], units)
                for name, versus in pairs]
    verdicts += [Verdict(name, versus, "no verdict", [
        f"not compared: trained and scored on different data builds ({'; '.join(differ)}); scores of different data "
        f"are never paired — run `bem run` on this folder so both have units on the current build"])
        for (name, versus), differ in apart.items()]
    conn.close()
    return comparisons, verdicts, units


def _different_builds(ours: dict, theirs: dict) -> list[str]:
    """Tasks both experiments score whose data builds differ ('unknown' for units stored before builds were)."""
    a, b = ours.get("data") or {}, theirs.get("data") or {}
    shared = [t for t in ours["config"]["tasks"] if t in theirs["config"]["tasks"]]
    return [f"{t} {a.get(t, 'unknown')} vs {b.get(t, 'unknown')}" for t in shared if a.get(t) != b.get(t)]


CORPUS_METRICS = {"bible_translate": ("corpus_chrf", "corpus_bleu")}  # tasks with corpus-level metrics


def _references(conn, task: str, ids: list[str]) -> dict[str, str]:
    """Stored references of the items; ones missing (units written before references were stored) are
    read from the prepared data once and stored, so the database alone reproduces the analysis after."""
    refs = dict(conn.execute("SELECT item_id, reference FROM item_refs WHERE task=?", (task,)).fetchall())
    missing = [i for i in ids if i not in refs]
    if missing:
        from bem.tasks import read_split

        try:
            items = {it["id"]: it for split in ("test", "dev") for it in read_split(task, split)}
        except (OSError, DataError):  # no prepared data here: the comparison uses the stored references only
            return refs
        found = [(task, i, SPECS[task].reference(items[i])) for i in missing if i in items]
        with conn:
            conn.executemany("INSERT OR IGNORE INTO item_refs VALUES (?, ?, ?)", found)
        refs.update({i: r for _, i, r in found})
    return refs


def corpus_scores(conn, unit_id: int, task: str) -> dict[str, float]:
    """A unit's corpus metrics recomputed from its stored replies, on each reply's `TaskSpec.hypothesis` (what
    `TaskSpec.corpus` gives now; units stored before it scored the raw replies in their `metrics` rows)."""
    from bem import metrics

    if task not in CORPUS_METRICS:
        return {}
    rows = conn.execute("SELECT item_id, prediction FROM item_scores WHERE unit_id=? AND task=? AND metric=? "
                        "ORDER BY rowid", (unit_id, task, SPECS[task].primary)).fetchall()
    refs = _references(conn, task, [i for i, _ in rows])
    kept = [(SPECS[task].hypothesis(p), refs[i]) for i, p in rows if i in refs]
    if not kept:
        return {}
    hyps, references = map(list, zip(*kept))
    scorers = {"corpus_chrf": metrics.corpus_chrf, "corpus_bleu": metrics.corpus_bleu}
    return {metric: float(scorers[metric](hyps, references)) for metric in CORPUS_METRICS[task]}


def _seed_count(units: dict, name: str, versus: str) -> int:
    """How many of `name`'s seeds its comparison with `versus` uses (see `shared_seeds`)."""
    return len(shared_seeds(units, name, versus) or units[name]["seeds"])


def _corpus_comparisons(conn, units: dict, pairs: list, n_resamples: int) -> list[Comparison]:
    """Corpus BLEU/chrF comparisons (SPEC §7): the corpus statistic is recomputed on every resample of items.
    With several seeds, each item's sufficient statistics are summed over the seeds (the seeds' outputs
    pooled into one corpus). The stored predictions are raw replies; the corpus is built from each one's
    `TaskSpec.hypothesis`, the string its per-item score was computed on. p: the BCa p of the same resamples;
    p_signflip: the approximate-randomisation p."""
    from bem import metrics
    from bem.stats import paired_bca_corpus, permutation_pvalue_corpus

    out, cache = [], {}

    def predictions(experiment: str, task: str, seeds=None) -> dict[int, dict[str, str]]:  # seed -> item -> hypothesis
        rows = conn.execute("SELECT u.seed, s.item_id, s.prediction FROM item_scores s JOIN units u ON u.id = s.unit_id "
                            "WHERE u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=?",
                            (experiment, units[experiment]["hash"], task, SPECS[task].primary)).fetchall()
        by_seed: dict[int, dict[str, str]] = {}
        for seed, item, prediction in rows:
            if seeds is None or seed in seeds:
                by_seed.setdefault(seed, {})[item] = SPECS[task].hypothesis(prediction)
        return by_seed

    def statistics(experiment: str, task: str, metric: str, ids: tuple, refs: dict, seeds) -> np.ndarray:
        key = (experiment, task, metric, ids, tuple(seeds or ()))
        if key not in cache:
            by_seed = predictions(experiment, task, seeds)
            cache[key] = sum(metrics.corpus_statistics(metric, [p[i] for i in ids], [refs[i] for i in ids])
                             for p in by_seed.values())
        return cache[key]

    for name, versus in pairs:
        for task in units[name]["config"]["tasks"]:
            if task not in CORPUS_METRICS:
                continue
            seeds = shared_seeds(units, name, versus)
            ours, theirs = predictions(name, task, seeds), predictions(versus, task, seeds)
            if not ours or not theirs:
                continue
            common = set.intersection(*(set(p) for p in list(ours.values()) + list(theirs.values())))
            refs = _references(conn, task, sorted(common))
            ids = tuple(sorted(i for i in common if i in refs))
            if len(ids) < 2:
                continue
            for metric in CORPUS_METRICS[task]:
                sa, sb = statistics(versus, task, metric, ids, refs, seeds), statistics(name, task, metric, ids, refs, seeds)
                score = metrics.corpus_score_from_statistics(metric)
                r = paired_bca_corpus(sa, sb, score, n_resamples=n_resamples)
                p_signflip = permutation_pvalue_corpus(sa, sb, score, n_resamples=n_resamples)
                out.append(Comparison(name, versus, task, "B", metric, len(ids), _seed_count(units, name, versus),
                                      score(sb.sum(0)), score(sa.sum(0)), r.estimate, r.low, r.high, r.p,
                                      note=r.note or "corpus statistic recomputed per resample", p_signflip=p_signflip))
    return out


def _verdict(name: str, versus: str, comps: list[Comparison], units: dict) -> Verdict:
    from bem.budget import budget
    from bem.module.config import BEMConfig

    reasons, too_small = [], False
    alpha = units[name]["config"]["gates"].get("alpha", 0.05)  # gates.alpha: the Benjamini–Hochberg level
    for c in (c for c in comps if c.slice == "B" and c.metric == SPECS[c.task].primary):
        if c.n < MIN_ITEMS:
            too_small = True
            reasons.append(f"{c.task}: only {c.n} paired items (< {MIN_ITEMS}): sample too small for a verdict")
            continue
        if not c.low > 0:
            reasons.append(f"{c.task} {c.metric}: BCa 95% CI lower bound {c.low:+.4f} is not > 0")
        if not c.p_bh < alpha:
            reasons.append(f"{c.task} {c.metric}: BH-adjusted p = {c.p_bh:.3g} is not < {alpha:g} (gates.alpha)")
    reasons += guard_reasons(comps, alpha)
    config = units[name]["config"]
    gates = config["gates"]
    theirs_cfg = units[versus]["config"]
    if "system" in theirs_cfg:  # a system without a module (zero-shot, a lookup table): nothing to hold at parity
        reasons.append(f"{NOT_APPLICABLE} {versus} adds no module, so budget parity and the latency and memory gates "
                       "do not apply; the verdict rests on the scores")
    else:
        ours = budget(config["model"], BEMConfig.from_dict(config["bem"]))
        theirs = budget(theirs_cfg["model"], BEMConfig.from_dict(theirs_cfg["bem"]))
        p_ratio, f_ratio = ours.parameters / theirs.parameters, ours.flops_per_token / theirs.flops_per_token
        tol = gates["parity_tolerance"]
        if abs(p_ratio - 1) > tol or abs(f_ratio - 1) > tol:
            reasons.append(f"budget parity fails: added parameters ×{p_ratio:.3f}, FLOPs/token ×{f_ratio:.3f} "
                           f"(allowed ±{tol:.0%})")
        reasons += _gate_reasons(units, name, versus, gates)
    seeds, extra = shared_seeds(units, name, versus), {}
    if seeds is not None:  # seeds one side ran and the other did not are left out of the comparison: say which
        extra = {e: sorted(set(units[e]["seeds"]) - set(seeds)) for e in (name, versus)}
        extra = {e: s for e, s in extra.items() if s}
    if extra:
        reasons.append(f"{NOT_APPLICABLE} compared on the seeds both ran ({', '.join(map(str, seeds))}); left out: "
                       + "; ".join(f"{e} seeds {', '.join(map(str, s))}" for e, s in extra.items()))
    if units[name]["seeds"] and len(seeds or units[name]["seeds"]) < 2:
        reasons.append("single seed: seed-to-seed variance is not in the interval")
    blocking = [r for r in reasons if not r.startswith(("single seed", NOT_APPLICABLE))]
    verdict = "no verdict" if too_small else ("promote" if not blocking else "reject")
    return Verdict(name, versus, verdict, reasons)


def guard_reasons(comps: list[Comparison], alpha: float = 0.05) -> list[str]:
    """SPEC §7's last gate: no guard metric significantly worse. Guards are the compared metrics a verdict is not
    about (corpus BLEU/chrF beside chrF, and anything else compared on all items); significantly worse means the
    whole BCa interval is below 0 and the BH-adjusted p is below alpha (improvement is signed, so this holds for
    lower-is-better metrics too)."""
    return [f"guard {c.task} {c.metric} significantly worse: {c.difference:+.4f}, CI [{c.low:+.4f}, {c.high:+.4f}], "
            f"BH p = {c.p_bh:.3g}" for c in comps
            if c.slice == "B" and c.metric != SPECS[c.task].primary and c.high < 0 and c.p_bh < alpha]


def _gate_reasons(units: dict, name: str, versus: str, gates: dict) -> list[str]:
    """Latency, memory and KV-hit-rate gates on every device profiled: ratios measured in one `bem profile`
    process are preferred; raw values of the two profiles are the fallback."""
    stored = units[name].get("ratios", {}).get(versus, {})
    ours_p, theirs_p = units[name].get("profile", {}), units[versus].get("profile", {})
    devices = sorted(set(stored) | (set(ours_p) & set(theirs_p)))
    if not devices:
        return ["latency and memory gates not measured (run `bem profile --out` on this folder)"]
    reasons = []
    for device in devices:
        ours, theirs, ratio = ours_p.get(device, {}), theirs_p.get(device, {}), stored.get(device)
        on = f" on {device}" if len(devices) > 1 else ""
        for who in (name, versus):  # gates measured on fresh modules (ΔW = 0) measure the base model
            status = units[who].get("profiled", {}).get(device, "unknown")
            if status != "trained":
                reasons.append(f"gates not measured on trained modules{on}: {who} was profiled {status} (rerun "
                               "`bem profile --out` on this folder: it loads each finished unit's adapter)")
        latency = ratio["decode_p50_ms"] if ratio else ours["decode_p50_ms"] / theirs["decode_p50_ms"]
        if latency > gates["latency_ratio"]:
            reasons.append(f"latency gate fails{on}: decode p50 ×{latency:.3f} (allowed ≤ ×{gates['latency_ratio']})")
        memory = ratio["peak_memory_mb"] if ratio else ours["peak_memory_mb"] / max(theirs["peak_memory_mb"], 1e-9)
        if memory > gates["memory_ratio"]:
            reasons.append(f"memory gate fails{on}: peak memory ×{memory:.3f} (allowed ≤ ×{gates['memory_ratio']})")
        if ours.get("kv_hit_rate", 0.0) < theirs.get("kv_hit_rate", 0.0):
            reasons.append(f"KV hit rate gate fails{on}: {ours.get('kv_hit_rate', 0):.3f} < {theirs.get('kv_hit_rate', 0):.3f}")
    return reasons


def analyze(run_dir: Path, n_resamples: int = 10_000, hierarchical: bool = False) -> dict:
    """Comparisons and verdicts; the verdicts are also stored in the database (replacing earlier ones)."""
    from bem.experiments.results import ResultsDB, writable

    db_path = Path(run_dir) / "results.sqlite"
    comparisons, verdicts, units = compare(db_path, n_resamples, hierarchical)
    stored = writable(db_path)  # a read-only (archived) database is analysed all the same; verdicts are not stored
    if stored:
        db = ResultsDB(db_path, create=False)
        try:
            with db.conn:
                db.conn.execute("DELETE FROM verdicts")
                db.conn.executemany("INSERT INTO verdicts VALUES (?, ?, ?, ?, ?, ?)", [
                    (v.experiment, units[v.experiment]["hash"], v.versus, v.verdict, json.dumps(v.reasons),
                     json.dumps([asdict(c) for c in comparisons if (c.experiment, c.versus) == (v.experiment, v.versus)]))
                    for v in verdicts])
        finally:
            db.close()
    from bem.experiments import index_swap  # index swap (SPEC §6): bem/experiments/index_swap.py

    index_swap_result = index_swap.analyze(db_path, n_resamples)
    return {"index_swap": index_swap_result, "verdicts_stored": stored, "method": "seed × item percentile bootstrap (seeds paired where both ran the same)" if hierarchical else "BCa of per-item means over seeds",
            "units": {k: {"config_hash": v["hash"], "data": v["data"], "seeds": v["seeds"], "config": v["config"]}
                      for k, v in units.items()},
            "comparisons": [asdict(c) for c in comparisons], "verdicts": [asdict(v) for v in verdicts]}
