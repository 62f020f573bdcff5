# Every target that runs something first makes sure the environment exists, so a fresh clone needs
# nothing but `make demo` or `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
# The torch/torchvision pair whose wheels work together on our machines (README, "Quick start"):
# PyPI's x86_64 wheels are CUDA builds (~5.5 GB), also on CPU-only machines.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: help install data test test-fast demo lint format clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e ".[dev,slurm,diffusers,tensorboard]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install repae with its dev tools

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_MNIST)  ## install the demo dataset (Debian's dataset-fashion-mnist)

test: install data  ## run the test suite (CPU, tiny configs)
	$(PY) -m pytest -q tests

demo: install data  ## train REPA-E end to end on Fashion-MNIST (CPU, < 10 min)
	$(PY) -m repae.train experiment=demo

lint: install  ## ruff lint and format check
	$(VENV)/bin/ruff check repae tests scripts
	$(VENV)/bin/ruff format --check repae tests scripts

format: install  ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix repae tests scripts
	$(VENV)/bin/ruff format repae tests scripts

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) logs outputs multirun .pytest_cache
