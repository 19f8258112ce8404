# gristmill — the two commands: `make demo` and `make test` (plus `make bench`).
# Everything installs itself: Debian packages (when root), uv, and the locked
# Python environment in .venv/.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
UV := python3 -m uv
STAMP := $(VENV)/.installed

.PHONY: help setup test lint typecheck protos protos-check demo bench clean

help:
	@echo "make demo   - run the whole pipeline end to end on a temporary data directory"
	@echo "make test   - lint (ruff), types (mypy --strict), proto checks, pytest"
	@echo "make bench  - benchmarks, printing ratios against baselines"
	@echo "make protos - regenerate clients/python/src/gristmill/v1 from protos/"

setup: $(STAMP)

$(STAMP): uv.lock pyproject.toml clients/python/pyproject.toml services/*/pyproject.toml scripts/install-system-deps.sh
	@scripts/install-system-deps.sh
	@python3 -m uv --version 2>/dev/null | grep -q "$(UV_VERSION)" || python3 -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) sync --frozen --all-packages
	@touch $@

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

protos: setup
	$(PY) scripts/gen_protos.py

protos-check: setup
	$(PY) scripts/gen_protos.py --check
	$(VENV)/bin/buf lint

test: lint typecheck protos-check
	$(VENV)/bin/pytest

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
