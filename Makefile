# gristmill — the two commands: `make demo` and `make test` (plus `make bench`).
# Everything installs itself: Debian packages (when root), uv, and the locked
# Python environment in .venv/.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
UV := python3 -m uv
STAMP := $(VENV)/.installed

.PHONY: help setup test lint typecheck protos protos-check demo bench clean k8s-render

help:
	@echo "make demo   - run the whole pipeline end to end on a temporary data directory"
	@echo "              (make demo STORAGE=ceph: on a throw-away local Ceph cluster)"
	@echo "make test   - lint (ruff), types (mypy --strict), proto checks, pytest"
	@echo "make bench  - benchmarks, printing ratios against baselines"
	@echo "make protos - regenerate clients/python/src/gristmill/v1 from protos/"
	@echo "make k8s-render OVERLAY=local|production - print the Kubernetes manifests (docs/deployment.md)"

setup: $(STAMP)

$(STAMP): uv.lock pyproject.toml clients/python/pyproject.toml services/*/pyproject.toml scripts/install-system-deps.sh scripts/system-packages.txt scripts/link-rados.sh
	@scripts/install-system-deps.sh
	@python3 -m uv --version 2>/dev/null | grep -q "$(UV_VERSION)" || python3 -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"
	$(UV) sync --frozen --all-packages
	@scripts/link-rados.sh $(VENV)
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

# STORAGE=ceph: the store on a throw-away local Ceph cluster (deploy/local/ceph-up)
demo: setup
	STORAGE=$(STORAGE) $(PY) scripts/demo.py

bench: setup
	$(PY) bench/run.py

OVERLAY ?= local
# the rendered multi-document YAML on stdout (kustomize's subset that deploy/k8s uses)
k8s-render: setup
	@$(PY) scripts/k8s_render.py deploy/k8s/overlays/$(OVERLAY)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
