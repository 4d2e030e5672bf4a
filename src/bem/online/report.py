"""The online report (issue 16, item 6), from the run's database alone: live quality over the stream for the frozen,
naive and shadow systems (paired by request, BCa CIs, overall and per phase), the drift detectors' false alarms and
detection delays, every canary check, promotion, reset and rollback, and the seed's claim (≥ +1% aggregate)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bem.experiments.results import open_for_analysis, wall_clock, wall_clock_lines  # noqa: E402
from bem.stats import paired_bca  # noqa: E402

PNG_META = {"Software": None}
SYSTEMS = ("frozen", "naive", "shadow")
COLORS = {"frozen": "tab:gray", "naive": "tab:red", "shadow": "tab:blue"}
PAIRS = (("shadow", "frozen"), ("naive", "frozen"), ("shadow", "naive"))
CLAIM = 0.01  # the seed: shadow mode ≥ +1% aggregate over the system without it


def _has_table(conn) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'online_items'").fetchone() is not None


def is_online_folder(run_dir: Path) -> bool:
    path = Path(run_dir) / "results.sqlite"
    if not path.is_file():
        return False
    conn = open_for_analysis(path)
    try:
        return _has_table(conn) and conn.execute("SELECT 1 FROM online_items LIMIT 1").fetchone() is not None
    finally:
        conn.close()


def _config(conn, key: str) -> dict:
    name, config_hash, _ = key.split(":")
    row = conn.execute("SELECT json FROM configs WHERE hash = ?", (config_hash,)).fetchone()
    if row is None:  # the stream has not finished a system yet: its config is the live unit's file
        from bem.experiments.config import load_experiment

        return load_experiment(name).to_dict()
    return json.loads(row[0])


def _load(conn, key: str) -> dict:
    systems = {}
    for system in SYSTEMS:
        rows = conn.execute("SELECT idx, phase, task, version, score, observed FROM online_items WHERE stream = ? "
                            "AND system = ? ORDER BY idx", (key, system)).fetchall()
        if rows:
            systems[system] = rows
    events = [(s, json.loads(j)) for s, j in conn.execute(
        "SELECT system, json FROM online_events WHERE stream = ? ORDER BY rowid", (key,))]
    return {"config": _config(conn, key), "systems": systems, "events": events}


def streams(conn) -> list[str]:
    if not _has_table(conn):
        return []
    return [k for (k,) in conn.execute("SELECT DISTINCT stream FROM online_items ORDER BY stream")]


def analyze(run_dir: Path, n_resamples: int = 10_000) -> dict:
    conn = open_for_analysis(Path(run_dir) / "results.sqlite")
    try:
        return {key: _analyze(_load(conn, key), n_resamples) for key in streams(conn)}
    finally:
        conn.close()


def _analyze(data: dict, n_resamples: int) -> dict:
    systems, config = data["systems"], data["config"]
    phases = [p["name"] for p in config["online"]["phases"]]
    n = min(len(rows) for rows in systems.values())
    score = {s: np.array([r[4] for r in rows[:n]]) for s, rows in systems.items()}
    phase_of = np.array([r[1] for r in next(iter(systems.values()))[:n]])
    means = {s: {"all": float(v.mean()), **{p: float(v[phase_of == p].mean()) for p in phases if (phase_of == p).any()}}
             for s, v in score.items()}
    comparisons = []
    for a, b in PAIRS:
        if a in score and b in score:
            for part in ["all"] + phases:
                mask = np.ones(n, bool) if part == "all" else phase_of == part
                if mask.sum() >= 2:
                    r = paired_bca(score[b][mask], score[a][mask], n_resamples=n_resamples)
                    comparisons.append({"system": a, "versus": b, "phase": part, "n": int(mask.sum()),
                                        "difference": r.estimate, "low": r.low, "high": r.high})
    return {"n": n, "complete": n == sum(p["items"] for p in config["online"]["phases"]), "phases": phases,
            "means": means, "comparisons": comparisons, "detectors": _detectors(data, phases),
            "decisions": [dict(e, system=s) for s, e in data["events"]
                          if e["kind"] in ("check", "promote", "reset", "rollback", "watch")],
            "alarms": [dict(e, system=s) for s, e in data["events"] if e["kind"] == "alarm"]}


def _detectors(data: dict, phases: list[str]) -> dict:
    """On the frozen system's observed scores (its weights never change, so a change is the stream's): false alarms
    per 10,000 observed items in the first phase, and each detector's delay (requests) after each phase boundary;
    plus the false alarms measured on simulated stable streams of the calibration scores."""
    from bem.online.drift import DETECTORS, Thresholds, false_alarms_per_10k, simulate_stable

    calibration = next((e for s, e in data["events"] if e["kind"] == "calibration"), None)
    out = {"thresholds": calibration["thresholds"] if calibration else None}
    if calibration:
        streams = simulate_stable(calibration["scores"], n_streams=10, stream_length=2000, seed=12345)
        out["simulated_per_10k"] = false_alarms_per_10k(Thresholds(**calibration["thresholds"]), streams)
    frozen = data["systems"].get("frozen")
    if not frozen:
        return out
    starts = {}
    for idx, phase, *_ in frozen:
        starts.setdefault(phase, idx)
    first = phases[0]
    observed_first = sum(1 for r in frozen if r[1] == first and r[5] is not None)
    alarms = [e for s, e in data["events"] if s == "frozen" and e["kind"] == "alarm"]
    end_first = starts.get(phases[1], len(frozen)) if len(phases) > 1 else len(frozen)
    out["first_phase"] = {d: sum(1 for a in alarms if a["detector"] == d and a["idx"] < end_first) for d in DETECTORS}
    out["first_phase_observed"] = observed_first
    delays = {}
    for p in phases[1:]:
        if p not in starts:
            continue
        nxt = [starts[q] for q in phases if q in starts and starts[q] > starts[p]]
        end = min(nxt, default=len(frozen))
        delays[p] = {d: next((a["idx"] - starts[p] for a in alarms if a["detector"] == d and starts[p] <= a["idx"] < end),
                             None) for d in DETECTORS}
    out["delays"] = delays
    if calibration:  # delays on simulated changes: stable scores, then the frozen system's observed scores of a phase
        from bem.online.drift import detection_delays, median_delay

        rng, thresholds, simulated = np.random.default_rng(54321), Thresholds(**calibration["thresholds"]), {}
        for p in phases[1:]:
            after = [r[5] for r in frozen if r[1] == p and r[5] is not None]
            if len(after) < 2:
                continue
            streams = np.concatenate([rng.choice(calibration["scores"], (20, 500)), rng.choice(after, (20, 500))], 1)
            found, _ = detection_delays(thresholds, streams, 500)
            simulated[p] = {d: (median_delay(v), sum(x is not None for x in v), len(v)) for d, v in found.items()}
        out["simulated_delays"] = simulated
    return out


# --- text --------------------------------------------------------------------------------------------------------
def status_text(run_dir: Path) -> str:
    conn = open_for_analysis(Path(run_dir) / "results.sqlite")
    try:
        lines = []
        for key in streams(conn):
            data = _load(conn, key)
            total = sum(p["items"] for p in data["config"]["online"]["phases"])
            lines.append(f"stream {key}: {total} requests")
            for system, rows in data["systems"].items():
                kinds = [e["kind"] for s, e in data["events"] if s == system]
                lines.append(f"  {system:7s} served {len(rows)}/{total}, live version {rows[-1][3]}, mean score "
                             f"{np.mean([r[4] for r in rows]):.4f}; alarms {kinds.count('alarm')}, checks "
                             f"{kinds.count('check')}, promotions {kinds.count('promote')}, resets {kinds.count('reset')}, "
                             f"rollbacks {kinds.count('rollback')}")
        return "\n".join(lines) + "\n" if lines else "no online stream in this folder\n"
    finally:
        conn.close()


def _ci(c: dict) -> str:
    return f"{c['difference']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]"


def write_report(run_dir: Path, n_resamples: int = 10_000, to: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    to = Path(to) if to else run_dir
    to.mkdir(parents=True, exist_ok=True)
    conn = open_for_analysis(run_dir / "results.sqlite")
    try:
        keys = streams(conn)
        loaded = {key: _load(conn, key) for key in keys}
        seconds = {n: (t or 0.0) + (e or 0.0) for n, t, e in
                   conn.execute("SELECT experiment, train_seconds, eval_seconds FROM units")}
        wall = wall_clock(conn)  # the calibration and everything between units included
    finally:
        conn.close()
    lines = ["# Online shadow mode (SPEC §5, OL)", "",
             "Generated by `bem report` / `bem online simulate` from `results.sqlite` alone. Each system serves the same "
             "stream of requests; the score of a reply is its task's metric against the item's own reference "
             "(wordnet_qa F1, chrF/100, JSON (validity + field EM)/2), whatever feedback came back. Differences are "
             "paired by request, BCa 95% CIs over 10,000 resamples.", ""]
    for key, data in loaded.items():
        result = _analyze(data, n_resamples)
        lines += _stream_section(key, data, result, seconds, to)
    lines += wall_clock_lines(wall, "bem online simulate")[1:]
    path = to / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _stream_section(key: str, data: dict, result: dict, seconds: dict, to: Path) -> list[str]:
    c = data["config"]["online"]
    lines = [f"## Stream `{key}`", "", "| phase | requests | tasks (weights) | feedback | noise | poisoned |",
             "|---|---|---|---|---|---|"]
    for p in c["phases"]:
        w = p["weights"] or [1] * len(p["tasks"])
        lines.append(f"| {p['name']} | {p['items']} | {', '.join(f'{t} ({x:g})' for t, x in zip(p['tasks'], w))} | "
                     f"{p['feedback']:.0%} | {p['noise']:.0%} | {'yes' if p['poison'] else 'no'} |")
    lines += ["", f"Live at the start: `{c['live']}`. Feedback arrives {c['delay']} requests late; {c['batch']} requests "
              f"per serving step; learners: AdamW lr {c['lr']}, {c['update_batch']} examples per step "
              f"({'controller and sites' if c['train_module'] else 'the controller only'}); shadow: EWC λ = {c['ewc']}, "
              f"prox μ = {c['prox']}, replay {c['replay']} ({c['replay_share']:.0%} of each step); canary "
              f"{c['canary_items']} dev items per task, checked every {c['check_every']} feedback items or on an alarm, "
              f"δ = {c['delta']} over {c['max_checks']} planned checks (each at δ / {c['max_checks']}).", ""]
    if not result["complete"]:
        lines += [f"**Incomplete:** {result['n']} of {sum(p['items'] for p in c['phases'])} requests served by every "
                  "system so far; rerun the same command to finish.", ""]
    lines += ["### Live quality", "", "| system | all | " + " | ".join(result["phases"]) + " |",
              "|---|---|" + "---|" * len(result["phases"])]
    for s, m in result["means"].items():
        lines.append(f"| {s} | {m['all']:.4f} | " + " | ".join(f"{m.get(p, float('nan')):.4f}" for p in result["phases"])
                     + " |")
    lines += ["", "| system | versus | " + " | ".join(["all"] + result["phases"]) + " |",
              "|---|---|" + "---|" * (1 + len(result["phases"]))]
    for a, b in PAIRS:
        cells = {x["phase"]: _ci(x) for x in result["comparisons"] if x["system"] == a and x["versus"] == b}
        if cells:
            lines.append(f"| {a} | {b} | " + " | ".join(cells.get(p, "—") for p in ["all"] + result["phases"]) + " |")
    lines += [""]
    claim = next((x for x in result["comparisons"] if x["system"] == "shadow" and x["versus"] == "frozen"
                  and x["phase"] == "all"), None)
    if claim:
        holds = claim["low"] >= CLAIM
        lines += [f"**The seed's claim (shadow ≥ +{CLAIM:.0%} aggregate over the frozen system):** measured "
                  f"{_ci(claim)}; {'holds' if holds else 'not shown'} (it holds if the CI's lower bound is at least "
                  f"+{CLAIM}).", ""]
    poisoned = [p["name"] for p in c["phases"] if p["poison"]]
    for p in poisoned:
        naive = next((x for x in result["comparisons"] if x["system"] == "naive" and x["versus"] == "frozen"
                      and x["phase"] == p), None)
        shadow = next((x for x in result["comparisons"] if x["system"] == "shadow" and x["versus"] == "frozen"
                       and x["phase"] == p), None)
        if naive and shadow:
            lines += [f"**Poisoned phase `{p}`:** naive − frozen {_ci(naive)} "
                      f"({'degrades' if naive['high'] < 0 else 'no significant degradation'}); shadow − frozen "
                      f"{_ci(shadow)} ({'holds' if shadow['low'] > -0.01 else 'degrades'}: its CI's lower bound "
                      f"{'is' if shadow['low'] > -0.01 else 'is not'} above −0.01).", ""]
    if _plot(data, result, to / "online_stream.png"):
        lines += ["![live quality over the stream](online_stream.png)", ""]
    lines += _decisions(result) + _detector_lines(result["detectors"])
    stream = sum(v for n, v in seconds.items() if n.startswith("online/") or n == data["config"]["name"])
    material = {n: v for n, v in seconds.items() if not (n.startswith("online/") or n == data["config"]["name"])}
    lines += ["### Time", "", "Seconds per unit (training + evaluation; for the three systems: serving, learning and "
              "checks over the whole stream) as stored by the run, on its machine: "
              + ", ".join(f"`{n}` {v:.0f} s" for n, v in seconds.items()) + ".", "",
              f"- the stream (frozen, naive and shadow systems): {stream / 60:.0f} min "
              f"({'within' if stream <= 7200 else 'over'} 2 hours);"]
    lines += [f"- `{n}`, trained first when the folder does not hold it: {v / 60:.0f} min;" for n, v in material.items()]
    total = sum(seconds.values())
    lines += [f"- in all {total / 60:.0f} min: {'within' if total <= 7200 else 'over'} 2 hours (the detectors' "
              "calibration is in none of these units; the wall clock below counts everything).", ""]
    return lines


def _decisions(result: dict) -> list[str]:
    lines = ["### Shadow decisions", "", "| request | event | version | improvement | bound | reasons |",
             "|---|---|---|---|---|---|"]
    for e in result["decisions"]:
        if e["system"] != "shadow":
            continue
        if e["kind"] == "check":
            lines.append(f"| {e['idx']} | canary check {e['check']} | — | {e['improvement']:+.4f} | lower {e['lower']:+.4f} "
                         f"| {'; '.join(e['reasons']) or 'passed'} |")
        elif e["kind"] == "watch":
            lines.append(f"| {e['idx']} | watch: v{e['version']} vs v{e['previous']} | — | {e['difference']:+.4f} | "
                         f"upper {e['upper']:+.4f} | {'; '.join(e['reasons']) or 'no significant drop'} |")
        elif e["kind"] == "promote":
            lines.append(f"| {e['idx']} | **promote** | v{e['version']} (from v{e['previous']}) | "
                         f"{e['improvement']:+.4f} | lower {e['lower']:+.4f} | |")
        elif e["kind"] == "rollback":
            lines.append(f"| {e['idx']} | **rollback** | v{e['from']} → v{e['to']} | | | "
                         f"{'by hand' if e.get('manual') else 'watch set'} |")
        elif e["kind"] == "reset":
            lines.append(f"| {e['idx']} | shadow reset to live | v{e['version']} | {e['improvement']:+.4f} | | "
                         "significantly worse than live on the canary |")
    promoted = [e for e in result["decisions"] if e["system"] == "shadow" and e["kind"] == "check" and e["promote"]]
    worse = [g for e in promoted for g in e["guards"].values() if g["worse"]]
    if promoted:
        lines += ["", f"Live never regresses: {len(promoted)} promotion(s), each passed the canary with no task "
                  f"significantly worse than its predecessor ({len(worse)} guard failures among them)."]
    else:
        lines += ["", "No promotion: live stayed at version 0 (no canary check showed an improvement at its level)."]
    return lines + [""]


def _detector_lines(d: dict) -> list[str]:
    lines = ["### Drift detectors", ""]
    if d.get("thresholds"):
        t = d["thresholds"]
        lines.append(f"Calibrated by simulation on the live unit's scores of the first phase's mixture: ADWIN δ = "
                     f"{t['adwin_delta']:g}, Page–Hinkley threshold {t['ph_threshold']:.3g} (δ {t['ph_delta']:.3g}), "
                     f"two-sample (Mann–Whitney, window {t['window']}) α = {t['two_sample_alpha']:g}.")
    if d.get("simulated_per_10k"):
        lines.append("False alarms per 10,000 items on fresh simulated stable streams: "
                     + ", ".join(f"{k} {v:.2f}" for k, v in d["simulated_per_10k"].items()) + ".")
    if "first_phase" in d:
        lines.append(f"On the frozen system's stream, alarms in the first (stable) phase over its "
                     f"{d['first_phase_observed']} observed items: "
                     + ", ".join(f"{k} {v}" for k, v in d["first_phase"].items()) + ".")
        lines += ["", "Detection delay (requests after the phase starts; — = no alarm in the phase):", "",
                  "| phase | adwin | page_hinkley | two_sample |", "|---|---|---|---|"]
        for p, v in d.get("delays", {}).items():
            lines.append(f"| {p} | " + " | ".join("—" if v[k] is None else str(v[k])
                                                 for k in ("adwin", "page_hinkley", "two_sample")) + " |")
    if d.get("simulated_delays"):
        lines += ["", "Simulated: 500 resampled stable scores, then 500 resampled observed scores of the phase (frozen "
                  "system), 20 streams; median delay in observed items (changes detected / streams):", "",
                  "| change to | adwin | page_hinkley | two_sample |", "|---|---|---|---|"]
        for p, v in d["simulated_delays"].items():
            lines.append(f"| {p} | " + " | ".join(
                f"{'—' if v[k][0] is None else f'{v[k][0]:.0f}'} ({v[k][1]}/{v[k][2]})"
                for k in ("adwin", "page_hinkley", "two_sample")) + " |")
    return lines + [""]


def _plot(data: dict, result: dict, path: Path, window: int = 64) -> bool:
    systems = data["systems"]
    if not systems:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.2))
    first = next(iter(systems.values()))
    starts = {}
    for idx, phase, *_ in first:
        starts.setdefault(phase, idx)
    bounds = sorted(starts.items(), key=lambda kv: kv[1])
    for i, (phase, s) in enumerate(bounds):
        e = bounds[i + 1][1] if i + 1 < len(bounds) else len(first)
        ax.axvspan(s, e, color="0.93" if i % 2 else "white", zorder=0)
        ax.text((s + e) / 2, 1.02, phase, ha="center", va="bottom", fontsize=8, transform=ax.get_xaxis_transform())
    for s, rows in systems.items():
        x = np.array([r[4] for r in rows])
        k = min(window, len(x))
        smooth = np.convolve(x, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(x)), smooth, color=COLORS[s], label=f"{s} (mean of last {k})")
    for e in result["decisions"]:
        if e["system"] == "shadow" and e["kind"] in ("promote", "rollback", "reset"):
            style = {"promote": ("tab:green", "--"), "rollback": ("black", "-"), "reset": ("tab:orange", ":")}[e["kind"]]
            ax.axvline(e["idx"], color=style[0], linestyle=style[1], linewidth=1)
    alarms = [e["idx"] for e in result["alarms"] if e["system"] == "shadow"]
    if alarms:
        ax.plot(alarms, [0.01] * len(alarms), "|", color="tab:purple", markersize=10, label="shadow's drift alarms")
    ax.plot([], [], "--", color="tab:green", label="promotion")
    ax.plot([], [], ":", color="tab:orange", label="shadow reset")
    ax.set_xlabel("request")
    ax.set_ylabel("true score (rolling mean)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata=PNG_META)
    plt.close(fig)
    return True
