"""The seed project's Python API, as a thin layer over `bem`.

    from bem2 import BEMExperimentRunner
    runner = BEMExperimentRunner(base_model="smollm2-135m", experiments=["S1_anchor", "L0_lora"],
                                 statistical_validation=True)
    runner.run_experiments()        # trains and evaluates every unfinished unit
    report = runner.run_with_validation()   # the same, then analysis + report; returns the analysis
"""
from __future__ import annotations

from pathlib import Path

from bem import BEMConfig, attach_bem, load_bem, save_bem

__all__ = ["BEMConfig", "BEMExperimentRunner", "attach_bem", "load_bem", "save_bem"]


class BEMExperimentRunner:
    def __init__(self, base_model: str = "smollm2-135m", experiments: list[str] | None = None,
                 statistical_validation: bool = True, output_dir: str = "runs/bem2", quick: bool = False,
                 seeds: int | None = None, experiments_dir: str | Path | None = None):
        from bem.experiments.config import EXPERIMENTS_DIR, list_experiments

        self.base_model = base_model
        self.experiments_dir = Path(experiments_dir or EXPERIMENTS_DIR)
        self.experiments = experiments or list_experiments(self.experiments_dir)
        self.statistical_validation = statistical_validation
        self.output_dir = Path(output_dir)
        self.quick, self.seeds = quick, seeds

    def _configs_ok(self) -> None:
        from bem.experiments.config import load_experiment

        for name in self.experiments:
            config = load_experiment(name, self.experiments_dir)
            if config.model != self.base_model:
                raise ValueError(f"experiment {name} is configured for base model {config.model!r}, "
                                 f"not {self.base_model!r}; set `model:` in its YAML file")

    def run_experiments(self) -> list[tuple[str, int, str]]:
        from bem.experiments.runner import run

        self._configs_ok()
        return run(self.experiments, self.output_dir, quick=self.quick, seeds=self.seeds,
                   directory=self.experiments_dir, command="bem2.run_experiments")

    def run_with_validation(self) -> dict:
        from bem.experiments.analysis import analyze
        from bem.experiments.report import write_report

        self.run_experiments()
        if not self.statistical_validation:
            return {}
        write_report(self.output_dir)
        return analyze(self.output_dir)
