# Trainer integrations (verl plugin, TRL hook): a separate venv, because verl and TRL move
# transformers under the main venv's sentence-transformers. Include this file at the END of the
# Makefile (it uses PYTHON, TORCH_PIN, CONSTRAINTS, OFFLINE, STAMP and the `redis` target there).
#
#   make trainers-venv   build .venv-trainers: the client with its [verl,trl] extras
#                        torch (CPU wheel) first, then the client, pytest, ray and scikit-learn
#                        under the torch pin (stamp keyed on the inputs)
#   make test-trainers   tests/integrations in .venv-trainers against the real proxmo-server
#                        .venv-trainers/bin/pytest; the tests start the server from .venv

TRAINERS_VENV ?= .venv-trainers
TRAINERS_PY := $(TRAINERS_VENV)/bin/python
TRAINERS_KEY := $(shell cat clients/python/pyproject.toml $(CONSTRAINTS) mk/trainers.mk \
	| sha256sum | cut -c1-16)
TRAINERS_STAMP := $(TRAINERS_VENV)/.proxmo-trainers-$(TRAINERS_KEY)
TRAINERS_TESTS ?= tests/integrations
# Test-only: a real local Ray for the verl-agent fork's TaskRunner test (test_verl_fork.py), and
# scikit-learn for its stand-in of the fork's in-process TF-IDF soft grouping.
TRAINERS_TEST_PACKAGES := ray scikit-learn

.PHONY: trainers-venv test-trainers

trainers-venv: $(TRAINERS_STAMP)

$(TRAINERS_STAMP):
	@test -x $(TRAINERS_PY) || $(PYTHON) -m venv $(TRAINERS_VENV)
	$(TRAINERS_PY) -m pip install --quiet $(TORCH_PIN)
	$(TRAINERS_PY) -m pip install --quiet -c $(CONSTRAINTS) -e 'clients/python[verl,trl]' \
		pytest pytest-timeout $(TRAINERS_TEST_PACKAGES)
	@$(TRAINERS_PY) -c 'import torch; v = torch.__version__; \
		assert v.startswith("2.13.0"), f"torch moved to {v}"'
	@rm -f $(TRAINERS_VENV)/.proxmo-trainers-*
	@touch $@

test-trainers: $(TRAINERS_STAMP) $(STAMP) redis
	$(OFFLINE) TRL_EXPERIMENTAL_SILENCE=1 $(TRAINERS_VENV)/bin/pytest $(TRAINERS_TESTS) $(PYTEST_ARGS)

# `make test` runs the trainer integrations first (their own venv), then the main suite.
test: test-trainers
