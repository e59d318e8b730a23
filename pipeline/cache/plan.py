"""The Ray Data plan of the cache job: one row per work unit -> decode+resize (CPU actors) -> encode (one
fused actor per GPU, stages.EncodeStage), with the object-store budget and Ray Data's context set for it.
run.run_cache adds the store writer; basis.fit_basis runs the same plan without it to fit the PCA basis."""

from __future__ import annotations

import warnings

from .config import CacheConfig, pseudo_depth_size
from .resources import actor_memory, encoder_device, plan_resources, unit_bytes


def _pool(ray, sizes, in_flight: int | None = None):
    lo, hi = sizes
    return ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_tasks_in_flight_per_actor=in_flight)


ENCODER_IN_FLIGHT = 2  # units per encoder actor: the next unit's frames wait at the actor, not at the driver
OBJECT_STORE_UNITS = 4  # the object-store budget, in units per unit in flight


def encode_spec(cfg: CacheConfig, geometry, basis, device: str, res, num_variants: int, with_clips: bool = True):
    """What every encode actor of a plan loads and how it runs (stages.EncodeSpec), from the config.
    `with_clips` False: the PCA fitting pass, the feature encoder alone."""
    from .stages import EncodeSpec

    return EncodeSpec(
        cfg.encoder,
        cfg.vae if with_clips else None,
        geometry,
        basis,
        device,
        cfg.batch_frames,
        cfg.batch_clips,
        res,
        num_variants,
        cfg.allow_download,
        cfg.pseudo_depth if with_clips else None,
        pseudo_depth_size(cfg, geometry) if with_clips else None,
    )


def encoding_plan(
    ray,
    cfg: CacheConfig,
    cluster,
    units,
    source,
    geometry,
    basis,
    variants,
    with_clips: bool,
    window: int = 1,
    footprint: dict | None = None,
):
    """One row per unit -> decoded, resized frames -> encoder actors (features and latents, or PCA
    moments when `basis` is None). Returns (dataset, pool sizes, resources, device).
    `footprint` (describe_encoders) sizes each actor's declared memory; None: nothing declared."""
    from .stages import DecodeStage, EncodeStage

    if with_clips:
        unit = unit_bytes(geometry, cfg.unit_clips, cfg.stride, len(variants), window)
    else:  # a PCA sample unit: frames for the feature encoder only; out: float64 moments (D x D)
        frames = max(len(u.own) for u in units)
        dh, dw = geometry.dino_input_hw
        unit = (frames * window * dh * dw * 3, 8 * (geometry.feature_dim + 2) * geometry.feature_dim)
    device = encoder_device(cfg, cluster)
    memory = None
    if footprint:
        memory = actor_memory(footprint, geometry, unit, device, cfg.batch_frames, cfg.batch_clips)
        # an estimate above every node's memory would leave the actor unplaceable: the job would wait forever
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        memory = {k: min(v, int(largest)) if largest else v for k, v in memory.items()}
    res, device, pools = plan_resources(cfg, cluster, len(units), memory)
    ds = ray.data.from_items([{"plan": u.to_json()} for u in units], override_num_blocks=max(1, len(units)))
    # Decoding is cheaper than encoding: unbounded, it would run ahead through the whole dataset and hold
    # every decoded unit in the object store (memory growing with the clip count, spilling at scale). Ray
    # Data's object-store budget bounds it to a few times the units in flight at every actor (Ray Data
    # splits the budget between the stages: a tighter one left encoder actors without units), and never
    # above Ray Data's own default, half the cluster's object store.
    in_flight = pools["encode"][1] * ENCODER_IN_FLIGHT + pools["decode"][1] + pools["write"][1]
    budget = OBJECT_STORE_UNITS * in_flight * sum(unit)
    budget = min(budget, ray.cluster_resources().get("object_store_memory", budget) / 2)
    limits = ds.context.execution_options.resource_limits
    ds.context.execution_options.resource_limits = limits.copy(object_store_memory=budget)
    ds.context.wait_for_min_actors_s = 900  # every encoder actor loads its models before units are dealt
    # Ray Data deals a unit to an actor on the node that holds its frames while that actor has room,
    # even when an actor elsewhere is idle: on a cluster, GPUs on the other nodes waited. A unit's frames
    # are cheap to move next to a GPU-second of encoding, so the least busy actor gets the next unit.
    # Ray 2.60 marks the option deprecated (it still works): its warning would be noise in every job's stderr.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*actor_locality_enabled", category=DeprecationWarning)
        ds.context.execution_options.actor_locality_enabled = False
    ds = ds.map_batches(
        DecodeStage,
        fn_constructor_args=(source, geometry, variants, with_clips, window),
        batch_size=1,
        compute=_pool(ray, pools["decode"]),
        **res.task_kwargs("decode"),
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_args=(encode_spec(cfg, geometry, basis, device, res, len(variants), with_clips),),
        batch_size=1,
        compute=_pool(ray, pools["encode"], in_flight=ENCODER_IN_FLIGHT),
        **res.actor_kwargs(),
    )
    return ds, pools, res, device
