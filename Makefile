# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# uv is installed into .tools/ when it is not on PATH; dependencies come from the hash-pinned lock files.

PYTHON ?= python3
VENV   := .venv
TOOLS  := .tools
UV     := $(or $(shell command -v uv 2>/dev/null),$(TOOLS)/bin/uv)
export VIRTUAL_ENV := $(abspath $(VENV))
BIN    := $(VENV)/bin

.PHONY: install demo test lint typecheck pytest lock ensure-postgres ensure-redis ensure-chromium clean validate-deploy deploy-tools deploy-sync bench

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv

# The project itself is built with the hash-pinned build tools too (no unpinned build isolation).
$(BIN)/.installed: requirements/dev.txt requirements/build.txt pyproject.toml | $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip sync --quiet --require-hashes requirements/dev.txt
	$(UV) pip install --quiet --require-hashes -r requirements/build.txt
	$(UV) pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/gateway demo

test: install ensure-postgres ensure-redis ensure-chromium lint typecheck validate-deploy pytest

lint: install
	$(BIN)/ruff check app tests bench scripts
	$(BIN)/ruff format --check app tests bench scripts

typecheck: install
	$(BIN)/mypy app

# deploy-tools: tests/deploy/test_alerts_live.py runs the alert rules in a real Prometheus from .tools/bin.
pytest: install deploy-tools
	$(BIN)/pytest

ensure-postgres:
	@scripts/ensure-postgres.sh

# Deployment files (Dockerfile, compose, Kubernetes, alert rules, dashboard) through their real validators, offline.
validate-deploy: install deploy-tools
	$(BIN)/python -m scripts.validate_deploy

deploy-tools:
	@scripts/install-promtool.sh $(TOOLS)/bin

# Regenerate the Kubernetes copies of the alert rules and the dashboard after editing deploy/prometheus or deploy/grafana.
deploy-sync: install
	$(BIN)/python -m scripts.deploy_sync

ensure-redis:
	@scripts/ensure-redis.sh

# The /docs browser test needs a headless Chromium: Debian's package, installed when missing.
ensure-chromium:
	@scripts/install-chromium.sh

# The benchmark harness (docs/benchmarks.md): `make bench` for the full run, `make bench BENCH=--quick` for one
# about 5 minutes. Installs wrk and nginx with apt-get when they are missing.
bench: install
	$(BIN)/python -m bench $(BENCH)

# Re-pin after editing pyproject.toml. Hashes only: no index URL or download address is recorded.
lock: | $(UV)
	$(UV) pip compile --quiet --generate-hashes --python-version 3.11 pyproject.toml -o requirements/runtime.txt
	$(UV) pip compile --quiet --generate-hashes --python-version 3.11 --extra dev pyproject.toml -o requirements/dev.txt
	$(UV) pip compile --quiet --generate-hashes --python-version 3.11 requirements/build.in -o requirements/build.txt

clean:
	rm -rf $(VENV) $(TOOLS) .mypy_cache .ruff_cache .pytest_cache
