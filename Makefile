# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv first. torch is pinned here to the build this machine has on disk; pyproject.toml
# declares the same versions as its floors, the lowest that were run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# make test runs the `floor` tests a second time here: the floors of pyproject.toml's other dependencies,
# installed into their own environment, with torch and everything else reused from .venv
FLOOR_VENV := .venv-floor
# the files whose `floor` tests run there (the floors are the core's: the test and analysis extras are not in it)
FLOOR_TESTS := tests/test_packaging.py
FLOOR_PINS = $(shell $(BIN)/python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print(*(d.replace(">=", "==") for d in deps if not d.startswith("torch")))')

.PHONY: setup demo test test-floor test-timm

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test,analysis]' $(TORCH_PINS)
	touch $@

setup: $(BIN)/.installed

# The floors go in first, into an empty environment (timm without its dependencies, which would bring
# another torch); only then the .pth that appends .venv's packages, so that the floors shadow them.
$(FLOOR_VENV)/.installed: pyproject.toml $(BIN)/.installed
	rm -rf $(FLOOR_VENV)
	$(BIN)/python -m venv --without-pip $(FLOOR_VENV)
	$(BIN)/pip --python $(FLOOR_VENV)/bin/python install -q --no-deps $(filter timm==%,$(FLOOR_PINS))
	$(BIN)/pip --python $(FLOOR_VENV)/bin/python install -q $(filter-out timm==%,$(FLOOR_PINS))
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
		> $$($(FLOOR_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/zz_main_venv.pth
	touch $@

demo: setup
	$(BIN)/python train_scripts/demo.py

test: setup test-floor
	$(BIN)/python -m pytest

test-floor: $(FLOOR_VENV)/.installed
	TIMM_AIT_FLOOR_VENV=$(CURDIR)/$(FLOOR_VENV) $(FLOOR_VENV)/bin/python -m pytest -q -m floor $(FLOOR_TESTS)

# timm's own tests/test_models.py on every image model (make test runs it on the smallest of each family)
test-timm: setup
	$(BIN)/python tools/run_timm_suite.py
