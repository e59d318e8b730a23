"""A new user's first hour (issue 30): the README's commands work as written and say what they do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_factory import write_runs
from tests.store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]


def make(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`make ARGS` with this interpreter's environment as the venv (its install step taken as done)."""
    venv = Path(sys.executable).parent.parent
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "-o", "install", f"VENV={venv}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder as `make cache` + `make train` leave it for a user's videos: store.zarr and train/, no val.zarr."""
    from pipeline.encoders import load_dinov2, load_vae

    run = tmp_path_factory.mktemp("mydrive")
    encoders = {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}
    make_store(run / "store.zarr", scenes=1, frames=29, encoders=encoders)
    write_runs(run / "train", stage1_channels=32, stage2_channels=64)
    return run


def test_make_predict_on_a_video_needs_no_val_store(run_folder, tmp_path):
    from inference.figures import write_mp4
    from tests.test_predict import _moving_frames

    video = write_mp4(tmp_path / "drive.mp4", _moving_frames(25), fps=10)
    done = make("predict", f"RUN={run_folder}", f"ARGS=--video {video} --sample-steps 2 --threads 1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (run_folder / "val.zarr").exists()
    assert (run_folder / "predict" / "drive.png").is_file()
    # what it is doing, as it does it: each phase named, a bar over the 2 x 3 network evaluations of 2 Heun steps
    assert "encoding" in done.stderr and "then sampling Re2Pix and the Baseline (2 heun steps each)" in done.stderr
    assert "sampling: 100%" in done.stderr and "6/6" in done.stderr


def test_a_missing_data_root_names_the_flag(capsys):
    from jobs.cache import main
    from jobs.cli import run

    assert run(main, ["--dataset", "videos", "--out", "unused.zarr"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --dataset videos reads a folder") and "--data-root" in err[-1]
    assert "DATA_ROOT=" in err[-1] and "None" not in err[-1]


def test_the_random_weight_encoders_are_named_when_a_job_runs_with_them(capsys):
    from jobs.cli import random_weights_notice

    random_weights_notice({"encoder": "tiny", "vae": "demo"})
    assert "--encoder tiny: RANDOM weights" in capsys.readouterr().err
    random_weights_notice({"encoder": None, "vae": None}, {"encoders": {"vae": {"weights_id": "tiny"}}})
    assert "--vae tiny: RANDOM weights" in capsys.readouterr().err
    random_weights_notice({"encoder": "demo", "vae": "demo"})
    assert capsys.readouterr().err == ""


def test_a_mistyped_checkpoint_path_says_it_does_not_exist(tmp_path):
    from model.checkpoint import CheckpointError, resolve_checkpoint

    with pytest.raises(CheckpointError, match="stage11 does not exist"):
        resolve_checkpoint(tmp_path / "stage11")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Stage 1 trained for 6 steps on a 3-scene store without --val-store, with --tensorboard."""
    from jobs.train import main
    from tests.test_train import _args

    tmp_path = tmp_path_factory.mktemp("trained")
    make_store(tmp_path / "store.zarr", scenes=3, frames=33)
    args = _args(str(tmp_path / "store.zarr"), tmp_path / "run", "--workers", "0")
    main([*args, "--tensorboard"])  # metrics.jsonl stays; TensorBoard gets the same scalars
    return tmp_path, args


def test_resume_names_changed_settings_and_says_when_a_stage_is_finished(trained, caplog):
    import logging

    from jobs.train import main
    from pipeline.errors import ConfigError

    tmp_path, args = trained
    assert (tmp_path / "run/stage1/metrics.jsonl").is_file()
    assert list((tmp_path / "run/stage1/tensorboard").glob("events.out.tfevents.*"))
    with caplog.at_level(logging.INFO, logger="re2pix.train"):
        main([*args, "--resume"])  # the same settings: resumes, and says the stage is already done
    assert "stage1: already trained to step 6" in caplog.text
    with pytest.raises(ConfigError, match=r"was trained with lr 0\.002 \(now 0\.5\).*--run-dir"):
        main([*args, "--resume", "--stage1.lr", "0.5"])
    main([*args, "--resume", "--stage1.steps", "8"])  # training on is a change a resume may make


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    from jobs.train import parse
    from pipeline.errors import ConfigError

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[tensorboard\]'"):
        parse(["--tensorboard"])


def test_held_out_scenes_are_recorded_and_evaluate_reuses_them(trained, tmp_path, capsys):
    import json

    from inference.evaluation import format_table
    from jobs.evaluate import EvaluateConfig, run_evaluate
    from pipeline.store.reader import Store

    run = trained[0] / "run"
    record = json.loads((run / "val_scenes.json").read_text())
    store = Store(record["store"])
    assert record["scenes"] == ["scene-02"] and len(record["clips"]) == 3
    assert {store.clip_meta(i)["scene"] for i in record["clips"]} == {"scene-02"}
    runs = write_runs(tmp_path, stage1_channels=32, stage2_channels=64)
    cfg = EvaluateConfig(
        store="not-used.zarr",
        val_scenes=str(run / "val_scenes.json"),
        samples=1,
        sample_steps=2,
        decode=False,
        out=None,
        threads=1,
        **runs,
    )
    results = run_evaluate(cfg)
    assert "clips 1-3 of 3, run 1/1: sampling re2pix and baseline (2 steps)" in capsys.readouterr().err
    assert results["clips"] == 3 and results["clip_ids"] == record["clip_ids"]
    table = format_table(results)
    assert "±" not in table and "one sampling run: no spread" in table  # one value has no spread


def test_diagnose_png_shows_two_equal_stores_both_with_labelled_axes(tmp_path):
    import numpy as np
    from PIL import Image

    from pipeline.store.diagnose import COLORS, plot_png

    report = {
        "intervals_frames": [4, 8, 12],
        "ltd_rms": [1.0, 1.5, 1.8],
        "latent_channels": {"std": [1.0, 0.9, 1.1, 1.0]},
        "vae": "wan2.1-vae",
        "encoder": "dinov2",
    }
    reports = [{**report, "store": "a.zarr"}, {**report, "store": "b.zarr"}]  # the same curves
    png = plot_png(reports, tmp_path / "diag.png")
    panels = np.asarray(Image.open(png).convert("RGB"))[:300]  # above the legend
    pixels = {tuple(p) for p in panels.reshape(-1, 3)}
    assert {COLORS[0], COLORS[1]} <= pixels  # the second store's curve does not hide the first


def test_weights_missing_offline_name_the_flag_that_allows_downloads(tmp_path, monkeypatch):
    from pipeline.encoders.hashing import EncoderWeightsError, _locate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderWeightsError, match=r"allow downloads \(--allow-download\)"):
        _locate("nobody-here/no-such-encoder", "--encoder", None, False, None, str(tmp_path))
