#!/usr/bin/env python3
"""The seed's `python reproduce_v13_stack.py`: runs the v1.3 stack (every experiment under experiments/,
all seeds) into runs/v13 and writes its report. A thin wrapper over `bem run` + `bem report`."""
import sys

from bem.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--out", sys.argv[1] if len(sys.argv) > 1 else "runs/v13"]))
