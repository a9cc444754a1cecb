# Setup is `make quickstart` or `make test`: each builds .venv from pyproject.toml when it is
# missing or older than pyproject.toml, then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true

.PHONY: quickstart test lint format clean bench bench-cuda gpu-check

$(VENV)/.installed-base: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed-base

# The whole recipe on the embedded benchmark; ends with the table and how to open MLflow.
quickstart: $(VENV)/.installed-base
	$(BIN)/ratatouille run experiments/quickstart.yaml

# tests/test_ray_up.py runs `ray up` over SSH on loopback: OpenSSH's sshd and client and rsync,
# with every library they need beyond the base Debian system, unpacked from Debian's packages into
# .tools/ (nothing installed system-wide; apt's lists refreshed if stale). Before the suite, each
# tool must run, or one line says what is missing and how to get it.
TOOLS := .tools
$(TOOLS)/.unpacked: tests/system_tools.py
	$(PYTHON) tests/system_tools.py unpack $(TOOLS)
	touch $@

test: $(VENV)/.installed-test $(TOOLS)/.unpacked
	@$(BIN)/python tests/system_tools.py check $(TOOLS)
	$(BIN)/python -m pytest

# Every speed and memory figure (P1..P17 of docs/performance.md), each against its baseline
# in one run, with the machine; under 15 minutes on 2 cores. Not part of `make test`.
# `make bench-cuda` runs only the CUDA figures (on a GPU machine). Both rewrite their section of
# docs/performance.md and keep a copy in benchmarks/results*.txt.
bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py --docs docs/performance.md

bench-cuda: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py --cuda-only --out benchmarks/results-cuda.txt \
		--docs docs/performance.md

# On a GPU machine: a whole `ratatouille run` on CUDA (ResNet-50, 2 arms x 4 runs packed four to
# a GPU) checked from its MLflow records, then `make bench-cuda` (benchmarks/gpu_check.py).
gpu-check: $(VENV)/.installed-test
	$(BIN)/python benchmarks/gpu_check.py

# The habits that keep the layout: lint and format checks, and the type check (pyproject.toml).
LINTED := ratatouille tests benchmarks experiments
lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

format: $(VENV)/.installed-test
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

clean:
	rm -rf $(VENV) $(TOOLS) ray_results mlflow.db mlartifacts
