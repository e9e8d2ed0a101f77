# Two commands a newcomer needs:
#   make demo   cluster up, chart installed, sample TrainingJob trained, a worker killed, recovery shown
#   make test   everything CI runs: lint, type-check, unit tests (again on the lowest allowed
#               dependency versions), end-to-end tests on the local cluster and the image
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: venv lint unit unit-min e2e test demo binaries cluster-up cluster-down lock image clean

# Runtime dependencies exactly as the image has them (requirements.lock, hash-checked), then the
# package and its development tools.
$(BIN)/relaunch: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/relaunch

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: venv binaries
	$(BIN)/pytest -q tests

# The unit tests again with the lowest version of each runtime dependency pyproject.toml allows.
unit-min: binaries
	PYTHON=$(PYTHON) bash scripts/unit-min.sh

binaries:
	bash e2e/cluster/build.sh
	bash e2e/cluster/build-kueue.sh
	bash e2e/cluster/install-node-tools.sh

# In a network namespace of their own (scripts/netns.sh says why); the image is built before, as
# nothing in there reaches a package registry.
e2e: venv binaries image
	bash scripts/netns.sh $(BIN)/pytest -q e2e

test: lint unit unit-min e2e

demo: venv binaries
	$(BIN)/python -m e2e.demo

cluster-up: venv binaries
	$(BIN)/python -m e2e.cluster up

cluster-down: venv
	$(BIN)/python -m e2e.cluster down

# The operator image, built with podman (scripts/image.sh says how, and what it installs).
image:
	bash scripts/image.sh

# Refresh requirements.lock: every pin to the newest release pyproject.toml allows, with hashes.
lock: venv
	bash scripts/lock.sh --upgrade

clean:
	rm -rf $(VENV) .venv-min .pytest_cache .mypy_cache .ruff_cache
