"""The `bem` command."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def cmd_run(args: argparse.Namespace) -> int:
    from bem.demo import DemoArgs, run_demo

    demo = DemoArgs(out=Path(args.out), model=args.model, seed=args.seed)
    if args.steps is not None:
        demo.steps = args.steps
    if not args.quick:
        logging.getLogger("bem").warning("the full experiment runner is not built yet; running the quick job")
    r = run_demo(demo)
    print(f"task: {r['task']}  ({r['train_items']} train / {r['eval_items']} held-out synsets)")
    print(f"BEM trainable parameters: {r['trainable_parameters']:,}, {r['steps']} steps")
    print(f"held-out target-token loss: base {r['eval_target_loss_base']:.3f} -> BEM {r['eval_target_loss_bem']:.3f} "
          f"(perplexity {r['eval_perplexity_base']:.1f} -> {r['eval_perplexity_bem']:.1f})")
    print(f"sample: {r['sample']['word']!r} -> {r['sample']['bem_output']!r}  (reference: {r['sample']['reference']!r})")
    print(f"wrote {demo.out / 'result.json'} and {demo.out / 'adapter'} in {r['wall_seconds']:.0f} s")
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
        print("error: only --zero-shot exists until the experiment runner lands", file=sys.stderr)
        return 2
    tasks = args.tasks or list(SPECS)
    unknown = [t for t in tasks if t not in SPECS]
    if unknown:
        print(f"error: unknown task(s) {unknown}; known: {sorted(SPECS)}", file=sys.stderr)
        return 2
    summaries = zero_shot(args.model, tasks, args.n, Path(args.out), args.batch_size)
    print(summary_table(summaries, args.model, args.n))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bem", description="Basis Extension Modules: train and judge "
                                     "context-routed low-rank modules on frozen language models.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train and evaluate (for now: the quick demo job)")
    run.add_argument("--quick", action="store_true", help="the embedded default: SmolLM2-135M, minutes on a CPU")
    run.add_argument("--out", default="runs/quick", help="run folder (default: runs/quick)")
    run.add_argument("--model", default="smollm2-135m", help="embedded model name or local HF folder")
    run.add_argument("--steps", type=int, default=None, help="training steps (default: 60)")
    run.add_argument("--seed", type=int, default=0)
    run.set_defaults(func=cmd_run)
    data = sub.add_parser("data", help="build the task suite").add_subparsers(dest="data_command", required=True)
    prep = data.add_parser("prepare", help="build every task's JSONL splits and manifest (idempotent)")
    prep.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    prep.add_argument("--out", default=None, help="data folder (default: $BEM_DATA or ~/.cache/bem/data/v1)")
    prep.set_defaults(func=cmd_data_prepare)
    ev = sub.add_parser("eval", help="score a model on the task suite's test splits")
    ev.add_argument("--zero-shot", action="store_true", help="the frozen base model, no modules")
    ev.add_argument("--tasks", nargs="+", default=None, help="task names (default: all)")
    ev.add_argument("--n", type=int, default=200, help="items per task (default: 200)")
    ev.add_argument("--model", default="smollm2-135m")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", default="runs/zero_shot", help="results folder (default: runs/zero_shot)")
    ev.set_defaults(func=cmd_eval)
    args = parser.parse_args(argv)
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
