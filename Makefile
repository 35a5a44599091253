# symram: two commands for a newcomer.
#   make run   set up, build the demo model, start vLLM + symram on embedded defaults
#   make test  set up and run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SIZE ?= mid
MODEL_DIR ?= .symram/models/$(SIZE)
PORT ?= 8000

.PHONY: setup run test test-fast lint bench-ttft model clean

setup:
	@bash scripts/setup.sh

model: setup
	@$(VENV)/bin/symram demo-model $(MODEL_DIR) --size $(SIZE)

run: model
	@$(VENV)/bin/symram serve $(MODEL_DIR) --port $(PORT)

test: setup
	@bash scripts/test.sh

test-fast: setup
	@$(PY) -m pytest -q -m "not engine"

lint: setup
	@$(VENV)/bin/ruff check symram_vllm tests loadtest

bench-ttft: setup
	@$(PY) -m loadtest.bench_ttft

clean:
	rm -rf .symram test-artifacts
