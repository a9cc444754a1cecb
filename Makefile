# Setup is `make quickstart` or `make test`: each builds .venv from pyproject.toml when it is
# missing or older than pyproject.toml, then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK := true

.PHONY: quickstart test lint format clean

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

# tests/test_ray_up.py runs `ray up` over SSH on loopback: OpenSSH's sshd and rsync, unpacked from
# Debian's packages into .tools/ (nothing installed system-wide; apt's lists refreshed if stale).
TOOLS := .tools
SSH_DEBS := openssh-server rsync libwrap0
$(TOOLS)/.unpacked:
	rm -rf $(TOOLS) && mkdir -p $(TOOLS)/debs
	cd $(TOOLS)/debs && (apt-get download -qq $(SSH_DEBS) \
		|| (apt-get update -qq && apt-get download -qq $(SSH_DEBS)))
	for deb in $(TOOLS)/debs/*.deb; do dpkg -x "$$deb" $(TOOLS)/root; done
	touch $@

test: $(VENV)/.installed-test $(TOOLS)/.unpacked
	$(BIN)/python -m pytest

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
