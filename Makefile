# The two commands of the README: `make run` and `make test`. Everything else supports them.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
RECEIVER_PORT ?= 8001
# The demo's receiver (run by demo_traffic) plays every demo institution's endpoint on loopback: only
# the demo's hub may deliver there. Production keeps the default (off).
DEMO_ENV := HUB_ALLOW_PRIVATE_ENDPOINTS=1

.PHONY: run test lint types bench-intake bench-ledger bench-books bench-wallet bench-pipeline bench-redeem clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

## Set up, migrate, load demo institutions, start the hub and push signed demo traffic through it.
run: $(VENV)/.installed
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo_setup --receiver-url http://$(HOST):$(RECEIVER_PORT)
	@$(DEMO_ENV) $(PY) manage.py runserver $(HOST):$(PORT) --noreload --skip-checks & \
	  hub=$$!; trap 'kill $$hub 2>/dev/null' EXIT INT TERM; \
	  $(DEMO_ENV) $(PY) manage.py demo_traffic --url http://$(HOST):$(PORT) --wait 60 || exit 1; \
	  echo ""; \
	  echo "The hub is running at http://$(HOST):$(PORT)/ (admin /admin/, API docs /api/v1/docs/). Ctrl-C stops it."; \
	  wait $$hub

## Install the dev tools and run the whole suite (PostgreSQL and Redis when reachable, else SQLite).
test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: $(VENV)/.installed-dev
	$(VENV)/bin/mypy .

bench-intake: $(VENV)/.installed-dev
	$(PY) bench/intake.py

bench-ledger: $(VENV)/.installed-dev
	$(PY) bench/ledger_post.py

## Crediting into the books against django-hordak (installed here for the benchmark only, not a dependency).
bench-books: $(VENV)/.installed-dev
	$(PY) -m pip install --quiet 'django-hordak==2.0.0'
	$(PY) bench/books.py

bench-wallet: $(VENV)/.installed-dev
	$(PY) bench/wallet.py

bench-pipeline: $(VENV)/.installed-dev
	$(PY) bench/pipeline.py

bench-redeem: $(VENV)/.installed-dev
	$(PY) bench/redeem.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
