# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it when that has not happened yet or pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.uniemo-installed

.PHONY: setup demo test lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing uniemo and its dependencies into $(VENV) (first time: ~3 min) ..."
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,cloud]"
	@touch $(STAMP)

setup: $(STAMP)

# The main job: the whole UniEmo loop on the CPU (data, stage 1, stage 2, feedback, judge, evaluation, report)
# into runs/demo/, ending with the report's path. Run again, it continues an interrupted demo (or does nothing).
demo: $(STAMP)
	$(BIN)/uniemo run --config configs/demo.yaml --resume

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff over the code, and mypy (settings in pyproject.toml) over the package.
lint: $(STAMP)
	$(BIN)/ruff check uniemo tests benchmarks
	$(BIN)/mypy uniemo

clean-demo:
	rm -rf runs/demo
