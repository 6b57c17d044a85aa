# Every target creates/updates the virtual environment itself when setup.cfg changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glauber-installed
PYTHON ?= python3

.PHONY: venv test test-all lint demo bench train-owt train-owt-small train-celeba eval-fid clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create/update the virtual environment

test: $(STAMP)  ## the test suite (CI runs exactly this)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the test suite including slow tests
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src data_modules tests

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
