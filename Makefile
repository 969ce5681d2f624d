# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
# Test processes (pytest-xdist, one test file per process): the tests mostly wait on the embedded
# servers, so two processes halve the wall time on a 2-core machine. TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 2
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint typecheck unit bench clean services-up services-up-durable services-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/apexrank demo

lint: setup
	$(BIN)/ruff check ranker consumers indexes tests benchmarks
	$(BIN)/ruff format --check ranker consumers indexes tests benchmarks
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test: lint typecheck unit

services-up: setup
	$(BIN)/apexrank services up

services-up-durable: setup
	$(BIN)/apexrank services up --durable

services-down: setup
	$(BIN)/apexrank services down

clean:
	-$(BIN)/apexrank services down
	rm -rf .apexrank demo-out
