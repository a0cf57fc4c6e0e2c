# TaskForge: `make dev` runs the whole stack locally, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test bench chaos migrate services system-deps lint clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt -e .
	touch $(STAMP)

services:
	bash infra/services.sh

system-deps:
	bash infra/system-deps.sh

migrate: $(STAMP) services
	$(BIN)/taskforge migrate

## Run the whole stack in the foreground (Ctrl-C stops it).
dev: $(STAMP) system-deps services
	$(BIN)/taskforge migrate
	$(BIN)/taskforge dev

## Run the test suite against the real PostgreSQL, Redis and RabbitMQ.
test: $(STAMP) system-deps services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Benchmarks vs their baselines (BENCH=full for longer runs): bench/results/latest.{json,png}.
bench: $(STAMP) system-deps services
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench $(if $(BENCH),--mode $(BENCH),)

## The full reliability run (`make test` runs its short form); prints the chaos report.
chaos: $(STAMP) system-deps services
	$(BIN)/python -m pytest tests/reliability --chaos=full $(PYTEST_ARGS)

## Static checks: ruff (style, imports, bugbear) and mypy (every product def typed).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
