# Everything a fresh machine needs: `make run` (the whole pipeline through Airflow on the
# embedded tiny-cpu default) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pip finds the CPU torch wheel in /opt/wheels on our machines; elsewhere from PyTorch's CPU index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv run test test-fast lint ui serve clean system-deps

venv: $(STAMP)

$(STAMP): requirements.txt requirements-lock.txt requirements-nodeps.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c requirements-lock.txt -r requirements.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: venv
	$(BIN)/python -m rlhf_tasks.pipeline.local run

# The end-to-end tests drive Debian's chromium and validate docker-compose.yml with Debian's
# docker-compose; PostgreSQL and Redis must be running on loopback (see docs/production.md).
system-deps:
	@missing=""; for p in chromium docker-compose; do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note:$$missing not installed: the browser/compose tests will be skipped"; fi; \
	fi

# Two pytest-xdist workers: much of the suite waits (Airflow scheduling, servers, a browser)
# while the other half computes. Tests sharing a trained run or the topology stay on one
# worker (tests/conftest.py: GROUP_FILES); TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2

test: venv system-deps
	$(BIN)/python -m pytest -q --durations=25 -n $(TEST_WORKERS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: venv
	$(BIN)/ruff check rlhf_tasks dags tests

# The Airflow and MLflow UIs on loopback, on the state of `make run`; Ctrl-C stops them.
# Other ports: make ui AIRFLOW_PORT=8081 MLFLOW_PORT=5001 (defaults 8080 and 5000). One line without
# shell syntax, so that make runs python itself (no shell between) and forwards its SIGTERM to it.
ui: venv
	$(BIN)/python -m rlhf_tasks.pipeline.local ui $(if $(AIRFLOW_PORT),--airflow-port $(AIRFLOW_PORT)) $(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT))

# MLflow's scoring server (`mlflow models serve`, loopback) on the champion of `make run`'s state;
# Ctrl-C stops it. Other port: make serve SERVE_PORT=5003 (default 5002).
serve: venv
	$(BIN)/python -m rlhf_tasks.pipeline.serve $(if $(SERVE_PORT),--port $(SERVE_PORT))

clean:
	rm -rf .rlhf
