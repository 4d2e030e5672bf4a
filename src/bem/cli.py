"""The `bem` command."""
from __future__ import annotations

import argparse
import json
import os
import logging
import sys
import time
from pathlib import Path

from bem.errors import BEMError


def _overlay(args: argparse.Namespace) -> str | None:
    """The preset overlay file (`_quick`, `_cpu`, ...) named by --quick / --preset; an unknown preset is an error."""
    from bem.experiments.config import list_presets

    if args.quick and args.preset and args.preset != "quick":
        raise BEMError(f"--quick and --preset {args.preset} contradict each other; --quick is --preset quick")
    preset = "quick" if args.quick else args.preset
    if preset is not None and preset not in list_presets():
        raise BEMError(f"--preset {preset!r} is not allowed; expected one of {list_presets()} (the experiments/_NAME.yaml "
                       "overlays)")
    return f"_{preset}" if preset else None


def cmd_run(args: argparse.Namespace) -> int:
    from bem.data.prepare import prepare
    from bem.experiments.config import list_experiments, load_experiment
    from bem.experiments.runner import QUICK_EXPERIMENTS, run

    names = args.experiments or (QUICK_EXPERIMENTS if args.quick else list_experiments())
    overlay = _overlay(args)
    tasks = sorted({t for n in names for t in load_experiment(n, overlay=overlay).tasks})
    if os.environ.get("RANK", "0") == "0":  # under DDP, rank 0 prepares; run `bem data prepare` first there
        prepare(tasks)  # idempotent: builds only what is missing
    out = Path(args.out or ("runs/quick" if args.quick else "runs/main"))
    start = time.perf_counter()
    units = run(names, out, quick=args.quick, seeds=args.seeds, command=" ".join(["bem"] + sys.argv[1:]), overlay=overlay,
                executor=args.executor, workers=args.workers, job_parameters=_job_parameters(args.job))
    if os.environ.get("RANK", "0") != "0":
        return 0  # under DDP, rank 0 reports
    for name, seed, status in units:
        print(f"{name:20s} seed {seed}: {status}")
    from bem.experiments.analysis import analyze
    from bem.experiments.report import write_report
    from bem.router import report as router_report

    from bem.online import report as online_report

    if online_report.is_online_folder(out):  # an online stream: its own report, no verdicts
        report, verdicts = online_report.write_report(out), []
        print(online_report.status_text(out), end="")
    elif router_report.is_router_folder(out):  # the router's own comparison table and verdicts
        report = router_report.write_report(out)
        verdicts = router_report.analyze(out)["verdicts"]
    else:
        report = write_report(out)
        verdicts = analyze(out)["verdicts"]
    for v in verdicts:
        print(f"{v['experiment']} vs {v['versus']}: {v['verdict'].upper()} — " + "; ".join(v["reasons"]))
    print(f"results in {out / 'results.sqlite'}, report {report} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from bem.budget import budget
    from bem.experiments.config import list_experiments, load_experiment, parity_reference

    rows = []
    for name in list_experiments():
        config = load_experiment(name)
        b = budget(config.model, config.bem)
        rows.append({"name": name, "anchor": config.anchor, "controller": config.bem.controller,
                     "added_parameters": b.parameters, "added_flops_per_token": b.flops_per_token,
                     "sites": b.sites, "description": config.description, "tolerance": config.gates.parity_tolerance})
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        anchor = by_name.get(parity_reference(load_experiment(r["name"])) or r["name"])
        r["parity_with"] = anchor["name"] if anchor else None
        r["parameter_ratio"] = r["added_parameters"] / anchor["added_parameters"] if anchor else None
        r["flops_ratio"] = r["added_flops_per_token"] / anchor["added_flops_per_token"] if anchor else None
        r["within_parity"] = (None if anchor is None else
                              abs(r["parameter_ratio"] - 1) <= r["tolerance"] and abs(r["flops_ratio"] - 1) <= r["tolerance"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'experiment':14s} {'controller':10s} {'added params':>12s} {'FLOPs/token':>12s} {'params/anchor':>13s} "
          f"{'FLOPs/anchor':>12s}  parity")
    for r in rows:
        ratio = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{r['name']:14s} {r['controller']:10s} {r['added_parameters']:12,d} {r['added_flops_per_token']:12,.0f} "
              f"{ratio(r['parameter_ratio']):>13s} {ratio(r['flops_ratio']):>12s}  "
              f"{'ok' if r['within_parity'] else 'OUT' if r['within_parity'] is False else '-'}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from bem.data.prepare import check_leakage, prepare

    root = Path(args.out) if args.out else None
    manifest = prepare(args.tasks, root)
    for name, entry in manifest["tasks"].items():
        if args.tasks and name not in args.tasks:
            continue
        leaks = check_leakage(name, root)
        counts = " / ".join(f"{entry['counts'][s]:,} {s}" for s in ("train", "dev", "test"))
        print(f"{name:16s} {entry['status']:10s} {counts}   leakage {leaks}")
        if any(leaks.values()):
            print(f"error: {name} test items leak into train: {leaks}", file=sys.stderr)
            return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from bem.evaluate import summary_table, zero_shot
    from bem.tasks import SPECS

    if not args.zero_shot:
        raise BEMError("bem eval scores the frozen base model only (--zero-shot)",
                       hint="trained experiments are scored by `bem run`")
    tasks = args.tasks or list(SPECS)
    unknown = [t for t in tasks if t not in SPECS]
    if unknown:
        raise BEMError(f"--tasks: unknown task(s) {unknown}; expected some of {sorted(SPECS)}")
    summaries = zero_shot(args.model, tasks, args.n, Path(args.out), args.batch_size)
    print(summary_table(summaries, args.model, args.n))
    return 0


SEED_MAX = 2**31 - 1  # as the experiments' seeds (bem.experiments.config.LIMITS["seeds"])


def cmd_experts_train(args: argparse.Namespace) -> int:
    from bem.experts import train_bank

    try:
        seed = int(args.seed)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= SEED_MAX:
        raise BEMError(f"--seed {args.seed!r} is not allowed; expected an integer in [0, {SEED_MAX}]")
    out = Path(args.out or ("runs/experts-quick" if args.quick else "runs/experts"))
    if out.exists() and not out.is_dir():
        raise BEMError(f"--out {out} is a file; expected a run folder")
    train_bank(args.experiment, out, quick=args.quick, seed=seed)
    print((out / "experts.md").read_text(), end="")
    print(f"bank in {out / 'bank'}, table in {out / 'experts.md'}, per-item scores in {out / 'results.sqlite'} "
          f"and {out / 'zero_shot'}")
    return 0


def _run_section(args: argparse.Namespace, section: str, example: str) -> Path:
    """`bem online simulate` / `bem safety curve`: check that the experiment has its section, prepare its data, run it
    (resumable) into --out; returns the run folder."""
    from bem.data.prepare import prepare
    from bem.experiments.config import load_experiment
    from bem.experiments.runner import run

    overlay = _overlay(args)
    config = load_experiment(args.experiment, overlay=overlay)
    if getattr(config, section) is None:
        raise BEMError(f"--experiment {args.experiment!r} has no {section}: section; expected an experiment with one "
                       f"(e.g. {example})")
    prepare(config.tasks)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BEMError(f"--out {out} is a file; expected a run folder")
    run([args.experiment], out, command=" ".join(["bem"] + sys.argv[1:]), overlay=overlay)
    return out


def cmd_safety_curve(args: argparse.Namespace) -> int:
    from bem.experiments.report import write_report
    from bem.safety import curve, curve_lines

    start = time.perf_counter()
    out = _run_section(args, "safety", "vc_safety")
    print("\n".join(curve_lines(curve(out / "results.sqlite"))))
    report = write_report(out)
    print(f"results in {out / 'results.sqlite'}, report {report} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_online_simulate(args: argparse.Namespace) -> int:
    from bem.online import report as online_report

    start = time.perf_counter()
    out = _run_section(args, "online", "ol_shadow")
    report = online_report.write_report(out)
    print(online_report.status_text(out), end="")
    print(f"results in {out / 'results.sqlite'}, report {report} ({time.perf_counter() - start:.0f} s)")
    return 0


def cmd_online_status(args: argparse.Namespace) -> int:
    from bem.online import report as online_report

    print(online_report.status_text(Path(args.run_dir)), end="")
    return 0


def cmd_online_rollback(args: argparse.Namespace) -> int:
    from bem.experiments.config import load_experiment
    from bem.experiments.results import ResultsDB
    from bem.online.simulate import rollback

    path = Path(args.run_dir) / "results.sqlite"
    if not path.is_file():
        raise BEMError(f"{args.run_dir}: no results.sqlite; expected the run folder of `bem online simulate`")
    config = load_experiment(args.experiment, overlay=_overlay(args))
    db = ResultsDB(path, create=False)
    try:
        frm, to = rollback(db, config, args.seed, Path(args.run_dir))
    except ValueError as err:
        raise BEMError(str(err)) from None
    finally:
        db.close()
    print(f"{config.name} seed {args.seed}: live rolled back from version {frm} to version {to}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from bem.experiments.analysis import analyze
    from bem.online import report as online_report
    from bem.router import report as router_report

    if online_report.is_online_folder(Path(args.run_dir)):
        for key, result in online_report.analyze(Path(args.run_dir)).items():
            print(f"stream {key}: {result['n']} requests served by every system")
            for c in result["comparisons"]:
                print(f"  {c['system']} vs {c['versus']} [{c['phase']}]: {c['difference']:+.4f} "
                      f"[{c['low']:+.4f}, {c['high']:+.4f}] (n={c['n']})")
        return 0
    if router_report.is_router_folder(Path(args.run_dir)):
        result = router_report.analyze(Path(args.run_dir))
        for row in result["rows"]:
            gap = f" gap recovered {row['gap'].estimate:+.3f} [{row['gap'].low:+.3f}, {row['gap'].high:+.3f}]" \
                if "gap" in row else ""
            print(f"{row['system']}: score {row['score']:.4f} (n={row['n']}) vs best single {row['delta'].estimate:+.4f} "
                  f"[{row['delta'].low:+.4f}, {row['delta'].high:+.4f}]{gap}")
        _print_verdicts(result["verdicts"])
        return 0
    result = analyze(Path(args.run_dir), hierarchical=getattr(args, "hierarchical", False))
    if not result["verdicts_stored"]:
        print(f"note: {Path(args.run_dir) / 'results.sqlite'} is read-only; the verdicts were computed, not stored",
              file=sys.stderr)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for c in result["comparisons"]:
        print(f"{c['experiment']} vs {c['versus']} {c['task']} [{c['slice']}] {c['metric']}: n={c['n']} "
              f"improvement {c['difference']:+.4f} CI [{c['low']:+.4f}, {c['high']:+.4f}] p={c['p']:.4f} BH p={c['p_bh']:.4f}")
    _print_verdicts(result["verdicts"])
    return 0


def _print_verdicts(verdicts: list[dict]) -> None:
    for v in verdicts:
        print(f"{v['experiment']} vs {v['versus']}: {v['verdict'].upper()}")
        for reason in v["reasons"]:
            print(f"  - {reason}")


def cmd_report(args: argparse.Namespace) -> int:
    from bem.experiments.report import write_report
    from bem.online import report as online_report
    from bem.router import report as router_report

    if online_report.is_online_folder(Path(args.run_dir)):  # the online stream's report
        path = online_report.write_report(Path(args.run_dir), to=Path(args.to) if args.to else None)
        print(f"wrote {path}")
        return 0
    if router_report.is_router_folder(Path(args.run_dir)):
        path = router_report.write_report(Path(args.run_dir), to=Path(args.to) if args.to else None)
        print(f"wrote {path}")
        return 0
    path = write_report(Path(args.run_dir), hierarchical=getattr(args, "hierarchical", False),
                        to=Path(args.to) if args.to else None)
    print(f"wrote {path}")
    return 0


RATIO_METRICS = ("prefill_p50_ms", "decode_p50_ms", "decode_p95_ms", "peak_memory_mb", "kv_hit_rate")


def profile_ratios(results, configs) -> list[tuple]:
    """(experiment, config_hash, versus, metric, ratio, device): each experiment over the base model and over
    its anchor (and its static LoRA, `baseline`), all measured in this one process."""
    by_name = {p.name: p for p in results}
    anchors = {c.name: [c.anchor or c.parity_with, c.baseline or "L0_lora"] for c in configs}
    rows = []
    for p in results[1:]:
        for versus in dict.fromkeys(["base"] + anchors.get(p.name, [])):
            other = by_name.get(versus)
            if other is None or other is p:
                continue
            for metric in RATIO_METRICS:
                mine, theirs = getattr(p, metric), getattr(other, metric)
                rows.append((p.name, p.config_hash, versus, metric, mine / theirs if theirs else float("nan"), p.device))
    return rows


def cmd_profile(args: argparse.Namespace) -> int:
    from bem.experiments.config import list_experiments, load_experiment
    from bem.experiments.results import ResultsDB
    from bem.profiling import profile

    if args.out and not (Path(args.out) / "results.sqlite").is_file():
        raise BEMError(f"--out {args.out}: no results.sqlite there; --out takes a run folder written by `bem run` "
                       "(its finished units are profiled with their trained adapters)",
                       hint="leave --out out to profile fresh modules")
    names = args.experiments or (list_experiments() if args.comprehensive else ["L0_lora", "S1_anchor"])
    overlay = _overlay(args)
    configs = [load_experiment(n, overlay=overlay) for n in names]  # the overlay only changes the config hash
    options = {"repeats": 20 if args.comprehensive else 5, "prompt_len": args.prompt_len, "batch": args.batch,
               "warmup": 2 if args.max_seconds is None else 1}
    results = profile(configs, device=args.device, run_dir=args.out, max_seconds=args.max_seconds, **options)
    print(f"{results[0].rounds} interleaved rounds of {options['repeats']}"
          + (f" (--max-seconds {args.max_seconds:g})" if args.max_seconds is not None else ""))
    base = results[0]
    print(f"{'model':14s} {'modules':12s} {'prefill p50':>11s} {'p95':>8s} {'decode p50':>10s} {'p95':>8s} "
          f"{'peak MB':>8s} {'KV hit':>7s}  decode ×base")
    for p in results:
        modules = p.status + (f" s{p.seed}" if p.seed is not None else "")
        print(f"{p.name:14s} {modules:12s} {p.prefill_p50_ms:9.1f}ms {p.prefill_p95_ms:6.1f}ms {p.decode_p50_ms:8.1f}ms "
              f"{p.decode_p95_ms:6.1f}ms {p.peak_memory_mb:8.1f} {p.kv_hit_rate:7.3f}  {p.decode_p50_ms / base.decode_p50_ms:.3f}")
    untrained = [p.name for p in results if p.status == "untrained"]
    if untrained:
        where = f"no finished unit in {args.out}" if args.out else "no run folder given (--out)"
        print(f"note: {', '.join(untrained)} profiled UNTRAINED (fresh modules, ΔW = 0: the base model's numbers): {where}")
    ratios = profile_ratios(results, configs)
    for experiment, _, versus, metric, ratio, _ in ratios:
        if versus != "base":
            print(f"  {experiment} vs {versus}: {metric} ×{ratio:.3f}")
    if args.out:
        db = ResultsDB(Path(args.out) / "results.sqlite")
        db.write_profiles(results)
        db.write_profile_ratios(ratios)
        db.close()
        print(f"stored in {Path(args.out) / 'results.sqlite'}")
    return 0


def _job_parameters(pairs: list[str]) -> dict:
    from bem.experiments.executor import job_parameters

    try:
        return job_parameters(pairs)
    except ValueError as err:
        raise BEMError(str(err)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a finite number > 0")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 1")
    return value


REPORT_BUGS = ("this is a bug in BEM, not in your input: please report it on the project's issue tracker with the "
               "command and the output of `bem --debug` followed by the same arguments")


def _known(err: BaseException) -> tuple[str, str] | None:
    """(message, hint) of an error a user can act on, or None for a bug."""
    import errno

    if isinstance(err, BEMError):
        return str(err), err.hint
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return (f"no space left on the device{f' writing {err.filename}' if err.filename else ''}",
                "free some space and run the same command again: finished units and the last checkpoint are kept")
    if isinstance(err, (PermissionError, FileNotFoundError, ModuleNotFoundError)) or \
            (isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES)):
        return str(err), ""
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    from bem import bench

    subjects = args.subjects or (["base", "peft_lora", "bem_static", "bem_routed"] if args.quick else list(bench.SUBJECTS))
    unknown = [name for name in subjects if name not in bench.SUBJECTS]
    if unknown:
        raise BEMError(f"--subjects: unknown {unknown}; expected some of {list(bench.SUBJECTS)}")
    if "base" not in subjects:
        subjects = ["base"] + subjects  # every ratio is against the base model measured in the same run
    result = bench.bench(subjects, tuple(args.precisions) if args.precisions else None, args.device, batch=args.batch, prompt_len=args.prompt_len,
                         new_tokens=args.new_tokens, train_len=args.train_len, rounds=args.rounds,
                         log=lambda line: print(line, file=sys.stderr), modes=tuple(args.modes))
    out = Path(args.out or f"runs/bench/bench-{args.device.split(':')[0]}.json")
    bench.write(result, out)
    print(bench.markdown(result))
    print(f"stored {out} and {out.with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `bem` command: every error a user can act on is one line (and a hint) with exit status 2 (1 for the
    machine's: disk, permissions); anything else is reported as a bug; `bem --debug ...` shows the traceback."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted: finished units are stored and the last checkpoint is kept; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one place every error reaches the user)
        if debug:
            raise
        known = _known(err)
        if known is None:
            print(f"internal error: {type(err).__name__}: {err}\n{REPORT_BUGS}", file=sys.stderr)
            return 1
        message, hint = known
        print(f"error: {message}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 2 if isinstance(err, BEMError) else 1


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bem", description="Basis Extension Modules: train and judge "
                                     "context-routed low-rank modules on frozen language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train and evaluate experiments; finished units are skipped")
    run.add_argument("--quick", action="store_true", help="the embedded default: SmolLM2-135M, L0_lora + S1_anchor, "
                     "small budgets (experiments/_quick.yaml), minutes on 2 CPU cores")
    run.add_argument("--preset", default=None, help="apply the overlay experiments/_PRESET.yaml to every experiment "
                     "(e.g. cpu: the 3-seed, 500-item preset of docs/results/v13_cpu sized for 2 CPU cores)")
    run.add_argument("--experiments", nargs="+", default=None, help="experiment names (default: all, or the quick pair)")
    run.add_argument("--seeds", type=_positive, default=None, help="number of seeds 0..N-1 (default: each experiment's own)")
    run.add_argument("--out", default=None, help="run folder (default: runs/quick with --quick, else runs/main)")
    run.add_argument("--executor", default="local", choices=["local", "submitit"],
                     help="local: every unit in this process (default); submitit: units that need no other unit run "
                     "as jobs (SLURM where sbatch exists, else local processes), results written here only")
    run.add_argument("--workers", type=_positive, default=2, help="jobs at once with --executor submitit (default 2)")
    run.add_argument("--job", nargs="+", default=[], metavar="KEY=VALUE", help="submitit parameters of every job, "
                     "e.g. slurm_partition=gpu gpus_per_node=1 cpus_per_task=8 mem_gb=32 timeout_min=120")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="experiments with added parameters, FLOPs per token and parity vs the anchor")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_list)
    ana = sub.add_parser("analyze", help="paired comparisons, BH-FDR and verdicts of a run folder")
    ana.add_argument("run_dir")
    ana.add_argument("--json", action="store_true")
    hier = ("seed × item bootstrap: seed-to-seed variance in the intervals (default: seeds averaged per item, BCa; "
            "corpus metrics always pool the seeds)")
    ana.add_argument("--hierarchical", action="store_true", help=hier)
    ana.set_defaults(func=cmd_analyze)
    rep = sub.add_parser("report", help="write report.md and plots of a run folder from its database")
    rep.add_argument("run_dir")
    rep.add_argument("--hierarchical", action="store_true", help=hier)
    rep.add_argument("--to", default=None, help="folder for report.md and the plots (default: the run folder; "
                     "needed when the run folder is read-only)")
    rep.set_defaults(func=cmd_report)
    prof = sub.add_parser("profile", help="latency p50/p95 (prefill, decode step) and peak memory vs the base model")
    prof.add_argument("--experiments", nargs="+", default=None, help="default: L0_lora S1_anchor")
    prof.add_argument("--comprehensive", action="store_true", help="every experiment, more repeats")
    prof.add_argument("--max-seconds", type=_positive_float, default=None,
                      help="finish within about this many seconds: one warm-up pass per model instead of two, and "
                      "fewer interleaved rounds (at least 3) if needed")
    prof.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    prof.add_argument("--prompt-len", type=_positive, default=128)
    prof.add_argument("--batch", type=_positive, default=1)
    prof.add_argument("--preset", default=None, help="the overlay the run folder was made with (matches its config hashes)")
    prof.add_argument("--quick", action="store_true", help="same as --preset quick")
    prof.add_argument("--out", default=None, help="run folder: each experiment's finished unit is profiled with its "
                      "trained adapter (restored by retraining if missing) and the profiles go to its database "
                      "(for the gates); experiments without a finished unit are profiled untrained, and say so")
    prof.set_defaults(func=cmd_profile)
    ben = sub.add_parser("bench", help="speed of BEM vs the base model and PEFT LoRA (prefill, decode step, generation, "
                         "train step; fp32 and bf16), interleaved in one process; prints ratios, stores JSON + Markdown")
    ben.add_argument("--subjects", nargs="+", default=None, help="default: all (base, peft_lora, peft_lora_merged, "
                     "bem_static, bem_routed, v1_dynrank, v2_gateshaping, v3_kron, v4_film)")
    ben.add_argument("--quick", action="store_true", help="base, peft_lora, bem_static, bem_routed only")
    ben.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=None,
                     help="default: fp32 and bf16 where bf16 is native (CUDA, AVX512-BF16/AMX CPUs), else fp32")
    ben.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    ben.add_argument("--modes", nargs="+", choices=["eager", "eager_unfused", "compiled"], default=["eager"],
                     help="eager (on CUDA: the fused site kernel), eager_unfused (the torch path of the sites), "
                          "compiled (torch.compile of every subject, the base too); ratios are within a mode")
    ben.add_argument("--rounds", type=_positive, default=3)
    ben.add_argument("--batch", type=_positive, default=8)
    ben.add_argument("--prompt-len", type=_positive, default=128)
    ben.add_argument("--new-tokens", type=_positive, default=32)
    ben.add_argument("--train-len", type=_positive, default=160)
    ben.add_argument("--out", default=None, help="JSON path (default runs/bench/bench-DEVICE.json; .md beside it)")
    ben.set_defaults(func=cmd_bench)
    data = sub.add_parser("data", help="build the task suite").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="build every task's JSONL splits and manifest (idempotent)")
    prep.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    prep.add_argument("--out", default=None, help="data folder (default: $BEM_DATA or ~/.cache/bem/data/v1)")
    prep.set_defaults(func=cmd_data_prepare)
    ev = sub.add_parser("eval", help="score a model on the task suite's test splits")
    ev.add_argument("--zero-shot", action="store_true", help="the frozen base model, no modules")
    ev.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    ev.add_argument("--n", type=_positive, default=200, help="items per task (default: 200)")
    ev.add_argument("--model", default="smollm2-135m")
    ev.add_argument("--batch-size", type=_positive, default=16)
    ev.add_argument("--out", default="runs/zero_shot", help="results folder (default: runs/zero_shot)")
    ev.set_defaults(func=cmd_eval)
    experts = sub.add_parser("experts", help="the expert bank (SPEC §4)").add_subparsers(dest="experts_command",
                                                                                         required=True)
    bank = experts.add_parser("train", help="train the bank in one unit (resumable, like bem run), save it to OUT/bank "
                              "and compare each expert alone with the zero-shot base model on its task (OUT/experts.md)")
    bank.add_argument("--quick", action="store_true", help="small budgets (experiments/_quick.yaml; the bank keeps "
                      "its own tasks)")
    bank.add_argument("--out", default=None, help="run folder (default: runs/experts, runs/experts-quick with --quick)")
    bank.add_argument("--seed", default="0", help="the unit's seed (default: 0)")
    bank.add_argument("--experiment", default="experts_bank", help="the bank's experiment: a name under experiments/ "
                      "or a .yaml path (default: experts_bank)")
    bank.set_defaults(func=cmd_experts_train)
    online = sub.add_parser("online", help="online shadow mode (SPEC §5)").add_subparsers(dest="online_command",
                                                                                        required=True)
    sim = online.add_parser("simulate", help="serve the experiment's stream with the frozen, naive and shadow systems "
                            "(resumable: a rerun continues from the last committed step), then write the report")
    sim.add_argument("--experiment", default="ol_shadow", help="an online experiment (default: ol_shadow)")
    sim.add_argument("--preset", default=None, help="overlay experiments/_PRESET.yaml (e.g. online_cpu)")
    sim.add_argument("--quick", action="store_true", help="the quick overlay (experiments/_quick.yaml)")
    sim.add_argument("--out", default="runs/online", help="run folder (default: runs/online)")
    sim.set_defaults(func=cmd_online_simulate)
    st = online.add_parser("status", help="where each system of a run folder's streams is, and what it decided")
    st.add_argument("run_dir")
    st.set_defaults(func=cmd_online_status)
    rb = online.add_parser("rollback", help="put the shadow system's live weights back to the version before")
    rb.add_argument("run_dir")
    rb.add_argument("--experiment", default="ol_shadow")
    rb.add_argument("--preset", default=None)
    rb.add_argument("--quick", action="store_true")
    rb.add_argument("--seed", type=int, default=0)
    rb.set_defaults(func=cmd_online_rollback)
    safety = sub.add_parser("safety", help="the safety basis (SPEC §5, VC)").add_subparsers(dest="safety_command",
                                                                                      required=True)
    cur = safety.add_parser("curve", help="train the skill unit and the safety block if missing, evaluate every knob "
                            "value λ on the safety and wordnet_qa test items (resumable), print the curve, write the "
                            "report")
    cur.add_argument("--experiment", default="vc_safety", help="a safety experiment (default: vc_safety)")
    cur.add_argument("--preset", default=None, help="overlay experiments/_PRESET.yaml (e.g. safety_cpu)")
    cur.add_argument("--quick", action="store_true", help="the quick overlay (experiments/_quick.yaml)")
    cur.add_argument("--out", default="runs/safety", help="run folder (default: runs/safety)")
    cur.set_defaults(func=cmd_safety_curve)
    args = parser.parse_args(argv)
    if getattr(args, "out", None) is not None and args.command == "run" and Path(args.out).exists() \
            and not Path(args.out).is_dir():
        raise BEMError(f"--out {args.out} is a file; expected a run folder")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.version:
        from bem import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
