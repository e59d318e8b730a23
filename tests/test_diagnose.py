"""`python -m jobs.store diagnose`: latent temporal distance and channel statistics, two stores side by side."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from jobs.store import main as store_main
from pipeline.store.diagnose import diagnose, temporal_distance
from pipeline.store.format import StoreError
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    make_store(root / "a.zarr", scenes=2, frames=33)
    wan22 = replace(TINY, latent_channels=48, spatial_downsample=16)  # another VAE's geometry
    make_store(root / "b.zarr", scenes=2, frames=29, geometry=wan22, seed=3)
    return str(root / "a.zarr"), str(root / "b.zarr")


def test_ltd_equals_a_direct_computation(stores):
    store = Store(stores[0])
    report = diagnose(store, max_clips=None)
    T = store.geometry.latent_frames
    # direct: every clip, every pair (t, t + d), L2 of the flattened latent frames, in float64
    direct = []
    for d in range(1, T):
        dists = [
            np.sqrt(
                (
                    (
                        store.read_latents(i)[:, t + d].astype(np.float64)
                        - store.read_latents(i)[:, t].astype(np.float64)
                    )
                    ** 2
                ).sum()
            )
            for i in range(len(store))
            for t in range(T - d)
        ]
        direct.append(np.mean(dists))
    np.testing.assert_allclose(report["ltd"], direct, rtol=1e-5)
    assert report["intervals"] == list(range(1, T)) and report["intervals_frames"] == [4 * d for d in range(1, T)]
    per_value = np.sqrt(np.prod(store.geometry.latents_shape) / T)
    np.testing.assert_allclose(report["ltd_rms"], np.array(direct) / per_value, rtol=1e-4)
    # per-channel latent statistics equal numpy's over every clip
    z = np.stack([store.read_latents(i) for i in range(len(store))]).astype(np.float64)  # [N, C, T, h, w]
    np.testing.assert_allclose(report["latent_channels"]["std"], z.std(axis=(0, 2, 3, 4)), rtol=1e-4)
    np.testing.assert_allclose(report["latent_channels"]["max"], z.max(axis=(0, 2, 3, 4)), rtol=1e-5)
    f = np.stack([store.read_features(i) for i in range(len(store))]).astype(np.float64)
    np.testing.assert_allclose(report["feature_channels"]["mean"], f.mean(axis=(0, 1, 2, 3)), atol=1e-5)


def test_temporal_distance_of_a_linear_ramp_grows_linearly():
    x = np.arange(5, dtype=np.float64)[:, None] * np.ones((1, 4))  # ||x[t+d] - x[t]|| = 2d
    np.testing.assert_allclose(temporal_distance(x), [2.0, 4.0, 6.0, 8.0])


def test_two_stores_side_by_side_as_a_table_and_a_png(stores, tmp_path, capsys):
    png = tmp_path / "fig" / "diag.png"
    assert store_main(["diagnose", *stores, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "[0] " + stores[0] in out and "[1] " + stores[1] in out and "LTD d=6 (24 frames)" in out
    assert "latent ch47 std" in out  # the 48-channel store's channels, '-' for the 16-channel one
    from pipeline.store.diagnose import COLORS

    pixels = {tuple(p) for p in np.unique(np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3), axis=0)}
    assert {COLORS[0], COLORS[1]} <= pixels  # one curve per store

    assert store_main(["diagnose", *stores, "--json", "--png", str(png), "--max-clips", "2"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["clips"] for r in reports] == [2, 2] and len(reports[1]["latent_channels"]["mean"]) == 48


def test_an_empty_store_is_refused_naming_it(tmp_path):
    make_store(tmp_path / "e.zarr", fail_clips=range(4))
    with pytest.raises(StoreError, match="e.zarr holds no usable clip"):
        diagnose(Store(str(tmp_path / "e.zarr")))
