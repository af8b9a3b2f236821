# Two entry points for a fresh machine: `make demo` (the main job end to end) and `make test`.
# Both create and reuse a local virtual environment in .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl

DEMO_DIR ?= runs/demo

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel here; an unpinned torch would pull CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job: train Pendulum-v1 with the default preset (which exports actor.onnx), then
# evaluate the exported actor with onnxruntime on the trainer's evaluation seeds.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(BIN)/ddpg train --env Pendulum-v1 --steps 20000 --seed 0 --out $(DEMO_DIR)
	@echo "trainer's evaluation: $(DEMO_DIR)/eval.json; the exported actor, evaluated without torch:"
	$(BIN)/ddpg eval $(DEMO_DIR)/actor.onnx

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
