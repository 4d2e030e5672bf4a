"""The router's analysis and report (issue 15, items 6–7): every system on the same test episodes, paired.

For each system: mean score (mixed stream, composite episodes, all), the paired difference to the best single expert
with its BCa 95% CI, and the share of the gap between the best single expert and the per-item oracle it recovers,
    G = (mean s − mean best) / (mean oracle − mean best),
with its BCa CI (the ratio recomputed on every resample of episodes). Verdicts (SPEC §7) for the routers: AR0 against
the best single expert and the multi-task LoRA, AR1 against those and against AR0; promote only if the CI's lower bound is
above 0, the Benjamini–Hochberg adjusted p (sign-flip permutation, over the family of these comparisons) is below
0.05, the added parameters are within the parity tolerance of the bank's and the router's decode step is within the
latency gate of a fixed expert's; otherwise reject, with the reasons.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bem.experiments.results import open_for_analysis, wall_clock, wall_clock_lines  # noqa: E402
from bem.stats import benjamini_hochberg, paired_bca, permutation_pvalue  # noqa: E402

PNG_META = {"Software": None}
ORDER = ["router/item_oracle", "router/task_oracle", "ar1_pg", "ar0_bc", "router/arrow", "router/multitask_lora",
         "router/all_on", "router/random", "router/best_single"]


def router_units(conn) -> dict[str, dict]:
    """{system: {ids: {seed: unit id}, seeds, config, train_seconds, eval_seconds}} of the router folder's units: each
    system's latest config with every seed it ran (a rerun of a seed: the later unit); seconds are means over seeds."""
    rows = conn.execute("SELECT u.id, u.experiment, u.config_hash, c.json, u.seed, u.train_seconds, u.eval_seconds "
                        "FROM units u JOIN configs c ON c.hash = u.config_hash ORDER BY u.finished").fetchall()
    latest = {name: (config_hash, config) for _, name, config_hash, config, *_ in rows}
    units, seconds = {}, {}
    latest = {name: (config_hash, json.loads(config)) for name, (config_hash, config) in latest.items()}
    for unit, name, config_hash, _, seed, train, evaluation in rows:
        config = latest[name][1]
        if config_hash != latest[name][0] or config.get("router") is None:
            continue
        units.setdefault(name, {"config": config, "ids": {}})["ids"][seed] = unit
        seconds.setdefault(name, {})[seed] = (train, evaluation)
    for name, u in units.items():
        u["seeds"] = sorted(u["ids"])
        u["train_seconds"], u["eval_seconds"] = (float(np.mean(column)) for column in zip(*seconds[name].values()))
    return units


def shared_seeds(units: dict) -> list[int]:
    """The seeds every system of the folder ran: all scores are means over these, so that no comparison sets one
    system's seeds against another's (a seed fixes the bank, the episode order and the router's initialisation)."""
    seeds = sorted(set.intersection(*(set(u["ids"]) for u in units.values()))) if units else []
    if units and not seeds:
        have = "; ".join(f"{name}: {','.join(map(str, u['seeds']))}" for name, u in units.items())
        raise ValueError(f"the router systems share no seed ({have}); run the same `bem run --experiments ...` with "
                         "--seeds covering every system's seeds to complete them")
    return seeds


def is_router_folder(run_dir: Path) -> bool:
    path = Path(run_dir) / "results.sqlite"
    if not path.is_file():
        return False
    conn = open_for_analysis(path)
    try:
        return bool(router_units(conn))
    finally:
        conn.close()


def _scores(conn, units: list[int], metric: str = "score", task: str | None = None) -> dict[str, tuple[str, float]]:
    """{item: (task, the item's mean over `units`)} of `task` (default: all), for the items every unit scored."""
    per_unit = [{item: (t, value) for t, item, value in conn.execute(
        "SELECT task, item_id, value FROM item_scores WHERE unit_id = ? AND metric = ? AND (? IS NULL OR task = ?)",
        (unit, metric, task, task))} for unit in units]
    common = set.intersection(*(set(scores) for scores in per_unit)) if per_unit else set()
    return {item: (per_unit[0][item][0], float(np.mean([scores[item][1] for scores in per_unit]))) for item in common}


def analyze(run_dir: Path, n_resamples: int = 10_000) -> dict:
    """Every system's scores and comparisons, and the routers' verdicts (stored in the database when writable)."""
    conn = open_for_analysis(Path(run_dir) / "results.sqlite")
    try:
        units = router_units(conn)
        seeds = shared_seeds(units)
        scores = {name: _scores(conn, [u["ids"][s] for s in seeds]) for name, u in units.items()}
        switches = {name: _scores(conn, [u["ids"][s] for s in seeds], "switches") for name, u in units.items()}
        curves = {name + (f" s{s}" if len(seeds) > 1 else ""): conn.execute(
            "SELECT step, metric, value FROM router_curves WHERE unit_id = ? ORDER BY step", (u["ids"][s],)).fetchall()
            for name, u in units.items() for s in seeds}
        profiles = dict(conn.execute("SELECT metric, value FROM profiles WHERE experiment = 'router'").fetchall())
        costs = {}
        for experiment, metric, value in conn.execute("SELECT experiment, metric, value FROM profiles WHERE "
                                                      "experiment LIKE 'router_cost:%'"):
            costs.setdefault(experiment.split(":", 1)[1], {})[metric] = value
        wall = wall_clock(conn)  # the bank, the oracle traces and the costs included
    finally:
        conn.close()
    if "router/best_single" not in scores:
        raise ValueError(f"{run_dir}: no router/best_single unit yet; run `bem run --experiments ar0_bc` to the end")
    ids = sorted(scores["router/best_single"])
    best = np.array([scores["router/best_single"][i][1] for i in ids])
    oracle = np.array([scores["router/item_oracle"][i][1] for i in ids]) if "router/item_oracle" in scores else None
    rows = []
    for name in [n for n in ORDER if n in scores] + sorted(set(scores) - set(ORDER)):
        if set(scores[name]) != set(ids):
            continue  # scored on other episodes: never paired
        s = np.array([scores[name][i][1] for i in ids])
        kinds = {k: [scores[name][i][1] for i in ids if scores[name][i][0] == k] for k in ("router_mixed", "router_composite")}
        row = {"system": name, "n": len(ids), "score": s.mean(),
               **{k: (sum(v) / len(v) if v else float("nan")) for k, v in kinds.items()},
               "switches": float(np.mean([switches[name][i][1] for i in ids])),
               "cost": costs.get(cost_of(name, units)),
               "delta": paired_bca(best, s, n_resamples=n_resamples)}
        if oracle is not None and oracle.mean() > best.mean():
            row["gap"] = paired_bca(best, s, n_resamples=n_resamples, statistic=_gap(best, s, oracle))
        rows.append(row)
    verdicts = _verdicts(scores, ids, units, profiles, n_resamples)
    claims = [_claim(scores, ids, name, versus, n_resamples) for name, against in _routers(units).items()
              if name in scores and units[name]["config"]["router"]["algorithm"] == "pg"
              for versus in against if versus in scores]
    left_out = {name: sorted(set(u["seeds"]) - set(seeds)) for name, u in units.items() if set(u["seeds"]) - set(seeds)}
    return {"rows": rows, "verdicts": verdicts, "units": units, "curves": curves, "profiles": profiles,
            "claims": claims, "wall": wall, "seeds": seeds, "left_out": left_out}



CLAIM = 0.015
"""The seed's claim: AR1 ≥ +1.5% EM/F1 over its baseline (F1 on a 0–1 scale: +0.015)."""


def _claim(scores, ids, name: str, versus: str, n_resamples: int) -> dict:
    """AR1 − baseline on the wordnet_qa episodes of the mixed stream (answer F1, the claim's metric), paired."""
    qa = [i for i in ids if i.startswith("wordnet_qa:") and "+" not in i]
    a = np.array([scores[versus][i][1] for i in qa])
    b = np.array([scores[name][i][1] for i in qa])
    r = paired_bca(a, b, n_resamples=n_resamples)
    return {"experiment": name, "versus": versus, "n": len(qa), "ci": r, "met": bool(r.low >= CLAIM),
            "point_met": bool(r.estimate >= CLAIM)}


def cost_of(name: str, units: dict) -> str:
    """Which measured cost (experiment.COSTED) a system has: every router alike, every fixed expert and oracle as the
    bank with c ≡ 1 (the same GEMMs), the others their own."""
    system = units[name]["config"].get("system", "router")
    if system in ("random", "router"):
        return "router"
    if system in ("arrow", "multitask_lora", "controller"):
        return system
    return "all_on"


def _gap(best: np.ndarray, s: np.ndarray, oracle: np.ndarray):
    def statistic(idx: np.ndarray) -> float:
        span = oracle[idx].mean() - best[idx].mean()
        return (s[idx].mean() - best[idx].mean()) / span if span > 0 else 0.0
    return statistic


def _routers(units: dict) -> dict[str, list[str]]:
    """The verdicts to compute: an AR0 (router.algorithm bc) against the best single expert and against the multi-task
    LoRA of the same rank and budget (the strongest baseline a user would pick instead of a router); an AR1 (pg)
    against those two and against the folder's AR0."""
    mine = {name: u["config"]["router"]["algorithm"] for name, u in units.items() if "system" not in u["config"]}
    bc_units = [name for name, algorithm in mine.items() if algorithm == "bc"]
    return {name: ["router/best_single", "router/multitask_lora"] + (bc_units[:1] if algorithm == "pg" else [])
            for name, algorithm in mine.items()}


def _verdicts(scores, ids, units, profiles, n_resamples) -> list[dict]:
    family = [(name, versus) for name, against in _routers(units).items() if name in scores
              for versus in against if versus in scores]
    tests = []
    for name, versus in family:
        a = np.array([scores[versus][i][1] for i in ids])
        b = np.array([scores[name][i][1] for i in ids])
        tests.append((name, versus, paired_bca(a, b, n_resamples=n_resamples), permutation_pvalue(a, b, n_resamples)))
    adjusted, _ = benjamini_hochberg([p for *_, p in tests])
    out = []
    for (name, versus, ci, p), q in zip(tests, adjusted):
        gates = units[name]["config"]["gates"]
        reasons = []
        if not ci.low > 0:
            reasons.append(f"score CI [{ci.low:+.4f}, {ci.high:+.4f}] does not lie above 0")
        if not q < gates["alpha"]:
            reasons.append(f"BH-adjusted p = {q:.3g} is not below {gates['alpha']}")
        params = profiles.get("router_params"), profiles.get("bank_params")
        if None in params:
            reasons.append("parity not measured")
        elif params[0] / params[1] > gates["parity_tolerance"]:
            reasons.append(f"the router adds {params[0]:,.0f} parameters, {params[0] / params[1]:.1%} of the bank's "
                           f"(tolerance {gates['parity_tolerance']:.0%})")
        latency = profiles.get("decode_ratio")
        if latency is None:
            reasons.append("latency gate not measured")
        elif latency > gates["latency_ratio"]:
            reasons.append(f"decode step {latency:.3f}× a fixed expert's (gate ≤ {gates['latency_ratio']}×)")
        out.append({"experiment": name, "versus": versus, "estimate": ci.estimate, "low": ci.low, "high": ci.high,
                    "p": p, "p_adjusted": float(q), "verdict": "promote" if not reasons else "reject",
                    "reasons": reasons})
    return out


def bank_table(run_dir: Path, n_resamples: int = 10_000) -> list[dict]:
    """Each expert of the folder's bank alone on its own task vs the zero-shot base model (unit router/zero_shot), on
    the task's primary metric, paired by item (SPEC §4: each expert alone must beat zero-shot)."""
    from bem.tasks import SPECS

    conn = open_for_analysis(Path(run_dir) / "results.sqlite")
    try:
        zero = [u for (u,) in conn.execute(  # the latest zero-shot config's units (deterministic: any seed alike)
            "SELECT id FROM units WHERE experiment = 'router/zero_shot' AND config_hash = (SELECT config_hash FROM units "
            "WHERE experiment = 'router/zero_shot' ORDER BY finished DESC LIMIT 1)")]
        banks = [(unit, name, config_hash, json.loads(config)) for unit, name, config_hash, config in conn.execute(
            "SELECT u.id, u.experiment, u.config_hash, c.json FROM units u JOIN configs c ON c.hash = u.config_hash "
            "ORDER BY u.finished DESC")]
        banks = [b for b in banks if b[3].get("router") is None and b[3]["bem"].get("experts", 1) > 1]
        if not zero or not banks:
            return []
        (_, name, config_hash, config), rows = banks[0], []
        bank = [u for u, n, h, _ in banks if (n, h) == (name, config_hash)]  # every seed of the latest bank
        for e, task in enumerate(config["tasks"]):
            metric = SPECS[task].primary
            ours, base = ({i: v for i, (_, v) in _scores(conn, units, metric, task).items()} for units in (bank, zero))
            ids = sorted(set(ours) & set(base))
            r = paired_bca([base[i] for i in ids], [ours[i] for i in ids], n_resamples=n_resamples)
            rows.append({"expert": e, "task": task, "metric": metric, "n": len(ids), "ci": r,
                         "alone": float(np.mean([ours[i] for i in ids])), "zero_shot": float(np.mean([base[i] for i in ids]))})
        return rows
    finally:
        conn.close()


def _fmt_ci(r) -> str:
    return f"{r.estimate:+.4f} [{r.low:+.4f}, {r.high:+.4f}]"


def write_report(run_dir: Path, n_resamples: int = 10_000, to: Path | None = None) -> Path:
    """report.md and plots of a router run folder, from its database alone."""
    run_dir = Path(run_dir)
    out = Path(to) if to is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    result = analyze(run_dir, n_resamples)
    _bars(result["rows"], out / "systems.png")
    has_curves = _curves(result["curves"], out / "router_curves.png")
    config = next(iter(u["config"] for u in result["units"].values()))
    r = config["router"]
    lines = ["# Router results (AR0, AR1 and the routers people use)", "",
             "Generated by `bem report` from `results.sqlite` alone. Every system is scored on the same test episodes "
             f"({r['test_mixed']} of the mixed stream of the four tasks with the task hidden, {r['test_composite']} "
             "composite episodes whose two parts need different experts); score = mean over parts of the task metric on "
             "the generated text (wordnet_qa F1, chrF/100, JSON (validity + field EM)/2). Differences are paired by "
             f"episode, BCa 95% CIs over {n_resamples:,} resamples.", ""]
    seeds, left_out = result["seeds"], result["left_out"]
    lines += [f"Seeds: {', '.join(map(str, seeds))} (the seeds every system ran; each episode's score is its mean over "
              "them)." + (" Left out, because not every system ran them: " + "; ".join(
                  f"`{name}` seed {', '.join(map(str, extra))}" for name, extra in left_out.items()) + "."
                  if left_out else ""), ""]
    bank = bank_table(run_dir, n_resamples)
    if bank:
        lines += ["## The expert bank", "", "Each expert alone (its block of the basis; per item the mean over the "
                  "bank's seeds) on its own task's test items vs the frozen base model (zero-shot), primary metric, "
                  "paired by item:", "",
                  "| expert | task | metric | items | alone | zero-shot | difference [95% CI] | beats zero-shot |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {b['expert']} | `{b['task']}` | {b['metric']} | {b['n']} | {b['alone']:.4f} | {b['zero_shot']:.4f} | "
                  f"{_fmt_ci(b['ci'])} | {'yes' if b['ci'].low > 0 else 'no'} |" for b in bank]
        lines.append("")
    lines += ["## Verdicts (SPEC §7)", "", "| router | versus | Δ score | 95% CI | p | BH p | verdict | reasons |",
              "|---|---|---|---|---|---|---|---|"]
    for v in result["verdicts"]:
        lines.append(f"| `{v['experiment']}` | `{v['versus']}` | {v['estimate']:+.4f} | [{v['low']:+.4f}, {v['high']:+.4f}] "
                     f"| {v['p']:.3g} | {v['p_adjusted']:.3g} | **{v['verdict']}** | {'; '.join(v['reasons']) or '—'} |")
    if result["claims"]:
        lines += ["", "## The seed's claim: AR1 ≥ +1.5% EM/F1 over its baseline", "",
                  "Measured on the wordnet_qa episodes of the mixed stream (answer F1 on the generated text, paired by "
                  "item). The claim holds if the CI's lower bound is at least +0.015.", "",
                  "| AR1 | versus | items | Δ F1 [95% CI] | claim |", "|---|---|---|---|---|"]
        for c in result["claims"]:
            verdict = "holds" if c["met"] else ("point estimate only, CI includes less" if c["point_met"] else "not met")
            lines.append(f"| `{c['experiment']}` | `{c['versus']}` | {c['n']} | {_fmt_ci(c['ci'])} | {verdict} |")
    lines += ["", "## Every system", "",
              "Δ = system − best single expert (chosen on the train episodes); gap recovered = (system − best single) / "
              "(per-item oracle − best single). The oracles are upper bounds put together per part from the "
              "fixed-expert rollouts (the task-label oracle takes the expert of each part's task, the per-item oracle "
              "the best expert per part); they switch for free at the part boundary.", "",
              "Cost: the adapter parameters the system needs (the bank, plus a router's or controller's own) and its "
              "decode step against the frozen base model's, measured by the run in one process (interleaved rounds, "
              "median; a fixed expert or an oracle costs what the bank with c ≡ 1 costs).", "",
              "| system | all | mixed | composite | switches / episode | Δ vs best single [95% CI] | gap recovered [95% CI] "
              "| parameters | decode × base |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        gap = _fmt_ci(row["gap"]) if "gap" in row else "—"
        cost = row["cost"] or {}
        params = f"{cost['parameters']:,.0f}" if "parameters" in cost else "—"
        ratio = f"{cost['decode_ratio']:.3f}" if "decode_ratio" in cost else "—"
        lines.append(f"| `{row['system']}` | {row['score']:.4f} | {row['router_mixed']:.4f} | "
                     f"{row['router_composite']:.4f} | {row['switches']:.2f} | {_fmt_ci(row['delta'])} | {gap} | "
                     f"{params} | {ratio} |")
    from bem.router.experiment import BASELINES

    missing = [f"router/{b}" for b in BASELINES if f"router/{b}" not in result["units"]]
    if missing or not any(row["cost"] for row in result["rows"]):
        lines += ["", "Not stored yet: " + ", ".join(f"`{m}`" for m in missing)
                  + ("; " if missing else "") + "the cost columns. `bem run` computes the baselines that train and "
                  "the costs after the router units; rerun the same command to add what is missing."]
    lines += ["", "![systems](systems.png)", ""]
    profiles = result["profiles"]
    if profiles:
        lines += ["## Cost", "", f"- router parameters: {profiles.get('router_params', float('nan')):,.0f}; bank "
                  f"parameters: {profiles.get('bank_params', float('nan')):,.0f}",
                  f"- decode step with the router: {profiles.get('decode_ratio', float('nan')):.3f}× the same model "
                  "with a fixed expert (median of interleaved rounds, measured by the run on its machine)", ""]
    if has_curves:
        lines += ["## Training curves", "", "AR0's behaviour-cloning loss and accuracy per epoch; AR1's mean reward, "
                  "KL(old ‖ new) per update (trust region 0.01), policy entropy and switches per episode.", "",
                  "![curves](router_curves.png)", ""]
    lines += ["## Budget", "", f"Bank `{r['bank']}`; train episodes: {r['train_mixed']} mixed + {r['train_composite']} "
              f"composite; AR0: {r['bc_epochs']} epochs; AR1: {r['pg_updates']} updates × {r['pg_episodes']} episodes; "
              f"λ = {r['switch_cost']} per switch, plan limit {config['bem']['max_switches']}, chunks of "
              f"{config['bem']['chunk_size']} tokens.", ""]
    lines += ["Seconds per system (training, evaluation) as stored by the run:", ""]
    lines += [f"- `{name}`: {u['train_seconds']:.0f} s, {u['eval_seconds']:.0f} s" for name, u in result["units"].items()]
    lines += wall_clock_lines(result.get("wall") or [])
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _bars(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    for y, row in enumerate(reversed(rows)):
        d = row["delta"]
        ax.errorbar(d.estimate, y, xerr=[[d.estimate - d.low], [d.high - d.estimate]], fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [row["system"] for row in reversed(rows)], fontsize=8)
    ax.set(xlabel="score − best single expert (paired, 95% BCa CI)", title="Routers on the same test episodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def _curves(curves: dict[str, list], path: Path) -> bool:
    panels = [("bc/loss", "AR0 loss"), ("charts/reward", "AR1 reward"), ("losses/approx_kl", "AR1 KL(old‖new)"),
              ("losses/entropy", "AR1 entropy"), ("charts/switch_rate", "AR1 switches / episode")]
    present = [(m, t) for m, t in panels if any(metric == m for rows in curves.values() for _, metric, _ in rows)]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
    for ax, (metric, title) in zip(axes[0], present):
        for i, (name, rows) in enumerate(curves.items()):
            points = [(step, value) for step, m, value in rows if m == metric]
            if points:
                ax.plot(*zip(*points), marker="." if metric != "bc/loss" else None, color=f"C{i}", label=name)
        if metric == "losses/approx_kl":
            ax.axhline(0.01, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return True
