# Two commands do all the set-up (each creates .venv and installs what it needs):
#   make demo   run the worker on ./worker.db with demo jobs that visibly run
#   make test   lint, type-check and run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/worker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

demo: $(BIN)/worker
	$(BIN)/worker enqueue hello --data '{"name": "demo"}'
	$(BIN)/worker enqueue flaky --data '{"fail_times": 1}'
	$(BIN)/worker enqueue sleep --data '{"seconds": 2}' --delay 3
	$(BIN)/worker run

lint: $(BIN)/worker
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The Node client's compile runs in the background from the start (see .ci/node-client.sh).
test:
	bash .ci/node-client.sh > clients/node/install.log 2>&1 &
	$(MAKE) lint
	bash .ci/system-packages.sh
	$(BIN)/pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
