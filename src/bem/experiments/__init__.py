"""Experiments: typed configs from YAML, training, evaluation, the results database and the runner."""
