#!/usr/bin/env python3
"""The seed's entry point: `python run_bem_experiments.py [--quick] [--experiments ...] [--list-experiments]`.
A thin wrapper over `bem run` / `bem list`."""
import argparse
import sys

from bem.cli import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--experiments", nargs="+")
    parser.add_argument("--list-experiments", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.list_experiments:
        sys.exit(main(["list"]))
    argv = ["run"] + (["--quick"] if args.quick else []) + (["--experiments", *args.experiments] if args.experiments else [])
    sys.exit(main(argv + (["--out", args.out] if args.out else [])))
