# surfaceinspect — set-up and everyday targets. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo lint format bench dist dist-check slim-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install surfaceinspect with pinned torch/torchvision

test: $(STAMP)  ## run the test suite (uses ../shared/data for real-data checks when present)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the suite without the tests marked slow (model training of a minute or more): for development
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)  ## train on a generated dataset, score it, write heatmaps (a few minutes on a CPU)
	$(BIN)/python -m surfaceinspect demo --out demo_output

lint: $(STAMP)  ## ruff, and the runtime distribution's dependency split against pyproject.toml
	$(BIN)/ruff check .
	$(BIN)/python packaging/runtime/build_runtime.py --check

format: $(STAMP)
	$(BIN)/ruff format .

bench: $(STAMP)  ## benchmark both methods (cpu profiles) on ../shared/data; writes bench_output/
	$(BIN)/python -m surfaceinspect benchmark ../shared/data/mtd ../shared/data/mvtec_bottle \
		--method draem --method csflow --profile cpu --out bench_output

# Two distributions from this one repository: surfaceinspect (everything, with torch) and
# surfaceinspect-runtime (scoring exported models only, no torch). A second distribution and not an
# extra because extras can only add dependencies: see packaging/runtime/build_runtime.py.
dist: $(STAMP)  ## build surfaceinspect (wheel + sdist) and surfaceinspect-runtime (torch-free scoring: wheel + sdist) into dist/ (docs/deploy.md)
	$(BIN)/python -m build --outdir dist .
	$(BIN)/python packaging/runtime/build_runtime.py --outdir dist

dist-check: $(STAMP)  ## build, install the wheel into a fresh venv, run it there (a few minutes; not part of `make test`)
	PYTHON=$(BIN)/python scripts/dist_check.sh

slim-check: $(STAMP)  ## build the runtime wheel, install it into a fresh venv (its dependencies from the index, ~100 MB; no torch), score there a model the full install trains (a minute or two)
	PYTHON=$(BIN)/python scripts/slim_check.sh

clean:
	rm -rf $(VENV) demo_output bench_output dist .pytest_cache .ruff_cache
