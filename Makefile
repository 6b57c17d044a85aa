# Every target creates/updates the virtual environment itself when setup.cfg changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glauber-installed
PYTHON ?= python3

.PHONY: venv test test-all lint demo bench eval-ppl train-owt train-owt-small clean

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,fid]'
	@touch $(STAMP)

venv: $(STAMP)  ## create/update the virtual environment

test: $(STAMP)  ## the test suite (CI runs exactly this)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## the test suite including slow tests
	$(PY) -m pytest -q -m ""

demo: $(STAMP)  ## train on bundled tiny Shakespeare (CPU, ~10 min) -> runs/demo/report.md
	$(VENV)/bin/glauber demo --out runs/demo

train-owt: $(STAMP)  ## the paper's OpenWebText setting (medium) on all local GPUs
	$(VENV)/bin/glauber train experiments/owt.yaml $(ARGS)

train-owt-small: $(STAMP)  ## OpenWebText with the DDiT-small backbone
	$(VENV)/bin/glauber train experiments/owt_small.yaml $(ARGS)

eval-ppl: $(STAMP)  ## generative perplexity of a checkpoint: make eval-ppl CKPT=runs/x/checkpoints/last.ckpt ARGS="--judge gpt2-large"
	@test -n "$(CKPT)" || { echo "usage: make eval-ppl CKPT=path/to/last.ckpt [ARGS='--judge gpt2-large --num-samples 256']"; exit 2; }
	$(VENV)/bin/glauber eval-ppl $(CKPT) $(ARGS)

bench: $(STAMP)  ## speed benchmark (see docs/BENCHMARKS.md); e.g. make bench ARGS="--size small"
	$(VENV)/bin/glauber bench $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src data_modules tests

clean:
	rm -rf runs/demo .pytest_cache .ruff_cache
