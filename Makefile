# surfaceinspect — set-up and everyday targets. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo lint format bench clean

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

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

bench: $(STAMP)  ## benchmark both methods (cpu profiles) on ../shared/data; writes bench_output/
	$(BIN)/python -m surfaceinspect benchmark ../shared/data/mtd ../shared/data/mvtec_bottle \
		--method draem --method csflow --profile cpu --out bench_output

clean:
	rm -rf $(VENV) demo_output bench_output .pytest_cache .ruff_cache
