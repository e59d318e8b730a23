"""Fit a PCA basis and save it on its own: `python -m jobs.pca --preset tiny --dataset synthetic --out BASIS`.

The same first pass the cache job runs when it is given no basis (the feature encoder on an even sample of
feature frames, float64 moments merged in unit order, standardize, eigendecomposition). Share the
result: every team that caches with `--pca BASIS` writes stores whose features can be mixed.
Options are the cache job's (`--help`); `--out` names the basis (a path or URL), not a store.
"""

from __future__ import annotations

import sys

from jobs.cli import random_weights_notice, run
from jobs.config import parse_config
from pipeline.cache import CacheConfig, absolute_location, build_index, fit_basis


def main(argv=None) -> int:
    cfg, _ = parse_config(CacheConfig, "cache", argv, description=__doc__, prog="pca")
    from pipeline.cache import encoder_descriptions, get_source
    from pipeline.pca import save_basis
    from pipeline.ray_cluster import start_ray, stop_ray
    from pipeline.store.geometry import resolve_geometry

    cfg.out = absolute_location(cfg.out)
    source = get_source(cfg)  # a bad dataset or data root: one line, before any cluster starts
    random_weights_notice({"encoder": cfg.encoder})  # once the job is under way
    cluster = start_ray(cfg.ray_address, verbose=cfg.verbose)
    try:
        import ray

        encoders, _, geometry, footprint = encoder_descriptions(cfg, resolve_geometry(cfg.geometry), ray)
        source, geometry, index = build_index(cfg, geometry, source)
        window = int(encoders["dinov2"].get("window", 1))
        basis = fit_basis(cfg, source, geometry, index, ray, cluster, window, footprint)
    finally:
        stop_ray(cluster)
    save_basis(basis, cfg.out, overwrite=cfg.overwrite, storage_options=cfg.storage_options or None)
    top = basis.explained_variance[:8] / basis.explained_variance.sum()
    print(
        f"saved a {basis.num_components} x {basis.feature_dim} PCA basis to {cfg.out} "
        f"(fingerprint {basis.fingerprint[:16]}; first components explain {', '.join(f'{v:.1%}' for v in top)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(main, resume_hint="rerun the same command (the basis is written only at the end)"))
