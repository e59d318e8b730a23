"""`python -m jobs.evaluate --every-checkpoint`: a run's curve, one point per kept checkpoint."""

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from inference import InferenceError
from model.checkpoint import save_checkpoint
from model.stage2 import DiTConfig, Re2PixDiT
from tests.run_factory import perturb, write_runs
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.encoders import load_dinov2, load_vae

    root = tmp_path_factory.mktemp("curve")
    encoders = {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}
    make_store(root / "store.zarr", scenes=1, frames=29, encoders=encoders)  # 2 clips
    runs = write_runs(root / "runs", stage1_channels=64, stage2_channels=64)
    # Stage 2 keeps three checkpoints (steps 10, 20, 30), each with other weights; the Baseline two
    for task, semantic, steps in (("stage2", True, (10, 20, 30)), ("baseline", False, (10, 20))):
        for step in steps:
            m = perturb(Re2PixDiT(DiTConfig.tiny(semantic=semantic, num_pca_channels=64)), step)
            save_checkpoint(
                root / "runs" / task,
                step,
                model=m,
                state={},
                keep=0,
                meta={"task": task, "model_config": dataclasses.asdict(m.cfg)},
            )
    return root, runs


def config(setup, **kw):
    from jobs.evaluate import EvaluateConfig

    root, runs = setup
    values = dict(
        store=str(root / "store.zarr"),
        samples=2,
        sample_steps=2,
        threads=1,
        progress=False,
        decode=False,
        out=str(root / "eval" / "results.json"),
        **runs,
    )
    values.update(kw)
    return EvaluateConfig(**values)


def test_every_checkpoint_gives_one_point_per_checkpoint(setup):
    from jobs.evaluate import run_curve, run_evaluate

    root, runs = setup
    curve = run_curve(config(setup, every_checkpoint=True))
    saved = json.loads((root / "eval" / "curve.json").read_text())
    assert saved["schema"] == "re2pix-curve/1" and saved["points"] == curve["points"]
    steps = [p["step"] for p in curve["points"]]
    assert steps == [1, 10, 20, 30]  # write_runs' own step-1 checkpoint is kept too
    for p in curve["points"]:
        assert p["checkpoints"]["stage2"]["checkpoint"].endswith(f"step-{p['step']:06d}")
        assert ("baseline" in p["models"]) == (p["step"] in (1, 10, 20))  # the Baseline's run stops at 20
        assert p["models"]["re2pix"]["latent_mse"]["std"] >= 0
    mse = [p["models"]["re2pix"]["latent_mse"]["mean"] for p in curve["points"]]
    assert len(set(mse)) == len(mse)  # each point scored its own weights
    # a point is what evaluating that checkpoint alone gives
    alone = run_evaluate(
        config(
            setup,
            stage2=str(root / "runs" / "stage2" / "checkpoints" / "step-000020"),
            baseline=str(root / "runs" / "baseline" / "checkpoints" / "step-000020"),
            out=None,
        )
    )
    assert curve["points"][2]["models"]["re2pix"]["latent_mse"]["mean"] == pytest.approx(
        alone["models"]["re2pix"]["latent_mse"]["mean"]
    )
    assert curve["points"][2]["models"]["baseline"]["latent_mse"]["mean"] == pytest.approx(
        alone["models"]["baseline"]["latent_mse"]["mean"]
    )
    png = np.asarray(Image.open(curve["png"]))
    assert png.shape[0] == 240 and png.shape[1] == 360  # one panel: latent MSE (no decoding)
    assert (png == [40, 96, 220]).all(-1).sum() > 20 and (png == [220, 90, 40]).all(-1).sum() > 20


def test_a_run_without_checkpoints_is_refused(setup, tmp_path):
    from jobs.evaluate import run_curve

    with pytest.raises(InferenceError, match="no checkpoints"):
        run_curve(config(setup, every_checkpoint=True, stage2=str(tmp_path)))


def test_checkpoints_cut_short_are_not_points(setup, tmp_path):
    from inference.evaluation import run_checkpoints

    root, _ = setup
    (root / "runs" / "stage2" / "checkpoints" / "step-000040").mkdir()  # no meta.json: a save cut short
    try:
        assert sorted(run_checkpoints(root / "runs" / "stage2")) == [1, 10, 20, 30]
    finally:
        (root / "runs" / "stage2" / "checkpoints" / "step-000040").rmdir()
