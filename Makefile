# ChittyCan. `make run` starts the gateway on an embedded default; `make test` runs the suite;
# `make test-unit` runs the unit tests alone, without services.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PORT ?= 8080

.PHONY: help install install-dev run test test-unit lint fmt typecheck check bench bench-routing bench-cache clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

$(VENV)/.installed: requirements/base.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/base.txt
	$(PIP) install -q --no-deps -e .
	$(PY) scripts/fetch_tokenizers.py
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements/dev.txt
	$(PIP) install -q -r requirements/dev.txt
	bash scripts/install_anthropic_legacy.sh
	bash scripts/install_openai_legacy.sh
	touch $@

install: $(VENV)/.installed ## create the virtualenv, install the gateway, collect the admin's static files
	$(PY) manage.py collectstatic --no-input -v 0

install-dev: $(VENV)/.installed-dev ## install what the tests and linters need

run: install ## run the gateway on 127.0.0.1:$(PORT): SQLite, in-process cache, offline mock model
	CHITTYCAN_MODE=$${CHITTYCAN_MODE:-dev} CHITTYCAN_ADMIN_REQUIRE_OTP=$${CHITTYCAN_ADMIN_REQUIRE_OTP:-false} \
	  $(PY) manage.py migrate --no-input -v 0
	CHITTYCAN_MODE=$${CHITTYCAN_MODE:-dev} $(PY) manage.py quickstart --port $(PORT)
	@echo "The can CLI is $(VENV)/bin/can, as the README and docs/ write it (no PATH change needed);"
	@echo "for a bare 'can' in your shell: source $(VENV)/bin/activate (or: export PATH=\$$PWD/$(VENV)/bin:\$$PATH)"
	@echo
	CHITTYCAN_MODE=$${CHITTYCAN_MODE:-dev} CHITTYCAN_ADMIN_REQUIRE_OTP=$${CHITTYCAN_ADMIN_REQUIRE_OTP:-false} \
	  $(VENV)/bin/can serve --port $(PORT)

test: install-dev ## run the whole suite against PostgreSQL and Redis (started if down)
	bash scripts/test.sh

test-unit: install-dev ## run only tests/unit/ (pure functions): no PostgreSQL, Redis or server, seconds
	env -u DATABASE_URL -u REDIS_URL PYTHONDONTWRITEBYTECODE=1 $(VENV)/bin/pytest tests/unit

lint: install-dev ## ruff, formatting, mypy, import contracts, Django checks
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

fmt: install-dev ## format and fix what ruff can
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install-dev ## benchmark the gateway against a pass-through ceiling; BASELINE=REF adds an older commit
	bash scripts/bench.sh $(if $(BASELINE),--baseline '$(BASELINE)') $(BENCH_ARGS)

bench-routing: install-dev ## the roadmap's routing policy on 1,000 prompts: cheap-model share, cost, evaluation time per request
	$(PY) -m bench.routing $(BENCH_ARGS)

bench-cache: install-dev ## the roadmap's cache demo: 1,000 identical requests, cache off vs on, 10 rounds (BENCH_CACHE_ARGS)
	bash -c 'source scripts/services.sh && ensure_services bench-cache' && $(PY) scripts/bench_cache.py $(BENCH_CACHE_ARGS)

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) var
