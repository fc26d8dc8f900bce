# Everything a fresh machine needs: `make run` (the whole pipeline through Airflow on the
# embedded tiny-cpu default) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Pip finds the CPU torch wheel in /opt/wheels on our machines; elsewhere from PyTorch's CPU index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv run test test-fast lint ui clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-lock.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c requirements-lock.txt -r requirements.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: venv
	$(BIN)/python -m rlhf_tasks.local run

test: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not e2e"

lint: venv
	$(BIN)/ruff check rlhf_tasks dags tests

ui: venv
	$(BIN)/python -m rlhf_tasks.local ui

clean:
	rm -rf .rlhf
