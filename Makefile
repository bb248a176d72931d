# Two commands: `make study` runs the main job, `make test` the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/default.yaml
WORKERS ?= 1
PORT ?= 5000
TRACKING_URI ?= sqlite:///mlflow.db
PYTEST_ARGS ?=

# Scale-out (docs/scaling.md): STORAGE and TRACKING_URI, when given on the command line or in the
# environment, override the study file's `storage:` and `tracking_uri:` for `make study` and `make worker`.
STORAGE ?=
STUDY_OVERRIDES := $(if $(STORAGE),'storage=$(STORAGE)') \
	$(if $(filter command line environment,$(origin TRACKING_URI)),'tracking_uri=$(TRACKING_URI)')

# Local PostgreSQL (scripts/postgres.sh): 127.0.0.1:PGPORT, data under .cache/postgres, used by the
# postgres tests and as the default backend store of `make server`.
PGPORT ?= 55432
HARNESS_TEST_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:$(PGPORT)/harness_test
SERVER_BACKEND_URI ?= postgresql://postgres@127.0.0.1:$(PGPORT)/mlflow
ARTIFACT_ROOT ?= ./mlartifacts-server
export PGPORT
export HARNESS_TEST_POSTGRES_URL

# offline at run time: no hub lookups, no telemetry
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow study worker server ui tables postgres-start postgres-stop clean-cache

# Idempotent: creates .venv if missing and reinstalls only when pyproject.toml changed.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Starts PostgreSQL for the postgres tests (they skip, naming the error, when it cannot start), runs
# pytest, then stops the server if this target started it; the exit code is pytest's.
test: setup
	@pg_was_running=0; bash scripts/postgres.sh status >/dev/null 2>&1 && pg_was_running=1; \
	bash scripts/postgres.sh start || echo "make test: PostgreSQL did not start; the postgres tests will skip" >&2; \
	status=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || status=$$?; \
	if [ $$pg_was_running = 0 ]; then bash scripts/postgres.sh stop; fi; \
	exit $$status

test-slow: setup
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

study: setup
	$(BIN)/harness study $(STUDY) $(STUDY_OVERRIDES) --workers $(WORKERS)

# One more worker on the study of STUDY in STORAGE, from any machine that reaches the storage.
worker: setup
	$(BIN)/harness study $(STUDY) $(STUDY_OVERRIDES) --worker

# MLflow tracking server on 127.0.0.1:PORT for workers on this machine (MLFLOW_TRACKING_URI=http://127.0.0.1:PORT).
# Runs and params go to SERVER_BACKEND_URI, artifacts through the server to ARTIFACT_ROOT. MLflow's
# background job runner (used by its GenAI features, not by this harness) stays off.
server: setup $(if $(filter file,$(origin SERVER_BACKEND_URI)),postgres-start)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(BIN)/mlflow server --backend-store-uri '$(SERVER_BACKEND_URI)' \
		--serve-artifacts --artifacts-destination '$(ARTIFACT_ROOT)' --host 127.0.0.1 --port $(PORT) --workers 1

# Tables and figures of a finished study into results/<name>/. STUDY may be a study file or a study
# name (make tables STUDY=paper); several names separated by commas pool their runs.
tables: setup
	$(if $(filter command line environment,$(origin TRACKING_URI)),MLFLOW_TRACKING_URI='$(TRACKING_URI)') \
		$(BIN)/harness tables --study '$(basename $(notdir $(STUDY)))'

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT) --workers 1

postgres-start:
	bash scripts/postgres.sh start

postgres-stop:
	bash scripts/postgres.sh stop

clean-cache:
	rm -rf .cache/harness
