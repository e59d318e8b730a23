"""FID / FVD against the source's real frames when the store's source is readable; the VAE reconstruction
(labelled) otherwise."""

import pytest
import torch

from tests.run_factory import MeanClip, MeanColour, write_runs
from tests.store_factory import make_store, synthetic_store


def encoders():
    from pipeline.encoders import load_dinov2, load_vae

    return {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}


def evaluate(tmp_path, store):
    from jobs.evaluate import EvaluateConfig, run_evaluate

    runs = write_runs(tmp_path / "runs", stage1_channels=64, stage2_channels=64)
    torch.jit.script(MeanColour()).save(str(tmp_path / "inception.pt"))
    torch.jit.script(MeanClip()).save(str(tmp_path / "i3d.pt"))
    return run_evaluate(
        EvaluateConfig(
            store=str(store),
            samples=1,
            sample_steps=2,
            threads=1,
            progress=False,
            out=None,
            fid_weights=str(tmp_path / "inception.pt"),
            fvd_weights=str(tmp_path / "i3d.pt"),
            **runs,
        )
    )


@pytest.mark.slow  # a whole evaluation / prediction run: 6-10 s alone
def test_fid_and_fvd_use_real_frames_when_the_source_is_readable(tmp_path):
    r = evaluate(tmp_path, synthetic_store(tmp_path / "synthetic.zarr", split="val", encoders=encoders()))
    assert r["reference"]["fid_fvd"] == {"pixels": "source_frames"}
    # the reconstruction is scored against the real frames too: the floor of the models' FID / FVD
    assert r["reference_metrics"]["fid"] > 0 and r["reference_metrics"]["fvd"] > 0
    assert r["models"]["re2pix"]["fid"]["mean"] > 0


@pytest.mark.slow  # a whole evaluation / prediction run: 6-10 s alone
def test_vae_reconstruction_is_the_labelled_fallback(tmp_path):
    make_store(tmp_path / "counting.zarr", scenes=1, frames=29, encoders=encoders())
    r = evaluate(tmp_path, tmp_path / "counting.zarr")
    assert r["reference"]["fid_fvd"]["pixels"] == "vae_reconstruction"
    assert "counting" in r["reference"]["fid_fvd"]["why"]
    assert "fid" not in r["reference_metrics"] and r["models"]["re2pix"]["fid"]["mean"] >= 0
