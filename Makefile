# One entry point for people and CI. `make test` builds the environment (torch pinned to the
# CPU build this project is tested with) and runs the default test suite.
PY ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: install test test-all lint reproduce bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check src tests benchmarks

test: install lint
	$(BIN)/python -m pytest -m "not slow" -q

test-all: install lint
	$(BIN)/python -m pytest -q

reproduce: install
	$(BIN)/bgnorm reproduce --task batch-size,g-sweep,mechanism --preset quick --out runs/quick

bench: install
	$(BIN)/python benchmarks/bench_norms.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
