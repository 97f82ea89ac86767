# The README's commands. Each target sets up what it needs: a fresh clone
# runs `make serve` or `make test` directly.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ADDRESS ?= 127.0.0.1:50051
STORE ?= ./weightsmith-data

.PHONY: venv serve test test-gpu stress lint protos bench demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## serve: start the server on ADDRESS with an embedded local store at STORE
serve: $(STAMP)
	$(BIN)/weightsmith-server --address $(ADDRESS) --store $(STORE) --metrics-address 127.0.0.1:9464

## test: lint, contract checks (buf lint, buf breaking against HEAD~1) and the test suite (GPU tests skip without a GPU)
test: lint
	$(BIN)/python -m pytest -m "not gpu" -q

## test-gpu: only the tests that need a visible GPU
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu -q

## stress: the long fault and load runs (crash loop with 30+ SIGKILLs, fuzzing, stalled streams); not in CI
stress: $(STAMP)
	WEIGHTSMITH_STRESS=1 $(BIN)/python -m pytest -m stress -q

## lint: ruff, buf lint, buf breaking against HEAD~1, and the generated sync client up to date
lint: $(STAMP)
	$(BIN)/ruff check .
	cd protos && ../$(BIN)/buf lint
	$(BIN)/python scripts/check_breaking.py
	$(BIN)/python scripts/unasync.py --check

## protos: regenerate the stubs and .pyi files in client/weightsmith/v1
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

## bench: every figure of docs/benchmarks.md (predict, edits, store, transfer, fine-tuning, memory, restart), each against its baseline; writes bench/results/*.json and the report
bench: $(STAMP)
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/edits.py
	$(BIN)/python bench/store.py
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/finetune.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/restart.py
	$(BIN)/python bench/report.py

## demo: run the quickstart example against a server started for the purpose
demo: $(STAMP)
	$(BIN)/python examples/quickstart.py --spawn-server

clean:
	rm -rf $(VENV) .pytest_cache
