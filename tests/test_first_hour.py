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
