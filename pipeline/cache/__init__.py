"""The cache job's driver (`python -m jobs.cache` parses the command line and calls run.run_cache):
source -> clip index -> cheap checks -> (PCA basis: reuse --pca, or fit on a sample) -> Ray Data:
decode+resize -> encode (feature encoder -> PCA -> float16, video VAE; one fused actor per GPU) -> store.

config.py     CacheConfig, what a store records of it
index.py      the source and its clip index
preflight.py  the cheap checks before any encoder runs
basis.py      the PCA fitting pass, the encoders' descriptions
resources.py  what each actor asks Ray for (counts, CPUs, GPUs, memory)
plan.py       the Ray Data plan (object-store budget, DataContext)
stages.py     its stages: decode (read.py), encode, write
progress.py   the progress line, per-actor statistics
run.py        run_cache, the dry run, start_store (the store's writer and work units, also for benchmarks/)

Importing this package imports neither Ray nor torch: the stages and the cluster are imported where used.
"""

from .basis import describe_encoders, encoder_descriptions, fit_basis
from .config import DEMO_STORE, RUNTIME_ONLY, CacheConfig, absolute_location, pseudo_depth_size, recorded_config
from .index import build_index, get_source, listed_inputs
from .plan import ENCODER_IN_FLIGHT, OBJECT_STORE_UNITS, encode_spec, encoding_plan
from .preflight import (
    GROWTH_FREE,
    check_visible_from_every_node,
    check_writable,
    estimated_bytes,
    finished_store,
    grown_index,
    same_settings,
)
from .progress import ActorStats, Progress
from .resources import StageResources, actor_memory, encoder_device, plan_resources, unit_bytes
from .run import dry_run, run_cache, start_store

__all__ = [
    "DEMO_STORE",
    "ENCODER_IN_FLIGHT",
    "GROWTH_FREE",
    "OBJECT_STORE_UNITS",
    "RUNTIME_ONLY",
    "ActorStats",
    "CacheConfig",
    "Progress",
    "StageResources",
    "absolute_location",
    "actor_memory",
    "build_index",
    "check_visible_from_every_node",
    "check_writable",
    "describe_encoders",
    "dry_run",
    "encode_spec",
    "encoder_descriptions",
    "encoder_device",
    "encoding_plan",
    "estimated_bytes",
    "finished_store",
    "fit_basis",
    "get_source",
    "grown_index",
    "listed_inputs",
    "plan_resources",
    "pseudo_depth_size",
    "recorded_config",
    "run_cache",
    "same_settings",
    "start_store",
    "unit_bytes",
]
