# TaskForge: `make dev` runs the whole stack locally, `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test bench chaos migrate services system-deps lint clean images images-test images-ci

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt -e .
	$(BIN)/python -m compileall -q -j 0 shared events functions infra taskforge bench/bare >/dev/null
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

## Run the test suite against the real PostgreSQL, Redis and RabbitMQ (the image tests
## need built images: `make images-ci` or `make images-test`).
test: $(STAMP) system-deps services
	$(BIN)/python -m pytest --ignore=tests/images $(PYTEST_ARGS)

## Benchmarks vs their baselines (BENCH=full for longer runs): bench/results/latest.{json,png}.
bench: $(STAMP) system-deps services
	bash infra/system-deps.sh --bench
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench $(if $(BENCH),--mode $(BENCH),)

## The full reliability run (`make test` runs its short form); prints the chaos report.
chaos: $(STAMP) system-deps services
	$(BIN)/python -m pytest tests/reliability --chaos=full $(PYTEST_ARGS)

## Build the function images (FUNCTIONS=resize-image,generate-pdf for some; ENGINE=podman|docker).
images: $(STAMP)
	$(BIN)/python -m infra.images.build $(if $(FUNCTIONS),--functions $(FUNCTIONS),) $(if $(ENGINE),--engine $(ENGINE),)

## Build every image, then run the image contract and container tests against all of them.
images-test: images services
	TASKFORGE_IMAGES_ALL=1 $(BIN)/python -m pytest tests/images $(PYTEST_ARGS)

## CI's share: build the resize-image and generate-pdf images, run the image tests on them.
images-ci: $(STAMP) services
	$(MAKE) images FUNCTIONS=resize-image,generate-pdf
	$(BIN)/python -m pytest tests/images $(PYTEST_ARGS)

## Static checks: ruff (style, imports, bugbear) and mypy (every product def typed).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache
