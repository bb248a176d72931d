# Two commands: `make study` runs the main job, `make test` the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/default.yaml
WORKERS ?= 1
PORT ?= 5000
TRACKING_URI ?= sqlite:///mlflow.db
PYTEST_ARGS ?=

# offline at run time: no hub lookups, no telemetry
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow study ui clean-cache

# Idempotent: creates .venv if missing and reinstalls only when pyproject.toml changed.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

study: setup
	$(BIN)/harness study $(STUDY) --workers $(WORKERS)

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT) --workers 1

clean-cache:
	rm -rf .cache/harness
