# re2pix: `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

# what to cache and where
DATASET ?= synthetic
DATA_ROOT ?=
SPLIT ?= train
PRESET ?= tiny
RUN ?= runs/demo
STORE ?= $(RUN)/store.zarr
VAL_STORE ?= $(RUN)/val.zarr
STAGE ?= all
ARGS ?=

.PHONY: install test demo cache pca train rollout predict evaluate bench info lint clean

install: $(VENV)/.installed

# torch first (its CPU build here; set TORCH_VERSION / TORCH_INDEX for a CUDA one), then the project
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check pipeline model jobs tests

cache: install
	$(PY) -m jobs.cache --preset $(PRESET) --dataset $(DATASET) --split $(SPLIT) --out $(STORE) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)

info: install
	$(PY) -m jobs.store info $(STORE)

clean:
	rm -rf runs/demo
