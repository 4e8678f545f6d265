# wsi-mil — `make demo` runs the pipeline on a synthetic cohort, `make test` runs the tests.
# Both create (or reuse) .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test test-slurm test-wheel test-all lint format bench clean

$(STAMP): pyproject.toml package.json package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision pinned in pyproject (2.14.1 / 0.29.1, taken from local disk where present)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The viewer's OpenSeadragon comes with the package build: hatch-jupyter-builder (pyproject)
# runs `npm install` and `npm run build` (package.json), which copies it into
# wsi_mil/viewer/static/openseadragon/ (gitignored; third-party JS is never committed).
# Without npm the editable install still succeeds and 'wsi-mil view' says what is missing.
install: $(STAMP)

demo: install
	$(BIN)/wsi-mil demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -m "not slow and not gpu and not slurm and not wheel" $(PYTEST_ARGS)

# The SLURM recipe (pipelines/cluster/slurm_example.py) on a single-node SLURM that the test
# starts and stops (pipelines/cluster/local_slurm.sh: root; installs Debian's munge, slurmctld,
# slurmd when missing). Fails when SLURM cannot run here; WSI_MIL_REQUIRE_SLURM=0 skips instead.
test-slurm: install
	$(BIN)/python -c "import dask_jobqueue" 2>/dev/null || $(BIN)/python -m pip install -q -e '.[slurm]'
	WSI_MIL_REQUIRE_SLURM=$${WSI_MIL_REQUIRE_SLURM:-1} $(BIN)/python -m pytest -m slurm tests/cohort/test_slurm.py $(PYTEST_ARGS)

# The wheel as users get it: built from a clean clone of HEAD (OpenSeadragon fetched from npm
# by the build), installed with pip into a fresh venv, tile → extract → train → predict → view.
test-wheel: install
	$(BIN)/python -m pytest -m wheel tests/test_wheel.py $(PYTEST_ARGS)

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
