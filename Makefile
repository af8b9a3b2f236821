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
	# every extra (sim, train, minari): the robot side alone is `pip install .`
	$(BIN)/pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

# The main job: the control loop end to end. A node serves the shipped actor to a realtime
# MuJoCo bridge and logs every transition; the continual trainer retrains from the log, gates the
# candidate on an evaluation, and deploys it into the running node. Prints the summary.
demo: $(STAMP)
	$(BIN)/ddpg launch launch.yaml --duration 90 --continual --summary-json $(DEMO_DIR)/summary.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[all,dev,bench]"
	$(BIN)/python benchmarks/train_throughput.py

clean-venv:
	rm -rf $(VENV)
