# Two commands on a fresh machine: `make engine` and `make test`. Every target installs what it needs.
MODEL ?= tiny-qwen3
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements/constraints.txt | sha1sum | cut -c1-12)
ARGS ?=

.PHONY: setup engine test test-fast serve perf bench lint clean

setup: $(STAMP)

# torch goes in first and alone: an unpinned torch pulled in by another package means GBs of CUDA wheels.
$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[serve,kernel,eval,dev]"
	@bash scripts/install_system_deps.sh
	@rm -f $(VENV)/.installed-* && touch $@

engine: setup
	$(BIN)/python -m pipeline engine --model $(MODEL) $(ARGS)

serve: setup
	$(BIN)/python -m pipeline serve --model $(MODEL) $(ARGS)

perf: setup
	$(BIN)/python -m pipeline engine --model $(MODEL) --until perf --force perf $(ARGS)

bench: setup
	$(BIN)/python -m pipeline bench $(ARGS)

test: setup
	$(BIN)/python -m pytest -q -ra $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow and not server" $(ARGS)

lint: setup
	$(BIN)/ruff check pipeline plugins tests ci

clean:
	rm -rf build
