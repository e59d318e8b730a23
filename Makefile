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

.PHONY: help install test test-slow test-all format demo experiment cache pca train rollout predict evaluate bench info lint clean gpu-check smoke-paper

# `make help`: the targets and the variables they take
help:
	@echo "make install    the venv in $(VENV): torch $(TORCH_VERSION), then re2pix and its dev tools (5-10 min)"
	@echo "make demo       the whole product on the synthetic set, tiny models, CPU (runs/demo)"
	@echo "make cache      cache DATASET=$(DATASET) [DATA_ROOT=DIR] [SPLIT=$(SPLIT)] into STORE=$(STORE)"
	@echo "make train      STAGE=$(STAGE) (1|2|baseline|all) on STORE, run folder RUN=$(RUN)/train; reruns resume"
	@echo "make rollout    Stage 1's forecasts into STORE"
	@echo "make predict    a clip of VAL_STORE=$(VAL_STORE), or ARGS=\"--video drive.mp4\": PNG + mp4 in RUN/predict"
	@echo "make evaluate   Re2Pix vs Baseline on VAL_STORE (else the scenes training held out): RUN/eval/results.json"
	@echo "make pca        a PCA basis on its own (RUN/basis.zarr)"
	@echo "make smoke-paper  the paper-size models end to end on this machine (ARGS=--reduced: smaller frames)"
	@echo "make gpu-check  what the paper sizes cost on this GPU, one JSON line per check"
	@echo "make info       describe STORE;  make bench / experiment / test / test-slow / test-all / lint / format / clean"
	@echo "Every target takes PRESET=$(PRESET) (tiny|paper), RUN=$(RUN) and ARGS=\"...\" (the job's own flags:"
	@echo "python -m jobs.JOB --help; what to choose from: python -m jobs.list)."

install: $(VENV)/.installed

# torch first (its CPU build here; set TORCH_VERSION / TORCH_INDEX for a CUDA one), then the project
$(VENV)/.installed: pyproject.toml
	@echo "install: a virtual environment in $(VENV) ($(PYTHON))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "install: torch $(TORCH_VERSION) $(if $(TORCH_INDEX),from $(TORCH_INDEX),(CPU build)): about 1 GB, a few minutes"
	$(PY) -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@echo "install: re2pix (editable) with ray, zarr, transformers, diffusers and the dev tools: a few minutes"
	$(PY) -m pip install -e ".[dev]"
	@echo "install: done ($(VENV)); make help lists what to run next"
	touch $@

# what CI runs: every test not marked slow, one pytest-xdist worker per core (its tests share no
# session state), a few minutes with the install done; a test still running after 240 s (the slowest take
# ~20 s) has every thread's stack printed (faulthandler: even one stuck outside Python), and fails at 300 s
# (a signal in the test's own thread: the run goes on) instead of hanging it
test: install
	$(PY) -m pytest -m "not slow" -n auto --timeout 300 -o faulthandler_timeout=240

# the slow lane alone (Ray clusters, S3 round trips, torchrun, kills, overfitting runs), serially:
# one Ray start for the session; run it before merging work that touches those paths (about an hour here)
test-slow: install
	$(PY) -m pytest -m slow

# both lanes, serially
test-all: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check pipeline model inference jobs tests benchmarks scripts
	$(PY) -m ruff format --check pipeline model inference jobs tests benchmarks scripts

format: install
	$(PY) -m ruff format pipeline model inference jobs tests benchmarks scripts

cache: install
	$(PY) -m jobs.cache --preset $(PRESET) --dataset $(DATASET) --split $(SPLIT) --out $(STORE) \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) \
		$(if $(SPLIT_FILE),--source-options '{"split_file": "$(SPLIT_FILE)"}') $(ARGS)

info: install
	$(PY) -m jobs.store info $(STORE)

clean:
	rm -rf runs/demo

bench: install
	$(PY) -m benchmarks.bench all $(ARGS)

# the paper-size path end to end on this machine: real-size random-weight DINOv2-Reg and WAN2.1 VAE, the 258M
# Stage 1 and the 782M DiT a step each, rollout, predict, evaluate (ARGS=--reduced: 144 x 256 frames, same models)
smoke-paper: install
	$(PY) scripts/smoke_paper.py $(ARGS)

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

# the paper's ablations at CPU scale and the Stage 1 forecasters (2 seeds; ARGS=--quick: a smoke test): runs/experiment/report.md
experiment: install
	$(PY) -m jobs.experiment $(ARGS)

# see the future of a clip of VAL_STORE, or of ARGS="--video drive.mp4" (encoded here, with the PCA basis and
# encoders of the training STORE: no val store needed): PNG grid + mp4 under $(RUN)/predict
predict: install
	$(PY) -m jobs.predict --preset $(PRESET) --store $(if $(findstring --video,$(ARGS)),$(STORE),$(VAL_STORE)) \
		--stage1 $(RUN)/train/stage1 \
		--stage2 $(RUN)/train/stage2 --baseline $(RUN)/train/baseline --out $(RUN)/predict $(ARGS)

# Re2Pix vs Baseline on the validation store, or without one on the scenes training held out
# ($(RUN)/train/val_scenes.json): table on screen, JSON in $(RUN)/eval/results.json
HELD_OUT = $(if $(wildcard $(VAL_STORE)),,$(wildcard $(RUN)/train/val_scenes.json))
evaluate: install
	$(PY) -m jobs.evaluate --preset $(PRESET) $(if $(HELD_OUT),--val-scenes $(HELD_OUT),--store $(VAL_STORE)) \
		--stage1 $(RUN)/train/stage1 \
		--stage2 $(RUN)/train/stage2 --baseline $(RUN)/train/baseline --out $(RUN)/eval/results.json $(ARGS)

# a PCA basis on its own, to share: teams caching with `ARGS="--pca $(RUN)/basis.zarr"` get compatible stores
pca: install
	$(PY) -m jobs.pca --preset $(PRESET) --dataset $(DATASET) --split $(SPLIT) --out $(RUN)/basis.zarr \
		$(if $(DATA_ROOT),--data-root $(DATA_ROOT)) $(ARGS)
