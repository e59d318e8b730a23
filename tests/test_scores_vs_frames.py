"""Evaluation's pixel scores against the source's real frames (resized as the cache job resized them) when
the store's source is readable, beside the scores against the VAE reconstruction; only the latter otherwise."""

import numpy as np
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


def numpy_psnr(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """PSNR in dB per frame of uint8 [..., H, W, 3]."""
    mse = ((pred.astype(np.float64) - target.astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
    return 10 * np.log10(255.0**2 / mse)


def copy_last_vs_frames(store_path) -> tuple[float, float]:
    """Copy-last's decoded future (frames 13-24) scored by hand: mean PSNR against the synthetic source's
    frames resized with the cache job's resize, and against the VAE reconstruction."""
    from inference.codec import LatentCodec
    from inference.encoders import load_vae_for
    from pipeline.frames import resize_frames
    from pipeline.sources.synthetic import SyntheticSource
    from pipeline.store.reader import Store

    store = Store(str(store_path))
    g = store.geometry
    source = SyntheticSource(split="val", num_scenes=1, frames_per_scene=29, height=72, width=128)  # as made
    codec = LatentCodec(load_vae_for(None, store.manifest, g, "cpu"), store.manifest.get("latent_norm"))
    frames = []
    for i in range(len(store)):
        meta = store.clip_meta(i)
        refs = source.frames(meta["scene"])[meta["start"] : meta["start"] + g.clip_frames]
        frames.append(resize_frames(np.stack([source.read_frame(meta["scene"], r) for r in refs]), g.vae_input_hw))
    z = torch.from_numpy(np.stack([store.read_latents(i) for i in range(len(store))])).float()  # [2, 16, 7, h, w]
    copied = torch.cat([z[:, :, :4], z[:, :, 3:4].expand(-1, -1, 3, -1, -1)], dim=2)
    future = slice(g.context_frames, None)  # both clips in one batch, as the evaluation decodes them
    pred = codec.decode(copied)[:, future]
    vs_frames = numpy_psnr(pred, np.stack(frames)[:, future]).mean(axis=1)
    vs_recon = numpy_psnr(pred, codec.decode(z)[:, future]).mean(axis=1)
    return float(np.mean(vs_frames)), float(np.mean(vs_recon))


@pytest.mark.slow  # a whole evaluation run: 6-10 s alone
def test_scores_against_the_real_frames_when_the_source_is_readable(tmp_path):
    from inference.evaluation import format_table

    store = synthetic_store(tmp_path / "synthetic.zarr", split="val", encoders=encoders())
    r = evaluate(tmp_path, store)
    assert r["reference"]["frames"] == {"pixels": "source_frames"} and "scores_vs_frames" not in r["skipped"]
    vs_frames, vs_recon = copy_last_vs_frames(store)
    copy_last = r["models"]["copy_last"]
    assert copy_last["psnr_vs_frames"]["mean"] == pytest.approx(vs_frames, rel=1e-9)
    assert copy_last["psnr"]["mean"] == pytest.approx(vs_recon, rel=1e-9)  # kept beside: vs the reconstruction
    assert vs_frames != pytest.approx(vs_recon, rel=1e-3)
    for name in ("re2pix", "baseline", "copy_last"):
        want = {"psnr", "ssim", "fid", "fvd", "psnr_vs_frames", "ssim_vs_frames", "fid_vs_frames", "fvd_vs_frames"}
        assert want | {"psnr_vs_frames/f13", "ssim_vs_frames/f24"} <= set(r["models"][name]), name
    # the VAE's ceiling: the reconstruction itself against the frames (FID / FVD: the models' floor)
    ceiling = r["reference_metrics"]
    assert {"psnr_vs_frames", "ssim_vs_frames", "fid_vs_frames", "fvd_vs_frames"} <= set(ceiling)
    assert ceiling["fid_vs_frames"] > 0 and "psnr" not in ceiling
    table = format_table(r)
    assert "psnr_vs_frames" in table and "VAE ceiling" in table


@pytest.mark.slow  # a whole evaluation run: 6-10 s alone
def test_unreadable_source_leaves_the_reconstruction_scores_and_says_why_in_one_line(tmp_path):
    from inference.evaluation import format_table

    make_store(tmp_path / "counting.zarr", scenes=1, frames=29, encoders=encoders())  # a source not reopened here
    r = evaluate(tmp_path, tmp_path / "counting.zarr")
    assert r["reference"]["frames"]["pixels"] is None and "counting" in r["reference"]["frames"]["why"]
    assert "counting" in r["skipped"]["scores_vs_frames"]
    assert not [k for m in [*r["models"].values(), r["reference_metrics"]] for k in m if "vs_frames" in k]
    assert r["models"]["re2pix"]["psnr"]["mean"] > 0 and r["models"]["re2pix"]["fid"]["mean"] >= 0
    assert [line for line in format_table(r).splitlines() if "not readable" in line] == [
        f"skipped scores_vs_frames: {r['skipped']['scores_vs_frames']}"
    ]
