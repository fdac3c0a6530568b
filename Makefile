# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test format demo notebook clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all]"
	touch $(STAMP)

venv: $(STAMP)

LINTED := coe_jax tests experiments configs

test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/python -m pytest -q tests

format: $(STAMP)
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

demo: $(STAMP)
	$(BIN)/python -m coe_jax.main --config=configs/demo.py --workdir=runs/demo

notebook: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_notebook.py

clean:
	rm -rf runs .pytest_cache
