# symram: two commands for a newcomer.
#   make run   set up (only what running needs), build the demo model, start the stack
#              (redis + vLLM/symram + gateway)
#   make test  set up (adding the browser the dashboard test drives) and run the suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SIZE ?= mid
MODEL_DIR ?= .symram/models/$(SIZE)
PORT ?= 8000

.PHONY: setup setup-test run serve test test-fast lint bench-ttft bench-codecs bench-directory bench-gateway model clean ab ab-smoke up

setup:
	@bash scripts/setup.sh

setup-test:
	@bash scripts/setup.sh --test

model: setup
	@$(VENV)/bin/symram demo-model $(MODEL_DIR) --size $(SIZE)

run: setup
	@$(VENV)/bin/symram up --size $(SIZE) --port $(PORT) $(UP_ARGS)

# One engine, no gateway or Redis: `symram serve` with the connector (the pre-gateway run).
serve: model
	@$(VENV)/bin/symram serve $(MODEL_DIR) --port $(PORT)

test: setup-test
	@bash scripts/test.sh

test-fast: setup
	@$(PY) -m pytest -q -m "not engine"

# ruff, then the import layers (pyproject.toml [tool.importlinter]; docs/architecture.md).
lint: setup
	@$(VENV)/bin/ruff check symram_vllm tests loadtest
	@$(VENV)/bin/lint-imports --no-cache

bench-ttft: setup
	@$(PY) -m loadtest.bench_ttft --arch $(or $(ARCH),llama) --tier $(or $(TIER),dram)

bench-codecs: setup
	@$(PY) -m loadtest.bench_codecs

bench-directory: setup
	@$(PY) -m loadtest.bench_directory

# TPOT at 64 concurrent decoding requests, embedded directory vs Redis behind a 2 ms
# round-trip proxy, and Redis commands per engine step at 8 vs 64 (two tiny engines,
# ~10 min); results in loadtest/results/directory_engine.json.
.PHONY: bench-directory-engine
bench-directory-engine: setup
	@nice -n 5 $(PY) -m loadtest.bench_directory_engine $(BENCH_ARGS)

# AES-256-GCM GB/s per core vs the disk tier's GB/s, and disk-hit TTFT with encryption on
# vs off (two mid engines, ~15 min); results in loadtest/results/encryption.json.
.PHONY: bench-encryption
bench-encryption: setup
	@nice -n 5 $(PY) -m loadtest.bench_encryption $(BENCH_ARGS)

# Latency the gateway adds over direct calls to a stub engine, and 1,000 concurrent
# streams through it (~1 min); results in loadtest/results/gateway.json.
bench-gateway: setup
	@$(PY) -m loadtest.bench_gateway $(BENCH_ARGS)

# Locust A/B: vanilla vLLM vs vLLM+symram (mid model, ~20-25 min on 2 cores); results
# in loadtest/results/ab.{json,md} and ab_*.png. ab-smoke: tiny model, ~3 min.
ab: setup
	@$(PY) -m loadtest.ab $(AB_ARGS)

ab-smoke: setup
	@$(PY) -m loadtest.ab --smoke $(AB_ARGS)

up: run

clean:
	rm -rf .symram test-artifacts

# Batched transfer path vs the same-run copy limit (no vLLM; ~2 min on CPU);
# loadtest/results/transfer_cpu.json. On a GPU host: BENCH_ARGS="--device cuda".
bench-transfer: setup
	@$(PY) -m loadtest.bench_transfer $(BENCH_ARGS)

# The GPU proof kit (scripts/gpu_check.sh) on CPU: what CI runs.
gpu-check-dry-run: setup
	@bash scripts/gpu_check.sh --dry-run
