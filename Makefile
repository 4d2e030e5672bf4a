# make setup: .venv with pinned packages + the Debian data packages of the task suite (idempotent).
# make run:   setup + the main job.     make test: setup + the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
DEBIAN_PACKAGES := diatheke sword-text-sparv sword-text-web wordnet-base
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup debian run test test-all results-cpu results-default clean

setup: $(STAMP) debian

$(STAMP): pyproject.toml requirements.lock requirements-nodeps.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	# Triton: torch's CUDA wheels bring their own; with the CPU wheel the fused kernel's tests run in its interpreter
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton==3.9.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

debian:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: setup
	$(BIN)/bem run --quick

test: setup
	$(BIN)/python -m pytest -q

# The first real results (docs/results/v13_cpu): 6 experiments x 3 seeds x 500 items per task on 2 CPU
# cores (about 2 h 15 min), seed 0 also under the index-swap conditions (evaluation.swap_seeds in
# experiments/_cpu.yaml; 17 conditions x ~4.7 min, about 80 min more) and routing statistics (100 items per
# task, ~1.5 min per routed unit), then the gates' profiles of the trained units and the report.
# Resumable: rerun after an interruption. On the stored folder, whose adapters are not committed, a rerun
# retrains the units it needs (checked against the stored curves) to add what is missing.
V13 := S1_anchor L0_lora v1_dynrank v2_gateshaping v3_kron v4_film
results-cpu: setup
	$(BIN)/bem run --preset cpu --experiments $(V13) --out docs/results/v13_cpu
	$(BIN)/bem profile --preset cpu --comprehensive --experiments $(V13) --out docs/results/v13_cpu
	$(BIN)/bem report docs/results/v13_cpu

# The v13 results at the default budget (issue 14): the same 6 experiments x 3 seeds x 500 + 500 items with 200
# steps x 8 (length-bucketed batches, precision auto: bf16 where native). On 2 AVX2 CPU cores a unit took
# 34.5 min in fp32 (docs/perf.md), so the suite is a job of about 11 h plus routing and index-swap passes: resumable (rerun
# after an interruption; finished units are skipped). On a lent GPU: scripts/gpu_session.sh resumes the same folder.
results-default: setup
	$(BIN)/bem run --experiments $(V13) --out docs/results/v13_default
	$(BIN)/bem profile --comprehensive --experiments $(V13) --out docs/results/v13_default
	$(BIN)/bem report docs/results/v13_default

clean:
	rm -rf $(VENV) build src/*.egg-info
