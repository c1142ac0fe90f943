# `make run`: set up and serve on the embedded defaults. `make test`: set up, lint, type-check and test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test lint default-adapter

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU build here; unpinned, pip would fetch the CUDA one
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/kplug model fetch

run: setup
	$(VENV)/bin/kplug serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(VENV)/bin/pytest -q

# Rebuild the shipped default adapter (seeded; see README, "Method").
default-adapter: setup
	$(VENV)/bin/kplug fit --data ../shared/data/squad-v1.1-dev-articles-00-35.json --articles 0-23 \
		--examples qa+reading --max-len 512 --out adapters/default --half
	$(VENV)/bin/kplug fit-writer --data ../shared/data/squad-v1.1-dev-articles-00-35.json --articles 0-19 \
		--adapter adapters/default --steps 120
