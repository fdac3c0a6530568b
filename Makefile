# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test format demo notebook clean gpu-check

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

# Deviceless GPU compile check (no GPU needed): the CUDA build of JAX in its own venv, then the
# paper pair's train step compiled for an H100 (experiments/gpu_compile.py; README: the full run).
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed
GPU_CHECK_ARGS ?= --programs=capacity,dropless --meshes=1,8fsdp

$(GPU_STAMP): pyproject.toml constraints.txt
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet -c constraints.txt -e ".[train,gpu]"
	touch $(GPU_STAMP)

gpu-check: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m experiments.gpu_compile --check $(GPU_CHECK_ARGS)

demo: $(STAMP)
	$(BIN)/python -m coe_jax.main --config=configs/demo.py --workdir=runs/demo

notebook: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_notebook.py

clean:
	rm -rf runs .pytest_cache
