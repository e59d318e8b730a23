"""The paper-size path end to end (scripts/smoke_paper.py --reduced): real-size random-weight DINOv2-Reg
and WAN2.1 VAE, 1152 PCA channels, the 258M Stage 1 and the 782M DiT, each job as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store.reader import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # minutes: real-size encoders on a CPU, a 782M DiT step (about 16 GB with Adam and EMA)
def test_the_paper_sized_models_cache_train_roll_out_predict_and_evaluate(tmp_path):
    run = subprocess.run(
        [sys.executable, "scripts/smoke_paper.py", "--reduced", "--fresh", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    steps = [s["step"] for s in summary["steps"]]
    assert steps[-3:] == ["baseline", "predict", "evaluate"] and summary["clips_evaluated"] == 1
    assert list((tmp_path / "predict").glob("*.png"))
    geometry = Store(str(tmp_path / "train.zarr")).geometry  # the paper's channels at smaller frames
    assert (geometry.feature_dim, geometry.num_pca_channels, geometry.latent_channels) == (3072, 1152, 16)
