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
SPLIT_FILE ?=
PRESET ?= tiny
RUN ?= runs/demo
STORE ?= $(RUN)/store.zarr
VAL_STORE ?= $(RUN)/val.zarr
STAGE ?= all
ARGS ?=

.PHONY: install test test-fast format demo experiment cache pca train rollout predict evaluate bench info lint clean gpu-check

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

# the quick lane while you work (no Ray clusters, torchrun or overfitting runs), one pytest-xdist
# worker per core (its tests share no session state); CI runs `make test`, serially: one Ray start
test-fast: install
	$(PY) -m pytest -m "not slow" -n auto

lint: install
	$(PY) -m ruff check pipeline model inference jobs tests
	$(PY) -m ruff format --check pipeline model inference jobs tests

format: install
	$(PY) -m ruff format pipeline model inference jobs tests

cache: install
	$(PY) -m jobs.cache --preset $(PRESET) --dataset $(DATASET) --split $(SPLIT) --out $(STORE) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
		$(if $(SPLIT_FILE),--source-options '{"split_file": "$(SPLIT_FILE)"}') $(ARGS)

info: install
	$(PY) -m jobs.store info $(STORE)

clean:
	rm -rf runs/demo

bench: install
	$(PY) -m jobs.bench all $(ARGS)

# what the paper's sizes cost on this GPU, one JSON line per check (<= 8 min; a tiny CPU mode without CUDA)
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py $(ARGS)

# STAGE=1|2|baseline|all (all: Stage 1 -> rollout -> Stage 2 -> Baseline); reruns continue the run in $(RUN)/train
train: install
	$(PY) -m jobs.train --preset $(PRESET) --stage $(STAGE) --store $(STORE) --run-dir $(RUN)/train \
		$(if $(wildcard $(VAL_STORE)),--val-store $(VAL_STORE)) --resume $(ARGS)

rollout: install
	$(PY) -m jobs.rollout --preset $(PRESET) --checkpoint $(RUN)/train/stage1 --store $(STORE) $(ARGS)

# the whole product on the built-in synthetic set, tiny models, CPU
demo: install
	$(PY) -m jobs.demo --run runs/demo $(ARGS)

# the paper's ablations at CPU scale (about 30 min, 2 seeds; ARGS=--quick: under 3 min): runs/experiment/report.md
experiment: install
	$(PY) -m jobs.experiment $(ARGS)

# see the future of one clip (or ARGS="--video drive.mp4"): PNG grid + mp4 under $(RUN)/predict
predict: install
	$(PY) -m jobs.predict --preset $(PRESET) --store $(VAL_STORE) --stage1 $(RUN)/train/stage1 \
		--stage2 $(RUN)/train/stage2 --baseline $(RUN)/train/baseline --out $(RUN)/predict $(ARGS)

# Re2Pix vs Baseline on the validation store: table on screen, JSON in $(RUN)/eval/results.json
evaluate: install
	$(PY) -m jobs.evaluate --preset $(PRESET) --store $(VAL_STORE) --stage1 $(RUN)/train/stage1 \
		--stage2 $(RUN)/train/stage2 --baseline $(RUN)/train/baseline --out $(RUN)/eval/results.json $(ARGS)

# a PCA basis on its own, to share: teams caching with `ARGS="--pca $(RUN)/basis.zarr"` get compatible stores
pca: install
	$(PY) -m jobs.pca --preset $(PRESET) --dataset $(DATASET) --split $(SPLIT) --out $(RUN)/basis.zarr \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)
