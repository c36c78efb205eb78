# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it when that has not happened yet or pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.uniemo-installed
DEMO   ?= runs/demo-data

.PHONY: setup demo test lint clean-demo

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing uniemo and its dependencies into $(VENV) (first time: ~2 min) ..."
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

# The main job. Today: the data pipeline (synthetic emotion set -> WebDataset shards -> inspection).
demo: $(STAMP)
	$(BIN)/uniemo data synth --out $(DEMO)/synth --images 800 --size 64 --seed 0 --workers 2
	$(BIN)/uniemo data shards --source emoset --root $(DEMO)/synth --out $(DEMO)/shards --shard-size 100 --workers 2
	$(BIN)/uniemo data inspect $(DEMO)/shards

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check uniemo tests benchmarks

clean-demo:
	rm -rf $(DEMO)
