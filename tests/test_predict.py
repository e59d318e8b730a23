"""jobs/predict.py with tiny everything: from a store clip and from a video (file and frame folder)."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from inference import InferenceError
from inference.figures import GridLayout, GridStyle, header_height, write_mp4
from model.checkpoint import CheckpointError
from pipeline.sources import SourceError
from pipeline.store.format import StoreError
from pipeline.store.geometry import TINY
from tests.run_factory import write_runs
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.encoders import load_dinov2, load_vae

    root = tmp_path_factory.mktemp("predict")
    encoders = {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}
    make_store(root / "store.zarr", scenes=1, frames=29, encoders=encoders)  # 2 clips
    return root, write_runs(root / "runs", stage1_channels=32, stage2_channels=64)


def config(setup, **kw):
    from jobs.predict import PredictConfig

    root, runs = setup
    values = dict(store=str(root / "store.zarr"), sample_steps=2, out=str(root / "out"), threads=1, **runs)
    values.update(kw)
    return PredictConfig(**values)


def grid_size(sections, cell_hw=(96, 160)):
    """A prediction PNG's size: its grid under a header of 2 lines (the clip; the run, steps, sampler)."""
    layout = GridLayout(tuple(sections), cell_hw, GridStyle())
    return header_height(2) + layout.height, layout.width


def test_predict_store_clip_writes_grid_video_and_summary(setup):
    from jobs.predict import run_predict

    s = run_predict(config(setup, clip=1, name="clip1"))
    assert s["ground_truth"] == "vae_reconstruction" and s["source"]["clip"] == 1
    assert s["rows"] == ["context", "ground truth", "Baseline", "Re2Pix", "forecast features"]
    grid = np.asarray(Image.open(s["png"]))
    assert grid.shape[:2] == grid_size([(2, 4), (4, 3)])  # context 2 x 4 (frames 0, 4, 8, 12), future 4 x 3
    with av.open(s["mp4"]) as c:
        assert sum(1 for _ in c.decode(video=0)) == 25
    with open(s["json"]) as f:
        summary = json.load(f)
    assert set(summary["models"]) == {"stage1", "stage2", "baseline"}
    for name in ("re2pix", "baseline"):
        assert len(summary["scores"][name]["psnr"]) == 12 and len(summary["scores"][name]["ssim"]) == 12
    assert summary["sampler"]["steps"] == 2 and summary["frames"]["predicted"] == [13, 24]


def test_prediction_decodes_context_and_future_as_one_sequence(setup):
    from inference.codec import LatentCodec
    from inference.encoders import load_vae_for
    from inference.inputs import open_space, store_clip
    from inference.prediction import predict_clip
    from inference.sampling import Sampler
    from inference.stages import Models

    cfg = config(setup)
    space, store = open_space(cfg.store)
    models = Models.load(cfg.stage1, cfg.stage2, cfg.baseline)
    codec = LatentCodec(load_vae_for(None, space.manifest, space.geometry, "cpu"), space.latent_norm)
    clip = store_clip(store, 0)
    pred = predict_clip(clip, models, Sampler(steps=2), codec, space.geometry, seed=3)
    gt = pred.frames["ground truth"]
    assert gt.shape == (25, 96, 160, 3)
    for name in ("Re2Pix", "Baseline"):
        assert pred.frames[name].shape == (25, 96, 160, 3)
        # the causal decoder sees the true context latents first: frames 0-12 are the reconstruction's
        assert np.array_equal(pred.frames[name][:13], gt[:13])
        assert not np.array_equal(pred.frames[name][13:], gt[13:])
        key = name.lower()
        assert np.array_equal(pred.latents[key][:, :4], clip.latents[:, :4])  # context held fixed
    assert not np.array_equal(pred.frames["Re2Pix"][13:], pred.frames["Baseline"][13:])
    assert pred.forecast.shape == (3, *TINY.feature_hw, 32)  # Stage 1 models 32 of the 64 channels
    again = predict_clip(clip, models, Sampler(steps=2), codec, space.geometry, seed=3)
    assert np.array_equal(again.latents["re2pix"], pred.latents["re2pix"])  # seeded


def test_missing_baseline_leaves_its_row_out(setup, tmp_path):
    from jobs.predict import run_predict

    s = run_predict(config(setup, baseline=str(tmp_path / "no-run"), out=str(tmp_path), name="nb"))
    assert s["rows"] == ["context", "ground truth", "Re2Pix", "forecast features"]
    assert set(s["scores"]) == {"re2pix"} and "baseline" not in s["models"]
    assert np.asarray(Image.open(s["png"])).shape[:2] == grid_size([(2, 4), (3, 3)])


def _moving_frames(n, hw=(120, 200)):
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    return np.stack(
        [np.stack([(xx * 2 + 6 * k) % 256, (yy * 3) % 256, np.full_like(xx, 90 + 4 * k)], -1) for k in range(n)]
    ).astype(np.uint8)


def test_predict_from_video_file_encodes_here(setup, tmp_path):
    from jobs.predict import run_predict

    path = write_mp4(tmp_path / "drive.mp4", _moving_frames(30), fps=12)
    s = run_predict(config(setup, video=str(path), out=str(tmp_path / "out"), grid_frames="all"))
    assert s["ground_truth"] == "video" and s["source"] == {"video": str(path), "frames_used": 25}
    assert s["name"] == "drive"
    assert s["rows"] == ["context", "ground truth", "VAE reconstruction", "Baseline", "Re2Pix", "forecast features"]
    assert set(s["vae_reconstruction"]) == {"psnr", "ssim"}  # the ceiling, also in the picture
    # every frame: context 2 x 13, future 5 x 12
    assert np.asarray(Image.open(s["png"])).shape[:2] == grid_size([(2, 13), (5, 12)])
    with av.open(s["mp4"]) as c:
        stream = c.streams.video[0]
        assert abs(float(stream.average_rate) - 12) < 1e-6  # the video's own rate
        assert sum(1 for _ in c.decode(stream)) == 25


def test_video_clip_matches_the_cache_encoding(setup, tmp_path):
    from inference.codec import LatentCodec
    from inference.encoders import load_dinov2_for, load_vae_for
    from inference.inputs import open_space, video_clip
    from pipeline.frames import resize_frames

    write_mp4(tmp_path / "v.mp4", _moving_frames(25), fps=10)
    cfg = config(setup, video=str(tmp_path / "v.mp4"))
    space, _ = open_space(cfg.store, video=True)
    vae = load_vae_for(None, space.manifest, space.geometry, "cpu")
    dino = load_dinov2_for(None, space.manifest, space.geometry, "cpu")
    clip = video_clip(cfg.video, space, dino, LatentCodec(vae, space.latent_norm))
    frames = clip.frames
    assert frames.shape == (25, 96, 160, 3) and clip.latents.shape == (16, 7, 12, 20)
    assert clip.features.shape == (7, 8, 14, 64)
    raw = dino(resize_frames(frames[::4], TINY.dino_input_hw)).numpy()
    want = space.basis.project(raw).astype(np.float16).astype(np.float32)
    assert np.array_equal(clip.features, want)
    # store latents are (z - mean) / std with the store's normalization (0 / 1 here): the raw VAE latents
    z = vae(frames[None]).float() * torch.tensor(vae.latents_std).view(1, -1, 1, 1, 1) + torch.tensor(
        vae.latents_mean
    ).view(1, -1, 1, 1, 1)
    assert torch.allclose(torch.from_numpy(clip.latents), z[0].half().float(), atol=1e-2, rtol=1e-2)


def test_predict_from_13_frame_folder_has_no_ground_truth_row(setup, tmp_path):
    from jobs.predict import run_predict

    folder = tmp_path / "frames"
    folder.mkdir()
    for k, f in enumerate(_moving_frames(13)):
        Image.fromarray(f).save(folder / f"f{k}.png")  # natural order: f2 before f10
    s = run_predict(config(setup, video=str(folder), out=str(tmp_path / "out"), baseline=""))
    assert s["ground_truth"] == "video" and s["source"]["frames_used"] == 13
    assert s["rows"] == ["context", "Re2Pix", "forecast features"]
    assert s["scores"] == {}
    assert np.asarray(Image.open(s["png"])).shape[:2] == grid_size([(2, 4), (2, 3)])


def test_refusals(setup, tmp_path):
    from jobs.predict import run_predict

    folder = tmp_path / "short"
    folder.mkdir()
    for k, f in enumerate(_moving_frames(9)):
        Image.fromarray(f).save(folder / f"{k:03d}.png")
    with pytest.raises(SourceError, match="at least 13"):
        run_predict(config(setup, video=str(folder)))
    with pytest.raises(InferenceError, match="--pca"):
        run_predict(config(setup, store=None, video=str(folder)))
    with pytest.raises(CheckpointError, match="expected stage2"):
        run_predict(config(setup, stage2=setup[1]["baseline"]))
    with pytest.raises(StoreError, match="no clip"):
        run_predict(config(setup, clip_id="nope"))


def test_command_line_error_is_one_line_and_status_1(setup, capsys):
    from jobs.cli import run
    from jobs.predict import main

    cfg = config(setup)
    argv = [
        "--store",
        cfg.store,
        "--clip-id",
        "nope",
        "--stage1",
        cfg.stage1,
        "--stage2",
        cfg.stage2,
        "--baseline",
        "",
        "--steps",
        "2",
        "--out",
        cfg.out,
    ]
    assert run(main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no clip 'nope'" in err[-1] and "Traceback" not in "".join(err)


@pytest.mark.slow  # a whole evaluation / prediction run: 6-10 s alone
def test_store_clip_of_a_synthetic_source_shows_the_source_frames(setup, tmp_path):
    from inference.inputs import store_clip
    from jobs.predict import run_predict
    from pipeline.frames import resize_frames
    from pipeline.sources import get_source
    from pipeline.store.reader import Store

    def synthetic(scenes, frames):
        return get_source("synthetic", None, "val", num_scenes=scenes, frames_per_scene=frames, seed=3)

    from pipeline.encoders import load_dinov2, load_vae

    encoders = {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}
    make_store(tmp_path / "syn.zarr", encoders=encoders, source=synthetic(1, 29))  # 2 clips: frames 0-24, 4-28
    src = synthetic(1, 29)
    want = resize_frames(
        np.stack([src.read_frame("scene-0000", f) for f in src.frames("scene-0000")[4:29]]), TINY.vae_input_hw
    )
    clip = store_clip(Store(str(tmp_path / "syn.zarr")), 1)
    assert clip.frames_kind == "source_frames" and np.array_equal(clip.frames, want)
    assert clip.source["ground_truth_source"]["opened"] and clip.source["ground_truth_source"]["frames"] == [4, 28]

    s = run_predict(config(setup, store=str(tmp_path / "syn.zarr"), clip=1, out=str(tmp_path / "out"), name="syn"))
    assert s["ground_truth"] == "source_frames"
    assert s["rows"] == ["context", "ground truth", "VAE reconstruction", "Baseline", "Re2Pix", "forecast features"]
    assert len(s["scores"]["re2pix"]["psnr"]) == 12 and len(s["scores_vs_vae_reconstruction"]["re2pix"]["psnr"]) == 12
    assert set(s["vae_reconstruction"]) == {"psnr", "ssim"}
    grid = np.asarray(Image.open(s["png"]))[header_height(2) :]
    layout = GridLayout(((2, 4), (5, 3)), (96, 160), GridStyle())
    for (section, row, col), frame in {(0, 0, 1): 4, (0, 0, 3): 12, (1, 0, 0): 16, (1, 0, 2): 24}.items():
        y, x = layout.cell_origin(section, row, col)  # context row: frames 0, 4, 8, 12; ground truth: 16, 20, 24
        assert np.array_equal(grid[y : y + 96, x : x + 160], want[frame])

    # a store whose source cannot be reopened keeps the VAE reconstruction, and says why
    s = run_predict(config(setup, clip=0, out=str(tmp_path / "out"), name="counting"))
    assert s["ground_truth"] == "vae_reconstruction"
    why = s["source"]["ground_truth_source"]
    assert not why["opened"] and "counting" in why["reason"]
