"""`bem report`: Markdown + PNG plots generated from the results database only (deterministic)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bem.errors import BEMError  # noqa: E402
from bem.experiments.analysis import BASELINE, MIN_ITEMS, analyze  # noqa: E402
from bem.experiments.results import open_for_analysis, wall_clock, wall_clock_lines  # noqa: E402

PNG_META = {"Software": None}  # no version stamp: the same database gives the same bytes


def _latest(conn) -> str:
    """SQL condition selecting the units of each experiment's latest config (what the analysis compares)."""
    ids = [i for (i,) in conn.execute(
        "SELECT u.id FROM units u JOIN (SELECT experiment, config_hash FROM units GROUP BY experiment "
        "HAVING finished = MAX(finished)) l ON l.experiment = u.experiment AND l.config_hash = u.config_hash")]
    return f"u.id IN ({','.join(map(str, ids)) or 'NULL'})"


def _curves(conn, path: Path) -> None:
    """One colour per experiment: its seeds thin, their mean thick (batches are small, single seeds are noisy)."""
    runs: dict[str, list[tuple]] = {}
    for experiment, unit in conn.execute(f"SELECT experiment, id FROM units u WHERE {_latest(conn)} "
                                         "ORDER BY experiment, seed"):
        curve = tuple(zip(*conn.execute("SELECT step, loss FROM curves WHERE unit_id=? ORDER BY step", (unit,))))
        if curve:  # a system that is not trained (zero-shot, a lookup table) has no curve
            runs.setdefault(experiment, []).append(curve)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (experiment, seeds) in enumerate(runs.items()):
        color = f"C{i % 10}"
        for steps, losses in seeds:
            ax.plot(steps, losses, color=color, linewidth=0.6, alpha=0.35)
        common = sorted(set.intersection(*(set(steps) for steps, _ in seeds)))
        mean = [sum(dict(zip(st, lo))[step] for st, lo in seeds) / len(seeds) for step in common]
        ax.plot(common, mean, color=color, linewidth=1.8, label=f"{experiment} (mean of {len(seeds)})")
    ax.set(xlabel="optimizer step", ylabel="training loss (target tokens)", title="Training curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def _forest(comparisons: list[dict], path: Path) -> None:
    """One panel per task and metric, each on its own scale (F1 and chrF differences differ by 100×)."""
    groups: dict[tuple, list[dict]] = {}
    for c in comparisons:
        groups.setdefault((c["task"], c["metric"]), []).append(c)
    heights = [len(rows) + 1.5 for rows in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 0.4 * sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, ((task, metric), rows) in zip(axes[:, 0], groups.items()):
        rows = list(reversed(rows))
        for y, c in enumerate(rows):
            color = "tab:green" if c["low"] > 0 else "tab:red" if c["high"] < 0 else "tab:gray"
            ax.errorbar(c["difference"], y, xerr=[[c["difference"] - c["low"]], [c["high"] - c["difference"]]],
                        fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [f"{c['experiment']} vs {c['versus']} ({c['slice']})" for c in rows],
                      fontsize=7)
        ax.set_ylim(-0.7, len(rows) - 0.3)
        ax.set_title(f"{task} · {metric}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("paired mean improvement with BCa 95% CI (green: CI above 0, red: below)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def _question_types(conn, path: Path) -> bool:
    """easy_vqa accuracy per system (latest config, mean over seeds and items) by question type, bars; False (no
    plot) when the folder scores no easy_vqa."""
    from bem.tasks import QUESTION_TYPE_KEYS

    rows = conn.execute(
        f"SELECT u.experiment, m.key, AVG(s.value) FROM item_scores s JOIN units u ON u.id = s.unit_id JOIN item_meta m "
        f"ON m.task = s.task AND m.item_id = s.item_id WHERE {_latest(conn)} AND s.task = 'easy_vqa' AND "
        f"s.metric = 'accuracy' AND m.key LIKE 'qtype_%' AND m.value = 1 GROUP BY 1, 2").fetchall()
    if not rows:
        return False
    overall = dict(conn.execute(
        f"SELECT u.experiment, AVG(s.value) FROM item_scores s JOIN units u ON u.id = s.unit_id WHERE {_latest(conn)} "
        f"AND s.task = 'easy_vqa' AND s.metric = 'accuracy' GROUP BY 1").fetchall())
    systems = sorted(overall, key=lambda e: -overall[e])
    value = {(e, k): v for e, k, v in rows}
    groups = [("all", None)] + [(label, key) for label, key in QUESTION_TYPE_KEYS.items()]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(systems)
    for i, experiment in enumerate(systems):
        ys = [overall[experiment] if key is None else value.get((experiment, key), float("nan")) for _, key in groups]
        ax.bar([g + (i - (len(systems) - 1) / 2) * width for g in range(len(groups))], ys, width, label=experiment)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.set(ylabel="accuracy (mean over items and seeds)", ylim=(0, 1), title="easy_vqa by question type")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return True


def _quality_latency(conn, path: Path) -> None:
    """Per task: primary metric against latency. The x axis is the decode-step p50 of `bem profile` where one is
    stored (all models measured in one process, interleaved), else the evaluation wall time per item, which
    moves with whatever else the machine was doing during the run."""
    from bem.tasks import SPECS

    rows = conn.execute(
        f"SELECT u.experiment, m.task, m.metric, AVG(m.value) FROM metrics m JOIN units u ON u.id = m.unit_id "
        f"WHERE {_latest(conn)} GROUP BY 1, 2, 3").fetchall()
    values = {(e, t, m): v for e, t, m, v in rows}
    by_device: dict[str, dict[str, float]] = {}
    for experiment, device, value in conn.execute(
            f"SELECT DISTINCT p.experiment, p.device, p.value FROM profiles p JOIN units u ON u.experiment = "
            f"p.experiment AND u.config_hash = p.config_hash WHERE {_latest(conn)} AND p.metric = 'decode_p50_ms'"):
        by_device.setdefault(device, {})[experiment] = value
    device = max(sorted(by_device), key=lambda d: len(by_device[d]), default=None)  # the most complete profile
    decode = by_device.get(device, {})
    profiled = bool(decode)
    tasks = sorted({t for _, t, _ in values if t in SPECS})  # not a unit's measurements of itself (orthogonality)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.2 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        primary = SPECS[task].primary
        for experiment in sorted({e for e, t, _ in values if t == task}):
            x = decode.get(experiment) if profiled else values.get((experiment, task, "seconds_per_item"))
            y = values.get((experiment, task, primary))
            if x is not None and y is not None:
                ax.scatter(x, y)
                ax.annotate(experiment, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=task, ylabel=primary,
               xlabel=f"decode step p50 (ms, bem profile on {device})" if profiled else "eval seconds per item")
    fig.suptitle("Quality vs latency " + ("(latency from bem profile, one process)" if profiled
                                          else "(evaluation wall time; run bem profile --out for gated latency)"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)


def _budget_lines(units: dict) -> list[str]:
    """Added parameters and FLOPs/token of each experiment's latest config, and their ratios to its reference."""
    from bem.budget import budget
    from bem.module.config import BEMConfig

    budgets = {name: budget(u["config"]["model"], BEMConfig.from_dict(u["config"]["bem"])) for name, u in units.items()}
    lines = ["", "## Budget parity", "", "| experiment | training | added parameters | added FLOPs/token | vs | "
             "parameters × | FLOPs × |", "|---|---|---|---|---|---|---|"]
    for name, u in units.items():
        config, b = u["config"], budgets[name]
        ref = config.get("anchor") or config.get("parity_with")
        t = config["training"]
        training = f"{t['steps']} steps × {t['batch_size'] * t['grad_accum']}"
        if ref in budgets and ref != name:
            r = budgets[ref]
            ratios = f"{ref} | {b.parameters / r.parameters:.3f} | {b.flops_per_token / r.flops_per_token:.3f}"
        else:
            ratios = "— | — | —"
        lines.append(f"| {name} | {training} | {b.parameters:,} | {b.flops_per_token:,.0f} | {ratios} |")
    return lines


def _text_baseline_lines(units: dict) -> list[str]:
    """What the stored systems without a module are (bem.mm: easy_vqa's baselines that never see the image)."""
    systems = {u["config"]["system"]: name for name, u in units.items() if "system" in u["config"]}
    if not systems:
        return []
    what = {"majority": "the most frequent train answer for the exact question text (the whole train split; the overall "
                        "train majority for a question never seen there); it never looks at the image",
            "zero_shot": "the frozen base model, greedy, on the same prompts (the question only)"}
    return ["", "## Systems without a module", "", "Stored beside the easy_vqa units on the same test items; every "
            "experiment scoring easy_vqa is compared with them (budget parity and the latency and memory gates do not "
            "apply to them).", ""] + [f"- `{name}`: {what.get(system, system)}" for system, name in sorted(systems.items())]


def _profile_lines(conn) -> list[str]:
    rows = conn.execute("SELECT experiment, versus, metric, ratio, device FROM profile_ratios "
                        "WHERE versus != 'base' ORDER BY experiment, versus, metric").fetchall()
    if not rows:
        return ["", "## Gates", "", "No profiles stored: run `bem profile --out` on this folder."]
    table: dict[tuple, dict] = {}
    for experiment, versus, metric, ratio, device in rows:
        table.setdefault((experiment, versus, device), {})[metric] = ratio
    metrics = ("prefill_p50_ms", "decode_p50_ms", "decode_p95_ms", "peak_memory_mb", "kv_hit_rate")
    lines = ["", "## Gates (ratios measured in one `bem profile` process)", "",
             "| experiment | vs | device | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]

    def cell(values, m):
        if m not in values:
            return "—"
        value = values[m]  # NaN (stored as NULL): a ratio over a rate of 0
        return "n/a (rate of vs is 0)" if value is None or value != value else f"{value:.3f}"

    for (experiment, versus, device), values in table.items():
        cells = " | ".join(cell(values, m) for m in metrics)
        lines.append(f"| {experiment} | {versus} | {device} | {cells} |")
    return lines + _profiled_lines(conn)


def _profiled_lines(conn) -> list[str]:
    """What each profile measured (the trained unit, or fresh modules) and the KV hit rates of SPEC §2."""
    has_units = conn.execute("SELECT 1 FROM sqlite_master WHERE name='profile_units'").fetchone()
    rows = conn.execute(
        "SELECT p.experiment, p.device, p.value, " + ("u.status, u.seed, u.kv_denominator " if has_units else
                                                        "NULL, NULL, NULL ")
        + "FROM profiles p " + ("LEFT JOIN profile_units u ON u.experiment = p.experiment AND u.config_hash = "
                                "p.config_hash AND u.device = p.device " if has_units else "")
        + "WHERE p.metric = 'kv_hit_rate' ORDER BY p.device, p.experiment = 'base' DESC, p.experiment").fetchall()
    lines = ["", "Profiled modules and KV hit rate (SPEC §2: hits over the shared prefix of a stream of real prompts "
             "with a common system prompt and few-shot block, aligned down to chunks for chunked prompts; the base "
             "model's 1.000 is measured). `untrained` = fresh modules (ΔW = 0): such a profile measures the base model "
             "and cannot pass the gates.", "",
             "| experiment | device | modules profiled | KV hit rate | tokens offered (Σ D) |", "|---|---|---|---|---|"]
    for experiment, device, rate, status, seed, denominator in rows:
        modules = "not recorded (profiled before units were stored)" if status is None else \
            status + (f", seed {seed}" if seed is not None else "")
        lines.append(f"| {experiment} | {device} | {modules} | {rate:.3f} | {denominator if denominator else '—'} |")
    return lines


def _corpus_means(conn) -> dict[tuple[str, str, str], float]:
    """(experiment, task, metric) → the mean over the latest units of each unit's recomputed corpus score."""
    from bem.experiments.analysis import CORPUS_METRICS, corpus_scores

    per_unit: dict[tuple, list[float]] = {}
    tasks = ",".join(f"'{t}'" for t in CORPUS_METRICS)
    for experiment, unit, task in conn.execute(
            f"SELECT DISTINCT u.experiment, u.id, m.task FROM metrics m JOIN units u ON u.id = m.unit_id "
            f"WHERE {_latest(conn)} AND m.task IN ({tasks}) ORDER BY u.id"):
        for metric, value in corpus_scores(conn, unit, task).items():
            per_unit.setdefault((experiment, task, metric), []).append(value)
    return {key: sum(values) / len(values) for key, values in per_unit.items()}


SIDE_BLIND = 0.1  # side inputs swapped move c by less than this × the code std: the routing ignores them


def _routing_lines(conn, units: dict) -> list[str]:
    """"Is routing alive?": one row per routed experiment (the mean over its latest units and tasks of
    bem.routing_stats.measure_routing's summary), and a sentence for each system whose codes did not move."""
    from bem.routing_stats import MOVED_THRESHOLD

    lines = ["", "## Is routing alive?", ""]
    routed = [name for name, u in units.items() if u["config"]["bem"].get("controller", "chunk") != "static"]
    stats: dict[str, dict[tuple, dict[str, float]]] = {}  # experiment -> (unit, task, site) -> stat -> value
    for experiment, unit, task, site, stat, value in conn.execute(
            f"SELECT u.experiment, r.unit_id, r.task, r.site, r.stat, r.value FROM routing r JOIN units u "
            f"ON u.id = r.unit_id WHERE {_latest(conn)} ORDER BY u.experiment, r.unit_id, r.task, r.rowid"):
        stats.setdefault(experiment, {}).setdefault((unit, task, site), {})[stat] = value
    if not stats:
        return lines + [f"No routing statistics stored for {', '.join(routed) or 'any experiment'}. `bem run` measures "
                        "them for each routed unit after its evaluation (`bem.routing_stats.measure_routing`: "
                        "teacher-forced forwards over the unit's own test replies) and stores them in the `routing` "
                        "table; a finished unit stored before that gets them when the same `bem run ...` runs again "
                        "with `--out` this folder (from its adapter, restored by retraining if missing, and its "
                        "stored replies)."]
    lines += [f"Per routed experiment, the mean over its units and tasks of: the largest mean |c − 1| of any site, "
              f"the std of c over items × chunks (mean over sites), the share of chunk boundaries where the chunk "
              f"code was replaced (pooled), and the ranges of the PT1 gates and FiLM γ, β over all items and chunks. "
              f"Codes did not move: every site's mean |c − 1| (and every gate's mean |g − 1|, FiLM's mean |γ − 1| and "
              f"|β|) below {MOVED_THRESHOLD} in every unit. Codes that moved but barely vary (the largest per-site std "
              f"of c over items × chunks below {MOVED_THRESHOLD}) are a nearly constant reweighting of the basis: "
              f"c can be folded into U, so such a system is a static adapter in effect, whatever it reads. "
              f"Side inputs move c: with only the side inputs swapped (each item gets the previous item's evidence or "
              f"image features), the mean |Δc| in units of the code std (mean over the units and tasks measured; with "
              f"head gates, the same for the gates in brackets; —: no side inputs, or stored before this was measured: "
              f"`scripts/backfill_feature_shift.py`).", "",
              "| experiment | units × tasks | max mean abs(c − 1) | code std | max site code std | switch rate | gates | "
              "FiLM γ | FiLM β | moved | varies with context | side inputs move c |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    still, constant, blind = [], [], []
    for experiment, rows in stats.items():
        summaries = [values for (_, _, site), values in rows.items() if site == "all"]
        if not summaries:
            continue

        def mean(stat):
            return sum(s[stat] for s in summaries) / len(summaries)

        def span(low, high):
            lows = [v[low] for v in rows.values() if low in v]
            return f"[{min(lows):.3f}, {max(v[high] for v in rows.values() if high in v):.3f}]" if lows else "—"

        boundaries = sum(s["boundaries"] for s in summaries)
        rate = f"{sum(s['switches'] for s in summaries) / boundaries:.3f}" if boundaries else "—"
        moved = any(s["moved"] for s in summaries)
        if not moved:
            still.append((experiment, max(s["code_max_mean_abs_dev"] for s in summaries)))
        spread = max((v["code_std"] for (_, _, site), v in rows.items() if site != "all" and "code_std" in v), default=0.0)
        varies = spread >= MOVED_THRESHOLD
        if moved and not varies:
            constant.append((experiment, spread))
        shifts = [s["feature_shift_ratio"] for s in summaries if "feature_shift_ratio" in s]
        shift = sum(shifts) / len(shifts) if shifts else None
        gated = [s["gate_feature_shift_ratio"] for s in summaries if "gate_feature_shift_ratio" in s]
        if shift is not None and moved and shift < SIDE_BLIND and (not gated or sum(gated) / len(gated) < SIDE_BLIND):
            blind.append((experiment, shift, len(shifts)))
        moves = "—" if shift is None else f"×{shift:.3f}"
        if gated:
            moves += f" (gates ×{sum(gated) / len(gated):.3f})"
        lines.append(f"| {experiment} | {len(summaries)} | {mean('code_max_mean_abs_dev'):.4f} | {mean('code_mean_std'):.4f} "
                     f"| {spread:.4f} | {rate} | {span('gate_min', 'gate_max')} | {span('gamma_min', 'gamma_max')} | "
                     f"{span('beta_min', 'beta_max')} | {'yes' if moved else '**no**'} | {'yes' if varies else '**no**'} | "
                     f"{moves} |")
    for experiment, deviation in still:
        lines += ["", f"**{experiment}: its codes did not move** (largest mean |c − 1| of any site {deviation:.2g} < "
                  f"{MOVED_THRESHOLD}, gates and FiLM within {MOVED_THRESHOLD} of identity): on these items it routes "
                  "every token like c ≡ 1, so it is indistinguishable from static LoRA on the same sites, and a "
                  "comparison with it says nothing about routing."]
    for experiment, spread in constant:
        lines += ["", f"**{experiment}: its codes moved away from 1 but barely vary with context** (largest per-site std "
                  f"of c over items × chunks {spread:.2g} < {MOVED_THRESHOLD}): nearly one code for every item and chunk, "
                  "which a static adapter with U·diag(c) would match; its routing does not yet depend on what it reads."]
    for experiment, shift, n in blind:
        lines += ["", f"**{experiment}: its codes barely follow its side inputs** (swapping only them moves c by ×{shift:.3f} "
                  f"of the code std, mean over {n} units × tasks; < {SIDE_BLIND}): its routing reads the prompt, not the "
                  "evidence or image features, so what the index swap finds is the prompt text's doing."]
    missing = [name for name in routed if name not in stats]
    if missing:
        lines += ["", f"No routing statistics stored for {', '.join(missing)}."]
    return lines


def write_report(run_dir: Path, n_resamples: int = 10_000, hierarchical: bool = False, to: Path | None = None) -> Path:
    """report.md and its plots from the run folder's database, written into `to` (default: the run folder; a
    read-only run folder needs another `to`). The database is only read, except that the verdicts are stored in it
    when it is writable."""
    run_dir = Path(run_dir)
    out = Path(to) if to is not None else run_dir
    result = analyze(run_dir, n_resamples, hierarchical)  # checks the database first: a bad folder fails here
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BEMError(f"{out}: cannot create the report folder: {err.strerror}") from None
    if not os.access(out, os.W_OK):
        raise BEMError(f"{out} is read-only; the report (report.md and plots) cannot be written there",
                       hint=f"write it elsewhere: bem report {run_dir} --to DIR")
    conn = open_for_analysis(run_dir / "results.sqlite")
    _curves(conn, out / "curves.png")
    if result["comparisons"]:
        _forest(result["comparisons"], out / "forest.png")
    _quality_latency(conn, out / "quality_latency.png")
    has_vqa = _question_types(conn, out / "question_types.png")
    lines = ["# BEM results", "", "Generated by `bem report` from `results.sqlite` alone; every number below is "
             "computed from stored per-item scores.", "", "## Runs", "",
             "Commands that wrote units into this folder (a preset or `--quick` says how small the budgets were):", ""]
    lines += [f"- `{command}`" for (command,) in conn.execute(
        "SELECT DISTINCT r.command FROM runs r JOIN units u ON u.run_id = r.id ORDER BY r.id")]
    lines += wall_clock_lines(wall_clock(conn))
    modules = {name: u for name, u in result["units"].items() if "bem" in u["config"]}  # not the text baselines
    lines += _budget_lines(modules) + _text_baseline_lines(result["units"]) + _profile_lines(conn)
    lines += ["", "## Units", "",
              "Every unit stored, by config and data build; the analysis uses each experiment's latest (marked ●) and "
              "never pools units of different configs or data builds.", "",
              "Seconds are per unit (mean over its seeds), as `bem run` measured them on the machine that ran it: "
              "training (steps × batch in the budget table) and the clean evaluation of every task. Precision: "
              "training / evaluation; batches: how examples were grouped (`training.batching`).", "",
              "| experiment | config | data build | seeds | train s/unit | eval s/unit | precision | batches |",
              "|---|---|---|---|---|---|---|---|"]
    latest = {(e, h, d) for e, h, d in conn.execute("SELECT DISTINCT experiment, config_hash, data_fingerprint FROM units")}
    for experiment, config_hash, data, seeds, train, evals, config in conn.execute(
            "SELECT u.experiment, u.config_hash, u.data_fingerprint, GROUP_CONCAT(u.seed), AVG(u.train_seconds), "
            "AVG(u.eval_seconds), c.json FROM main.units u LEFT JOIN configs c ON c.hash = u.config_hash "
            "GROUP BY u.experiment, u.config_hash, u.data_fingerprint ORDER BY u.experiment"):
        build = ", ".join(f"{t} `{f[:8]}`" for t, f in json.loads(data).items()) if data else "not recorded"
        mark = " ●" if (experiment, config_hash, data) in latest else ""
        config = json.loads(config) if config else {}
        precision = "/".join("—" if section not in config else config[section].get("precision", "fp32") or "—"
                             for section in ("training", "evaluation"))  # "—": not trained, or no model to run
        batching = config["training"].get("batching", "random") if "training" in config else "—"  # before the field: random
        lines.append(f"| {experiment}{mark} | `{config_hash}` | {build} | {seeds} | {train:.0f} | {evals:.0f} | "
                     f"{precision} | {batching} |")
    lines += ["", "## Scores (latest config of each experiment; mean over items and seeds)", "",
              "Corpus BLEU/chrF: each seed's corpus score, recomputed from its stored replies on the same string the "
              "per-item score uses (a translation's first line), then the mean over seeds.", "",
              "| experiment | task | metric | value |", "|---|---|---|---|"]
    corpus = _corpus_means(conn)
    for experiment, task, metric, value in conn.execute(
            f"SELECT u.experiment, m.task, m.metric, AVG(m.value) FROM metrics m JOIN units u ON u.id = m.unit_id "
            f"WHERE {_latest(conn)} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"):
        lines.append(f"| {experiment} | {task} | {metric} | {corpus.get((experiment, task, metric), value):.4f} |")
    lines += _routing_lines(conn, modules)
    lines += ["", "## Comparisons", "",
              ("Paired by item; improvement = experiment − versus (for violation: versus − experiment); "
               + (f"seed × item percentile bootstrap 95% CI (`--hierarchical`: items resampled paired, seeds resampled "
                  f"too, paired across systems that ran the same seeds), {n_resamples:,} resamples; "
                  if hierarchical else "seeds averaged per item (only the seeds both systems ran; the verdicts name any "
                  f"left out), BCa 95% CI, {n_resamples:,} resamples; ")
               + "corpus metrics (on each reply's scored first line): corpus score recomputed per resample; "
               "p from the same resamples as the CI (p < 0.05 exactly when the CI excludes 0); Benjamini–Hochberg "
               "over all rows' p (BH p, what the verdicts use); sign-flip p: the paired permutation test (corpus "
               "metrics: approximate randomisation), shown beside it. Slice B = all items, Slice A = retrieval-strong "
               "items (wordnet_qa); easy_vqa is also broken down by question type (yes/no, shape, colour); verdicts "
               "read Slice B."), "",
              "| experiment | versus | task | slice | metric | n | improvement | 95% CI | p | BH p | sign-flip p |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        small = " (too small)" if c["n"] < MIN_ITEMS else ""
        lines.append(f"| {c['experiment']} | {c['versus']} | {c['task']} | {c['slice']} | {c['metric']} | {c['n']}{small} | "
                     f"{c['difference']:+.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | {c['p']:.4f} | {c['p_bh']:.4f} | "
                     f"{c.get('p_signflip', float('nan')):.4f} |")
    lines += ["", "## Verdicts", ""]
    if not result["verdicts"]:
        present = sorted(result["units"])
        lines.append(f"None yet: a verdict compares an experiment with its anchor or with {BASELINE}, and this folder "
                     f"holds units of {', '.join(present) or 'no experiment'} only.")
    for v in result["verdicts"]:
        lines.append(f"- **{v['experiment']} vs {v['versus']}: {v['verdict'].upper()}**")
        lines += [f"  - {r}" for r in v["reasons"]]
    from bem.experiments.index_swap import report_lines  # index swap (SPEC §6): bem/experiments/index_swap.py

    lines += report_lines(result["index_swap"])
    from bem.mm import report_lines as mm_lines  # easy_vqa: the image readers against every baseline, the claim

    lines += mm_lines(result)
    from bem.safety import curve, curve_lines, plot_curve  # the safety basis (VC): its knob curve

    safety = curve(run_dir / "results.sqlite", n_resamples)
    if plot_curve(safety, out / "safety_curve.png"):
        lines += curve_lines(safety)
    lines += ["", "## Plots", "", "![training curves](curves.png)", ""]
    if result["comparisons"]:
        lines += ["![comparisons](forest.png)", ""]
    lines += ["![quality vs latency](quality_latency.png)", ""]
    if has_vqa:
        lines += ["![easy_vqa by question type](question_types.png)", ""]
    conn.close()
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
