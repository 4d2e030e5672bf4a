#!/usr/bin/env python3
"""The seed's `python v13_final_analysis.py [RUN_DIR]`: analysis and report of a finished run folder
(default runs/v13). A thin wrapper over `bem analyze` + `bem report`."""
import sys

from bem.cli import main

if __name__ == "__main__":
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/v13"
    code = main(["analyze", run_dir])
    sys.exit(code or main(["report", run_dir]))
