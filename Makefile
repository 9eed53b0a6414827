# edge-model-loader: the one source of truth for setting up, running, testing and shipping.
# `make run` and `make test` work on a fresh clone: they create .venv and install what is needed.

PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
BIN = $(VENV)/bin
PORT ?= 8080
HOST ?= 0.0.0.0
DATA_DIR ?= ./var
# Two levels: what serving needs (`make run`: [project].dependencies only) and the development tools on
# top (`make test`, lint, bench, deployment: the [dev] extra). STAMP is the development one.
RUN_STAMP = $(VENV)/.installed-run
STAMP = $(VENV)/.installed-dev

.PHONY: help setup setup-dev run test lint typecheck pytest bench mutants clean clean-data services

help:
	@echo "make run [PORT=8080]   set up (runtime dependencies only) and serve the bundled default model (data in $(DATA_DIR))"
	@echo "make test              set up, then ruff, mypy and pytest (installs mosquitto, Azurite, chromium, podman for the tests)"
	@echo "make bench             benchmarks (prints a table, writes bench/results.json)"
	@echo "make mutants           mutation testing of the safety-critical modules (long; see docs/testing.md)"
	@echo "make image|push|deployment|lint   ship it as an IoT Edge module (see docs/deployment.md)"
	@echo "make image-test[-arm64]  build the image from a debootstrapped base and run it (arm64: QEMU, ~10 min)"
	@echo "make clean             remove the venv, test tools and build output (keeps $(DATA_DIR), the model repository)"
	@echo "make clean-data        remove $(DATA_DIR): installed models, quarantine, drop folder"

# Re-install when the project's dependencies change.
$(RUN_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(RUN_STAMP)

setup-dev: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/edgeloader serve --host $(HOST) --port $(PORT) --data-dir $(DATA_DIR)

services:
	bash scripts/install-test-services.sh

lint: $(STAMP) lint-docker
	$(BIN)/ruff check supervisor handlers tests bench scripts
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) services
	$(BIN)/pytest -q -p no:cacheprovider

test: $(STAMP) services
	$(BIN)/ruff check supervisor handlers tests bench scripts
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/run.py

# Not part of `make test`: it breaks the code on purpose, over a thousand times (about 15 min on 2 shared
# cores; docs/testing.md). MUTANTS_ARGS passes options, e.g. MUTANTS_ARGS="--module supervisor/fsutil.py".
mutants: $(STAMP) services
	$(PY) scripts/mutants.py $(MUTANTS_ARGS)

# The model repository ($(DATA_DIR)) holds what operators installed: only clean-data removes it.
clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache build dist *.egg-info

clean-data:
	rm -rf $(DATA_DIR)

-include mk/deploy.mk
