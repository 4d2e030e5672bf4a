#!/usr/bin/env python3
"""The seed's `python validate_structure.py`: checks that the package imports, every experiment file
loads and validates, and the public API and commands are in place. Exits 1 naming what is wrong."""
import importlib
import sys


def main() -> int:
    problems = []
    for module in ("bem", "bem.module.layer", "bem.module.controller", "bem.module.runtime", "bem.module.attach", "bem.stats", "bem.metrics",
                   "bem.tasks", "bem.evaluate", "bem.budget", "bem.experiments.runner", "bem.experiments.report", "bem2"):
        try:
            importlib.import_module(module)
        except Exception as err:  # report every broken module, not only the first
            problems.append(f"import {module}: {err}")
    from bem.experiments.config import list_experiments, load_experiment

    names = list_experiments()
    for name in names:
        try:
            load_experiment(name)
        except Exception as err:
            problems.append(f"experiment {name}: {err}")
    import bem

    missing = [n for n in ("BEMConfig", "attach_bem", "save_bem", "load_bem") if not hasattr(bem, n)]
    problems += [f"bem.{n} is missing" for n in missing]
    for line in problems:
        print("FAIL", line)
    print(f"{len(names)} experiments, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
