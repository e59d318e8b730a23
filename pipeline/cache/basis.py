"""The PCA basis and the encoders' descriptions: the first pass that fits a basis on a sample of
feature frames, and the encoders' manifest entries, hashed once per job in a Ray worker."""

from __future__ import annotations

import json

from ..errors import Re2pixError
from .config import CacheConfig
from .plan import encoding_plan
from .progress import Progress


def fit_basis(cfg: CacheConfig, source, geometry, index, ray, cluster, window: int = 1, footprint: dict | None = None):
    """First pass: the feature encoder on an even sample of feature frames; float64 moments merged in unit order,
    so the basis (and its fingerprint) does not depend on which worker finished first."""
    from pipeline.pca import PCAAccumulator
    from pipeline.units import plan_frames

    units = plan_frames(index, cfg.pca_frames)
    ds, _, _, _ = encoding_plan(ray, cfg, cluster, units, source, geometry, None, ["orig"], False, window, footprint)
    ds.context.execution_options.preserve_order = True  # units arrive in order: nothing waits in memory
    order = {u.unit_id: i for i, u in enumerate(units)}
    acc, pending, next_unit = PCAAccumulator(geometry.feature_dim), {}, 0
    progress = Progress("pca sample", sum(len(u.own) for u in units), "frames", cfg.progress)
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
        unit = json.loads(str(batch["plan"][0]))["unit_id"]
        pending[order[unit]] = PCAAccumulator.from_moments(batch["count"][0], batch["mean"][0], batch["m2"][0])
        while next_unit in pending:
            acc.merge(pending.pop(next_unit))
            next_unit += 1
        progress.update(len(json.loads(str(batch["own_rows"][0]))))
    if acc.count < 2:
        raise Re2pixError(f"{cfg.dataset}: no frame of the PCA sample could be read; see the lines above")
    return acc.to_basis(geometry.num_pca_channels)


def describe_encoders(
    encoder: str, vae: str, geometry, allow_download: bool, pseudo_depth: str | None = None, depth_scale: int = 4
) -> tuple[dict, dict, object, dict]:
    """The encoders' manifest entries (weights hashed as loaded), the VAE's latent normalization, the
    geometry with the sizes the encoders fix (patch, feature dim, latent channels, compression), and the
    memory of this process (unique set size) with torch imported and with both encoders loaded: what a
    worker and an encoder actor hold before their first unit (resources.actor_memory).
    With `pseudo_depth` (a Depth Anything spec), the entries hold "pseudo_depth" too: {"scale", "model"}."""
    import psutil

    from pipeline.encoders import derive_geometry, load_encoder, load_pseudo_depth, load_vae
    from pipeline.store.format import pseudo_depth_hw

    def uss() -> int:
        return psutil.Process().memory_full_info().uss

    import torch  # noqa: F401 -- part of every worker's footprint

    worker = uss()
    enc = load_encoder(encoder, input_hw=geometry.dino_input_hw, device="cpu", allow_download=allow_download)
    v = load_vae(vae, input_hw=geometry.vae_input_hw, device="cpu", allow_download=allow_download)
    derived = derive_geometry(geometry, enc, v)
    # the manifest's "dinov2" entry is the feature encoder, whichever it is: its "name" says which
    described = {"dinov2": enc.describe(), "vae": v.describe()}
    if pseudo_depth is not None:
        hw = pseudo_depth_hw(derived, depth_scale)
        depth = load_pseudo_depth(pseudo_depth, derived.dino_input_hw, hw, "cpu", allow_download=allow_download)
        described["pseudo_depth"] = {"scale": depth_scale, "model": depth.describe()}
    footprint = {"worker": worker, "encoders": uss()}
    return described, {"mean": v.latents_mean, "std": v.latents_std}, derived, footprint


def encoder_descriptions(
    cfg: CacheConfig, geometry, ray=None, with_pseudo_depth: bool = False
) -> tuple[dict, dict, object, dict]:
    """Hash the weights once per job, in a Ray worker when there is a cluster: the driver never holds
    a model (at paper size two models and a minute of hashing). The worker ends with the task
    (max_calls=1), so the memory it took is given back for the rest of the job. `with_pseudo_depth`:
    --pseudo-depth's model too (describe_encoders)."""
    args = (cfg.encoder, cfg.vae, geometry, cfg.allow_download)
    if with_pseudo_depth and cfg.pseudo_depth is not None:
        args += (cfg.pseudo_depth, cfg.pseudo_depth_scale)
    if ray is None:
        return describe_encoders(*args)
    task = ray.remote(num_cpus=0.25, max_retries=0, max_calls=1)(describe_encoders)
    try:
        return ray.get(task.remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Re2pixError):
            raise e.cause from None
        raise
