# Fleetkeeper: `make run` starts the whole stack on SQLite, `make test` runs the whole suite.
# Every target installs what it needs first (Debian/Ubuntu packages with apt-get, Python packages into
# .venv, browser assets from the npm registry), and only what is missing.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.fleetkeeper-installed
NODE_STAMP := node_modules/.fleetkeeper-installed
HTMX := static/vendor/htmx.min.js
PYTEST_ARGS ?=
# Debian installs mosquitto and redis-server's tools partly under /usr/sbin, which is not on every user's PATH.
export PATH := $(PATH):/usr/sbin:/sbin

.DEFAULT_GOAL := help
.PHONY: help run run-cluster test soak bench lint format venv system-deps system-deps-test assets clean clean-state

help: ## Show this help
	@echo "Fleetkeeper: a security console for MQTT device fleets."
	@echo
	@echo "Quick start:  make run   (then open http://127.0.0.1:8000/)     make test"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

run: system-deps venv assets ## Install what is missing, migrate, create admin + demo fleet, start everything
	@bash scripts/run.sh || { rc=$$?; if [ $$rc -eq 130 ] || [ $$rc -eq 143 ]; then echo "Stopped."; else exit $$rc; fi; }

run-cluster: system-deps-cluster venv assets ## The same stack on a local two-node RabbitMQ cluster asking the console's hook
	@bash scripts/run.sh --cluster || { rc=$$?; if [ $$rc -eq 130 ] || [ $$rc -eq 143 ]; then echo "Stopped."; else exit $$rc; fi; }

test: system-deps-test venv assets ## Install what the tests need, check the import contracts, run the suite (but soak)
	$(VENV)/bin/lint-imports --no-cache
	@bash scripts/test.sh $(PYTEST_ARGS)

soak: system-deps-test venv assets ## The long soak and load tests (minutes each; make test runs a short version)
	$(VENV)/bin/pytest -q -ra -p no:xdist -m soak --durations=0 $(PYTEST_ARGS)

bench: system-deps venv ## Run the performance benchmarks (bench/)
	@if [ -f bench/__main__.py ]; then \
		$(VENV)/bin/python -m bench; \
	else \
		echo "No benchmarks yet: this checkout has no bench/__main__.py (the benchmarks are planned)." >&2; exit 1; \
	fi

lint: venv ## ruff check, ruff format --check, and the import contracts (pyproject.toml, [tool.importlinter])
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: venv ## Reformat the code with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

system-deps: ## Install missing Debian packages: Redis, Mosquitto, Node.js/npm
	@bash scripts/install-system-deps.sh

system-deps-cluster: ## ... plus RabbitMQ (make run-cluster)
	@bash scripts/install-system-deps.sh --cluster

system-deps-test: ## ... plus Debian's Chromium (browser tests) and RabbitMQ (the cluster adapter's tests)
	@bash scripts/install-system-deps.sh --test

venv: $(VENV_STAMP) ## Create .venv and install the Python dependencies (again only when pyproject.toml changed)

$(VENV_STAMP): pyproject.toml scripts/pyproject-requirements.py
	@test -x $(VENV)/bin/python || { echo "Creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(VENV)/bin/python scripts/pyproject-requirements.py test > $(VENV)/requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r $(VENV)/requirements.txt
	@touch $@

assets: $(HTMX) ## Install browser assets from the npm registry into static/vendor/

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(HTMX): $(NODE_STAMP)
	@mkdir -p static/vendor
	cp node_modules/htmx.org/dist/htmx.min.js $@

clean: ## Remove build products (collected static files, vendored assets, caches); keeps var/ and .venv
	rm -rf staticfiles static/vendor .pytest_cache .ruff_cache tests/artifacts
	find . -path ./.venv -prune -o -path ./node_modules -prune -o -name __pycache__ -type d -exec rm -rf {} +

clean-state: ## Delete var/ (database, secrets, Redis and Mosquitto state) after asking; YES=1 skips the question
	@if [ ! -e var ]; then echo "Nothing to delete: var/ does not exist."; exit 0; fi; \
	if [ "$(YES)" != "1" ]; then \
		if [ ! -t 0 ]; then echo "Refusing to delete var/ without a terminal to ask on; run: make clean-state YES=1" >&2; exit 1; fi; \
		read -r -p "Delete var/ (the SQLite database with every device, user and audit event, and the generated secrets)? [y/N] " answer; \
		case "$$answer" in [yY]|[yY][eE][sS]) ;; *) echo "Kept var/."; exit 0;; esac; \
	fi; \
	rm -rf var && echo "Deleted var/. The next \`make run\` starts from an empty database and prints a new admin password."
