# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv first. torch is pinned here, not in pyproject.toml, so that users keep
# loose ranges while this machine installs the build it has on disk.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-timm

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test,analysis]' $(TORCH_PINS)
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python train_scripts/demo.py

test: setup
	$(BIN)/python -m pytest

# timm's own tests/test_models.py on every image model (make test runs it on the smallest of each family)
test-timm: setup
	$(BIN)/python tools/run_timm_suite.py
