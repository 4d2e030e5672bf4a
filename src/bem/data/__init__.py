"""Real data sources of the task suite (installed from Debian / PyPI packages, read offline)."""
