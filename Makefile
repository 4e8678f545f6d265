# wsi-mil — `make demo` runs the pipeline on a synthetic cohort, `make test` runs the tests.
# Both create (or reuse) .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned in pyproject (2.14.1 / 0.29.1, taken from local disk where present)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/wsi-mil demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check wsi_mil tests pipelines

format: install
	$(BIN)/ruff format wsi_mil tests pipelines

bench: install
	$(BIN)/python pipelines/benchmarks/tiling.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
