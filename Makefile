# Quick start: `make run` (installs, starts everything) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FIXTURE := .data/fixture-model/config.json
# Wheels pip finds on this kind of machine's disk; elsewhere pip downloads them.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install run test test-fast lint typecheck fixture-model services services-down bench-intake bench-verdicts migrate clean chromium

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PINS)
	$(BIN)/pip install -e '.[dev,quantization]'
	touch $(STAMP)

fixture-model: $(FIXTURE)

$(FIXTURE): | $(STAMP)
	$(BIN)/moderation fixture-model build .data/fixture-model

# Without MODERATION_DATABASE_URL / MODERATION_REDIS_URL (or DATABASE_URL / REDIS_URL), start embedded servers.
# A URL that is set is used as it is; only the missing server is started. A server that fails to start stops
# the run, with its error shown.
run: install fixture-model
	@set -e; \
	exports="$$($(BIN)/python scripts/dev_services.py up --missing)"; \
	eval "$$exports"; \
	export MODERATION_DATABASE_URL="$${MODERATION_DATABASE_URL:-$$DATABASE_URL}"; \
	export MODERATION_REDIS_URL="$${MODERATION_REDIS_URL:-$$REDIS_URL}"; \
	$(BIN)/python scripts/devrun.py

services: install
	$(BIN)/python scripts/dev_services.py up

services-down: install
	$(BIN)/python scripts/dev_services.py down

migrate: install
	$(BIN)/moderation migrate

test: install fixture-model chromium
	$(BIN)/pytest

# The UI tests drive Debian's Chromium through Playwright (never `playwright install`); MODERATION_CHROMIUM
# names another Chromium (on a machine without apt, say). Not root: apt-get runs through sudo.
chromium:
	@if [ -n "$$MODERATION_CHROMIUM" ] || command -v chromium >/dev/null; then exit 0; fi; \
	sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	$$sudo apt-get update && $$sudo apt-get install -y chromium

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy moderation api workers

bench-intake: install
	$(BIN)/python bench/intake.py --workers 2 --duration 15 --rounds 3

bench-verdicts: install fixture-model
	$(BIN)/python bench/verdict_writes.py

clean:
	rm -rf .data/fixture-model .pytest_cache .mypy_cache .ruff_cache
