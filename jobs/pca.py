"""Fit a PCA basis and save it on its own: `python -m jobs.pca --preset tiny --dataset synthetic --out BASIS`.

The same first pass the cache job runs when it is given no basis (DINOv2 on an even sample of
feature frames, float64 moments merged across workers, standardize, eigendecomposition). Share the
result: every team that caches with `--pca BASIS` writes stores whose features can be mixed.
Options are the cache job's (`--help`); `--out` names the basis (a path or URL), not a store.
"""

from __future__ import annotations

import sys

from jobs.cache import CacheConfig, _ray_init, build_index, encoder_descriptions, fit_basis, resolve_geometry
from jobs.config import parse_config


def main(argv=None) -> int:
    cfg, _ = parse_config(CacheConfig, "cache", argv, description=__doc__)
    from pipeline.pca import save_basis
    encoders, _, geometry = encoder_descriptions(cfg, resolve_geometry(cfg.geometry))  # sizes from the encoders
    source, geometry, index = build_index(cfg, geometry)
    basis = fit_basis(cfg, source, geometry, index, _ray_init(), int(encoders["dinov2"].get("window", 1)))
    save_basis(basis, cfg.out, overwrite=cfg.overwrite)
    top = basis.explained_variance[:8] / basis.explained_variance.sum()
    print(f"saved a {basis.num_components} x {basis.feature_dim} PCA basis to {cfg.out} "
          f"(fingerprint {basis.fingerprint[:16]}; first components explain {', '.join(f'{v:.1%}' for v in top)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
