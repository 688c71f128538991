# The README's two commands: `make pipeline` and `make test`. Both create .venv on first use
# and reuse it afterwards (re-installing only when pyproject.toml or constraints.txt change).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# OpenVINO (the `openvino` extra) runs on x86-64 CPUs only
comma  := ,
EXTRAS := dev$(if $(filter x86_64 amd64,$(shell uname -m)),$(comma)openvino)
# pip's own messages, less one harmless warning; a failing pip still fails the target (pipefail:
# only grep's "nothing left to print" is forgiven)
PIP_QUIET := 2>&1 | { grep -v -e 'is ignored: it is neither' -e '^$$' || true; }

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The tools' telemetry is switched off by the project's own entry points (tasks/environment.py),
# and by the import check below (ONNX Runtime's starts at import).

.PHONY: help setup pipeline test test-fast ui bench clean-venv

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info[:2] == (3, 11) else \
		f"error: Python 3.11 is required, $(PYTHON) is {sys.version.split()[0]}: set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (first time: a few minutes)"
	@$(BIN)/python -m pip install -q --upgrade 'pip>=24' $(PIP_QUIET)
	@$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]' $(PIP_QUIET)
	@$(BIN)/python -c 'from tasks import environment; environment.apply(); \
		import bit_core, torch, torchvision, dvc, prefect, mlflow, onnxruntime'
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned dependencies

pipeline: setup  ## run the whole pipeline (dvc repro) on the default experiment
	@$(BIN)/bit run

# Test processes side by side, one module each (pytest-xdist), the longest modules first
# (tests/conftest.py: LONGEST_FIRST; xdist would otherwise reorder them by their number of tests).
# A full run keeps a 2-core CPU busy only about half the time in one process: much of it waits
# for servers, workers and timeouts. Side by side, every torch process (and each stage it starts)
# has as many OpenMP threads as there are cores; OMP_WAIT_POLICY=PASSIVE makes an idle thread
# sleep instead of spinning on a core the other process needs.
TEST_WORKERS ?= 2
PYTEST := OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile \
	--no-loadscope-reorder

test: setup  ## run the test suite (all tiers)
	@$(PYTEST)

test-fast: setup  ## run the fast tiers only
	@$(PYTEST) -m 'not slow'

ui: setup  ## open the MLflow UI on the project's store (http://127.0.0.1:5000)
	@$(BIN)/bit ui

bench: setup  ## run the benchmarks under bench/
	@$(BIN)/python -m bench

clean-venv:  ## remove .venv
	rm -rf $(VENV)
