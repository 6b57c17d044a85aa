# Every target creates/updates the virtual environment itself when setup.cfg changes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glauber-installed
PYTHON ?= python3

.PHONY: venv test test-all lint demo demo-images compare bench bench-gpu eval-ppl eval-fid train-owt train-owt-small train-celeba train-ffhq train-vq slurm-owt slurm-celeba clean

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

demo-images: $(STAMP)  ## VQ tokenizer + GGM on the bundled emoji (CPU): samples, infilling, FID -> runs/emoji/report.md
	$(VENV)/bin/glauber image-demo --out runs/emoji $(ARGS)

compare: $(STAMP)  ## GGM (paper's and weighted loss) vs GGM-CE vs MDLM vs AR on tiny Shakespeare at 300/1,000/3,000 steps (CPU, ~1 h) -> runs/compare/results.md
	$(VENV)/bin/glauber compare --out runs/compare --budgets 300,1000,3000 $(ARGS)

train-vq: $(STAMP)  ## train a VQ image tokenizer: make train-vq CONFIG=experiments/vq_emoji.yaml
	$(VENV)/bin/glauber train-vq $(or $(CONFIG),experiments/vq_emoji.yaml) $(ARGS)

train-celeba: $(STAMP)  ## the paper's CelebA-HQ 256 setting (needs the images and the ImageNet VQGAN, see README)
	$(VENV)/bin/glauber train experiments/celeba_hq.yaml $(ARGS)

train-ffhq: $(STAMP)  ## the paper's FFHQ 256 setting
	$(VENV)/bin/glauber train experiments/ffhq.yaml $(ARGS)

eval-fid: $(STAMP)  ## FID of a checkpoint's samples: make eval-fid CKPT=... ARGS="--reference data/celeba_hq --num-samples 10000"
	@test -n "$(CKPT)$(ARGS)" || { echo "usage: make eval-fid CKPT=path/to/last.ckpt ARGS='--reference DIR_OR_STATS [--num-samples N]'"; exit 2; }
	$(VENV)/bin/glauber eval-fid $(if $(CKPT),--checkpoint $(CKPT)) $(ARGS)

NODES ?= 1
GPUS ?= 8

slurm-owt: $(STAMP)  ## OpenWebText on SLURM: make slurm-owt NODES=4 GPUS=8 [SLURM_ARGS="--partition gpu --time 48:00:00"] [ARGS=overrides]
	$(VENV)/bin/glauber slurm --nodes $(NODES) --gpus-per-node $(GPUS) $(SLURM_ARGS) experiments/owt.yaml $(ARGS)

slurm-celeba: $(STAMP)  ## CelebA-HQ on SLURM: make slurm-celeba NODES=2 GPUS=8 [SLURM_ARGS=...] [ARGS=overrides]
	$(VENV)/bin/glauber slurm --nodes $(NODES) --gpus-per-node $(GPUS) $(SLURM_ARGS) experiments/celeba_hq.yaml $(ARGS)

train-owt: $(STAMP)  ## the paper's OpenWebText setting (medium) on all local GPUs
	$(VENV)/bin/glauber train experiments/owt.yaml $(ARGS)

train-owt-small: $(STAMP)  ## OpenWebText with the DDiT-small backbone
	$(VENV)/bin/glauber train experiments/owt_small.yaml $(ARGS)

eval-ppl: $(STAMP)  ## generative perplexity of a checkpoint: make eval-ppl CKPT=runs/x/checkpoints/last.ckpt ARGS="--judge gpt2-large"
	@test -n "$(CKPT)" || { echo "usage: make eval-ppl CKPT=path/to/last.ckpt [ARGS='--judge gpt2-large --num-samples 256']"; exit 2; }
	$(VENV)/bin/glauber eval-ppl $(CKPT) $(ARGS)

bench: $(STAMP)  ## benchmarks (docs/BENCHMARKS.md): make bench ARGS="--suite throughput|overhead|sampling|memory|gpu ..."
	$(VENV)/bin/glauber bench $(ARGS)

bench-gpu: $(STAMP)  ## GPU report vs speed of light -> runs/bench-gpu/bench_gpu.{json,md}; without a GPU (or TINY=1) a tiny stand-in run
	$(VENV)/bin/glauber bench --suite gpu --out $(or $(OUT),runs/bench-gpu) $(if $(TINY),--tiny) $(ARGS)

lint: $(STAMP)  ## ruff, and the layer contract (pyproject.toml [tool.importlinter]): lower layers never import higher ones
	$(VENV)/bin/ruff check src data_modules tests
	$(VENV)/bin/lint-imports

clean:
	rm -rf runs/demo runs/emoji runs/compare .pytest_cache .ruff_cache
