"""The shared training loop: exact resume after a kill, checkpoints, LR schedules, feature metrics,
and DDP training with two CPU processes under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference.stages import load_model
from jobs.train import main as train_main
from model.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_state,
    load_weights,
    read_meta,
    weights_fingerprint,
)
from model.loop import LoopConfig, lr_factor, read_metrics
from model.metrics import feature_metrics
from model.tasks import Stage1Task
from pipeline.store.format import DamagedStoreError, IncompatibleStoresError
from pipeline.store.reader import Store
from tests.store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]

# Stage 1 with dropout (the global RNG), EMA, gradient accumulation, warmup + cosine: every piece of
# state a resume has to restore
STAGE1 = {
    "model": {"size": "tiny", "dropout": 0.1, "dim": 48, "num_heads": 4},
    "batch_size": 4,
    "grad_accum": 2,
    "steps": 6,
    "lr": 0.002,
    "schedule": "cosine",
    "warmup_steps": 2,
    "ema_decay": 0.9,
    "log_every": 1,
    "eval_every": 3,
    "ckpt_every": 2,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "store.zarr"
    make_store(path, scenes=3, frames=33, variants=("orig", "hflip"), channel_chunk=16)  # 9 clips
    return str(path)


def _args(store, run_dir, *extra):
    return [
        "--stage",
        "1",
        "--store",
        store,
        "--run-dir",
        str(run_dir),
        "--val-clips",
        "3",
        "--no-progress",
        "--threads",
        "1",
        "--stage1",
        json.dumps(STAGE1),
        *extra,
    ]


def _train_losses(run_dir):
    return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(Path(run_dir) / "stage1") if r["kind"] == "train"]


def test_resume_after_a_kill_matches_an_uninterrupted_run_step_for_step(store, tmp_path, monkeypatch):
    train_main(_args(store, tmp_path / "straight", "--workers", "0"))
    straight = _train_losses(tmp_path / "straight")
    assert [s for s, _, _ in straight] == list(range(1, 7))

    calls = {"n": 0}
    real_loss = Stage1Task.loss

    def dying_loss(self, model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 10:  # step 5, second micro-batch: after the checkpoint at step 4
            raise KeyboardInterrupt("killed")
        return real_loss(self, model, batch, generator)

    monkeypatch.setattr(Stage1Task, "loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train_main(_args(store, tmp_path / "killed", "--workers", "0"))
    monkeypatch.setattr(Stage1Task, "loss", real_loss)
    assert latest_checkpoint(tmp_path / "killed" / "stage1").name == "step-000004"
    with pytest.raises(CheckpointError, match="--resume"):  # a run dir with checkpoints is not overwritten
        train_main(_args(store, tmp_path / "killed", "--workers", "0"))

    train_main(_args(store, tmp_path / "killed", "--resume", "--workers", "1"))  # another worker count too
    assert _train_losses(tmp_path / "killed") == straight  # losses and learning rates, exactly
    evals = [
        [r for r in read_metrics(d / "stage1") if r["kind"] == "eval"]
        for d in (tmp_path / "straight", tmp_path / "killed")
    ]
    assert evals[0] == evals[1] and [r["step"] for r in evals[0]] == [3, 6]
    metas = [read_meta(latest_checkpoint(d / "stage1")) for d in (tmp_path / "straight", tmp_path / "killed")]
    assert metas[0]["model_fingerprint"] == metas[1]["model_fingerprint"]
    assert metas[0]["ema_fingerprint"] == metas[1]["ema_fingerprint"]


def test_checkpoints_are_safetensors_plus_a_weights_only_state(store, tmp_path):
    train_main(_args(store, tmp_path, "--workers", "0", "--steps", "4"))
    run = tmp_path / "stage1"
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step-000004"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    meta = read_meta(ckpt)
    assert meta["task"] == "stage1" and meta["step"] == 4
    assert meta["model_fingerprint"] == weights_fingerprint(load_weights(ckpt, "model"))
    assert meta["fingerprint"] == meta["ema_fingerprint"] == weights_fingerprint(load_weights(ckpt, "ema"))
    state = load_state(ckpt)  # torch.load(weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"] and state["data"]["epoch"] >= 1
    # the model rebuilds from meta.json alone
    assert load_model(ckpt, ("stage1",), weights="model").fingerprint == meta["model_fingerprint"]
    # a resumed finished run only re-reports
    train_main(_args(store, tmp_path, "--workers", "0", "--steps", "4", "--resume"))
    assert len([r for r in read_metrics(run) if r["kind"] == "train"]) == 4


def test_lr_schedules_warm_up_then_decay():
    cos = lr_factor(LoopConfig(steps=110, lr=1.0, schedule="cosine", warmup_steps=10))
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0)
    lin = lr_factor(LoopConfig(steps=110, lr=1.0, schedule="linear", warmup_steps=10, final_lr_ratio=0.1))
    assert lin(60) == pytest.approx(0.55) and lin(110) == pytest.approx(0.1)
    assert lr_factor(LoopConfig(steps=10, lr=1.0, schedule="constant"))(7) == 1.0


def test_feature_metrics_per_frame_and_channel_prefix():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 4, 5, 64)
    assert {k for k in feature_metrics(target, target) if "/" not in k} == {
        "mse",
        "cos",
        "mse@8",
        "cos@8",
        "mse@64",
        "cos@64",
        "sharpness",
    }
    assert torch.allclose(feature_metrics(target, target)["t5/sharpness"], torch.ones(2))
    smooth = (target + target.roll(1, dims=2) + target.roll(1, dims=3) + target.roll((1, 1), dims=(2, 3))) / 4
    assert torch.all(feature_metrics(smooth, target)["sharpness"] < 0.5)  # a blurred forecast scores below 1
    pred = target.clone()
    pred[:, 1, ..., 8:] += 1.0  # frame t5 wrong past the first 8 PCA channels
    m = feature_metrics(pred, target, first_frame=4)
    assert torch.all(m["t5/mse@8"] == 0) and torch.allclose(m["t5/cos@8"], torch.ones(2))
    assert torch.allclose(m["t5/mse"], torch.full((2,), 56 / 64))
    assert torch.all(m["t4/mse"] == 0) and torch.all(m["t6/mse"] == 0)
    assert torch.allclose(m["mse"], torch.full((2,), 56 / 64 / 3))
    assert torch.all(m["t5/cos"] < 0.99)
    flipped = feature_metrics(-target, target)
    assert torch.allclose(flipped["cos"], -torch.ones(2))


@pytest.mark.slow
def test_ddp_training_with_two_cpu_processes_under_torchrun(store, tmp_path):
    # 6 training clips (3 held out), 2 ranks x 2 accumulated micro-batches of 1 (DDP no_sync on the first)
    stage1 = {**STAGE1, "steps": 3, "ckpt_every": 3, "eval_every": 0}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "jobs.train",
        "--stage",
        "1",
        "--store",
        store,
        "--run-dir",
        str(tmp_path),
        "--val-clips",
        "3",
        "--no-progress",
        "--workers",
        "0",
        "--threads",
        "1",
        "--stage1",
        json.dumps(stage1),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    records = read_metrics(tmp_path / "stage1")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    meta = read_meta(latest_checkpoint(tmp_path / "stage1"))
    assert meta["data"]["world"] == 2 and meta["data"]["batches_per_epoch"] == 3
    assert any("mse" in r for r in records if r["kind"] == "eval")


def test_a_val_store_under_another_pca_basis_is_refused(store, tmp_path):
    make_store(tmp_path / "val.zarr", scenes=1, frames=25, basis_seed=1)
    with pytest.raises(IncompatibleStoresError, match="pca.fingerprint"):
        train_main(_args(store, tmp_path / "run", "--val-store", str(tmp_path / "val.zarr")))


def test_a_damaged_clip_stops_training_or_is_skipped_and_counted_in_the_log(store, tmp_path, monkeypatch):
    def damaging(real):  # clip 0 raises what the reader raises for a missing or damaged chunk
        def read(self, i, *args, **kwargs):
            if i == 0:
                raise DamagedStoreError(self.location, "frames/features", 0, "chunk missing")
            return real(self, i, *args, **kwargs)

        return read

    for name in ("read_features", "read_feature_blocks"):  # rows, or chunks straight into the batch
        monkeypatch.setattr(Store, name, damaging(getattr(Store, name)))
    with pytest.raises(DamagedStoreError, match=r"frames/features\[0\] is damaged"):
        train_main(_args(store, tmp_path / "stop", "--workers", "0"))
    train_main(_args(store, tmp_path / "skip", "--workers", "0", "--on-bad-clip", "skip"))
    records = [r for r in read_metrics(tmp_path / "skip" / "stage1") if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 7))
    counts = [r["skipped_clips"] for r in records]
    assert counts == sorted(counts) and counts[-1] >= 1  # clip 0 is in every epoch's batches
    assert all(0 <= r["data_share"] <= 1 and r["data_wait_s"] >= 0 for r in records)  # the data budget
