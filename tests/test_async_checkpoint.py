"""Checkpoints are written off the training step: training goes on while a save is in flight, a failed
write is one line at the next save or at the end, and a kill during the background write resumes from
the checkpoint before it, exactly."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import model.checkpoint
import model.loop
from jobs.train import main as train_main
from model.checkpoint import CheckpointError, latest_checkpoint, read_meta, verify_checkpoint
from model.loop import LoopConfig, read_metrics, train
from model.runtime import Runtime
from tests.store_factory import make_store
from tests.test_sync_free import RandomClips, _task

ROOT = Path(__file__).resolve().parents[1]


def _tiny_run(run_dir, steps=4, ckpt_every=2):
    cfg = LoopConfig(steps=steps, lr=1e-3, ckpt_every=ckpt_every, log_every=1, progress=False)
    return train(_task("stage1"), cfg, RandomClips(), run_dir, runtime=Runtime(torch.device("cpu")))


def test_training_goes_on_while_a_checkpoint_is_written(tmp_path, monkeypatch):
    events: list[str] = []
    step3 = threading.Event()
    real_save_file, real_step = model.checkpoint.save_file, model.loop.train_step

    def slow_save_file(tensors, path):  # the first write holds until step 3 ran (or 30 s: a blocking save)
        if "write started" not in events:
            events.append("write started")
            step3.wait(timeout=30)
            events.append("write done")
        return real_save_file(tensors, path)

    def step(task, trainee, batches, cfg, runtime, n):
        out = real_step(task, trainee, batches, cfg, runtime, n)
        events.append(f"step {n + 1}")
        if n + 1 == 3:
            step3.set()
        return out

    monkeypatch.setattr(model.checkpoint, "save_file", slow_save_file)
    monkeypatch.setattr(model.loop, "train_step", step)
    summary = _tiny_run(tmp_path)
    assert events.index("write started") < events.index("step 3") < events.index("write done")
    # the step-2 checkpoint holds the state of step 2, not of the steps taken while it was written
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert read_meta(tmp_path / "checkpoints" / "step-000002")["step"] == 2
    assert summary["checkpoint"].endswith("step-000004") and summary["fingerprint"]
    verify_checkpoint(tmp_path / "checkpoints" / "step-000002")


def test_a_snapshot_that_would_crowd_host_memory_is_written_in_the_training_thread(tmp_path, monkeypatch, caplog):
    """A 782M DiT on a CPU: a host snapshot beside training would take 12.5 GB more of the same memory."""
    import logging

    events: list[str] = []
    real_save_file, real_step = model.checkpoint.save_file, model.loop.train_step
    monkeypatch.setattr(model.checkpoint, "host_available", lambda: 1000)  # bytes: nothing fits
    monkeypatch.setattr(model.checkpoint, "save_file", lambda t, p: (events.append("write"), real_save_file(t, p)))
    monkeypatch.setattr(model.loop, "train_step", lambda *a: (events.append("step"), real_step(*a))[1])
    with caplog.at_level(logging.INFO, logger="re2pix.checkpoint"):
        _tiny_run(tmp_path)
    assert events == ["step", "step", "write", "step", "step", "write"]  # each save done before the next step
    assert caplog.text.count("does not fit beside training in host memory") == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    verify_checkpoint(tmp_path / "checkpoints" / "step-000002")


def test_a_failed_background_write_is_one_error_naming_the_checkpoint(tmp_path, monkeypatch):
    def full_disk(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model.checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"step-000002 failed \(OSError: .*No space left on device"):
        _tiny_run(tmp_path, steps=4, ckpt_every=2)
    assert latest_checkpoint(tmp_path) is None  # nothing half-written is taken for a checkpoint


STAGE1 = {
    "model": {"size": "tiny", "dim": 48, "num_heads": 4},
    "batch_size": 4,
    "steps": 6,
    "lr": 0.002,
    "ema_decay": 0.9,
    "log_every": 1,
    "ckpt_every": 2,
}

# the job, with the writer of the step-4 checkpoint stopping after its first file (the flag file says so)
KILLED_DURING_WRITE = """
import sys, time, pathlib
import model.checkpoint
from jobs.train import main
real, calls = model.checkpoint.save_file, []
def stuck(tensors, path):
    calls.append(path)
    real(tensors, path)
    if len(calls) == 3:  # model + EMA of step 2, then step 4's model weights
        pathlib.Path(sys.argv[1]).write_text(path)
        time.sleep(600)
model.checkpoint.save_file = stuck
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_a_kill_during_the_background_write_resumes_from_the_checkpoint_before(tmp_path):
    store = tmp_path / "store.zarr"
    make_store(store, scenes=3, frames=33, channel_chunk=16)

    def args(run):
        return ["--stage", "1", "--store", str(store), "--run-dir", str(run), "--val-clips", "3", "--no-progress",
                "--workers", "0", "--threads", "1", "--stage1", json.dumps(STAGE1)]  # fmt: skip

    train_main(args(tmp_path / "straight"))
    flag = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    job = subprocess.Popen([sys.executable, "-c", KILLED_DURING_WRITE, str(flag), *args(tmp_path / "killed")], env=env)
    deadline = time.time() + 300
    while not flag.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), "the step-4 checkpoint's write never started"
    job.send_signal(signal.SIGKILL)
    job.wait()
    run = tmp_path / "killed" / "stage1"
    partial = Path(flag.read_text()).parent
    assert partial.name.startswith(".tmp-") and (partial / "model.safetensors").exists()
    assert latest_checkpoint(run).name == "step-000002"  # the half-written step 4 is not taken

    train_main([*args(tmp_path / "killed"), "--resume"])
    losses = [[(r["step"], r["loss"]) for r in read_metrics(d / "stage1") if r["kind"] == "train"]
              for d in (tmp_path / "straight", tmp_path / "killed")]  # fmt: skip
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == list(range(1, 7))
    metas = [read_meta(latest_checkpoint(d / "stage1")) for d in (tmp_path / "straight", tmp_path / "killed")]
    assert metas[0]["fingerprint"] == metas[1]["fingerprint"]
    assert not partial.exists()  # the kill's leftovers are cleared by the next save
