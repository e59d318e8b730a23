"""NaN and Inf are damage: the store readers refuse a row holding them (store, array, row named) whichever path
reads it, and training stops on it or skips its clip; the trainer never saves non-finite weights and names the
batch's clips when its loss goes non-finite; evaluate, predict and rollout refuse non-finite weights."""

import json

import numpy as np
import pytest
import torch
import zarr

from inference.stages import build_model
from jobs.cli import run
from jobs.evaluate import main as evaluate_main
from jobs.predict import main as predict_main
from jobs.rollout import main as rollout_main
from jobs.train import main as train_main
from model.checkpoint import latest_checkpoint, load_weights, read_meta, save_checkpoint
from model.loop import read_metrics
from model.tasks import Stage1Task
from pipeline.store.format import DamagedStoreError
from pipeline.store.reader import Store
from tests.run_factory import write_runs
from tests.store_factory import make_store

STAGE1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 4, "log_every": 1}


def _poison(store: str, array: str, row: int, value=np.nan) -> None:
    """Write one non-finite value into a row through Zarr: its checksums are computed anew and pass."""
    arr = zarr.open_group(store, mode="r+")[array]
    arr[(row,) + (0,) * (arr.ndim - 1)] = value


def _clip_of_frame_row(store: Store, row: int) -> int:
    return next(i for i in range(len(store)) if row in store._feature_rows[store.row(i)])


@pytest.mark.parametrize("compression", ["none", "zstd"])  # read directly from the files, or through Zarr
def test_every_reader_refuses_a_row_holding_nan_or_inf(tmp_path, compression):
    path = str(tmp_path / "s.zarr")
    make_store(path, scenes=1, frames=33, channel_chunk=16, compression=compression)
    _poison(path, "frames/features", 0, np.inf)
    _poison(path, "clips/latents", 1, -np.inf)
    store = Store(path)
    clip = _clip_of_frame_row(store, 0)
    where = rf"{path}: frames/features\[0\] is damaged \(it holds NaN/Inf values\)"
    with pytest.raises(DamagedStoreError, match=where):
        store.read_features(clip)
    with pytest.raises(DamagedStoreError, match=where):
        store.read_feature_row(0, channels=16)
    if compression == "none":  # the trainer's channel-blocked path: chunks straight into the batch
        k = store.feature_block(32)
        out = np.empty((store.geometry.latent_frames, 32 // k, *store.geometry.feature_hw, k), np.float16)
        with pytest.raises(DamagedStoreError, match=where):
            store.read_feature_blocks(clip, out)
    with pytest.raises(DamagedStoreError, match=rf"{path}: clips/latents\[1\] is damaged \(it holds NaN/Inf"):
        store.read_latents(1)
    clean = next(i for i in range(len(store)) if i != 1 and 0 not in store._feature_rows[store.row(i)])
    assert np.isfinite(store.read_clip(clean).features).all()  # the other clips read as before


def test_a_rollout_row_holding_nan_is_refused(tmp_path):
    path = str(tmp_path / "s.zarr")
    w, _, _ = make_store(path, scenes=1, frames=29, channel_chunk=16)
    w.create_pred_features("f" * 64)
    g = w.geometry
    for row in range(len(Store(path))):
        w.write_pred_features(row, np.ones((g.future_latents, *g.feature_hw, g.num_pca_channels), np.float16))
    w.finish_pred_features()
    _poison(path, "clips/pred_features", 1)
    with pytest.raises(DamagedStoreError, match=r"clips/pred_features\[1\] is damaged \(it holds NaN/Inf"):
        Store(path).read_pred_features(1)


def _train(store, run_dir, *extra, stage1=STAGE1):
    args = ["--stage", "1", "--store", store, "--run-dir", str(run_dir), "--val-clips", "3", "--no-progress"]
    args += ["--workers", "0", "--threads", "1", "--stage1", json.dumps(stage1), *extra]
    return run(train_main, args)


def test_training_stops_on_a_nan_row_in_one_line_or_skips_its_clip(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    make_store(path, scenes=3, frames=33, channel_chunk=16)  # 9 clips; the last scene is held out
    store = Store(path)
    first_scene = [i for i in range(len(store)) if store.clip_meta(i)["scene"] == "scene-00"]
    for row in {int(r) for i in first_scene for r in store._feature_rows[store.row(i)]}:
        _poison(path, "frames/features", row)  # every window of the first scene's clips meets one
    assert _train(path, tmp_path / "stop") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: frames/features[" in err[0] and "NaN/Inf" in err[0]
    assert latest_checkpoint(tmp_path / "stop" / "stage1") is None  # nothing trained on it was saved
    assert _train(path, tmp_path / "skip", "--on-bad-clip", "skip") == 0
    records = [r for r in read_metrics(tmp_path / "skip" / "stage1") if r["kind"] == "train"]
    assert records[-1]["skipped_clips"] >= 1 and all(np.isfinite(r["loss"]) for r in records)


def test_a_non_finite_loss_names_the_batch_and_no_checkpoint_after_it_is_saved(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "s.zarr")
    make_store(path, scenes=3, frames=33, channel_chunk=16)
    real, seen = Stage1Task.loss, []

    def diverging(self, model, batch, generator):  # the second step's loss goes NaN
        seen.append(list(batch["clip_id"]))
        loss = real(self, model, batch, generator)
        return loss * float("nan") if len(seen) == 2 else loss

    monkeypatch.setattr(Stage1Task, "loss", diverging)
    # a checkpoint every step, a log line every 4: saving must not wait for the log line to look at the loss
    settings = dict(STAGE1, log_every=4, ckpt_every=1, keep_checkpoints=0)
    assert _train(path, tmp_path / "run", stage1=settings) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage1: training went NaN/Inf at step 2" in err[0] and path in err[0]
    assert all(cid in err[0] for cid in seen[1])  # the batch's clips, by id
    run_dir = tmp_path / "run" / "stage1"
    assert latest_checkpoint(run_dir).name == "step-000001" and len(list(run_dir.glob("checkpoints/step-*"))) == 1
    assert all(t.isfinite().all() for t in load_weights(latest_checkpoint(run_dir)).values())


def _with_nan_weights(run_dir):
    """A newer checkpoint of the run with one weight NaN, its fingerprint recorded (as a diverged run saved it)."""
    meta = read_meta(latest_checkpoint(run_dir))
    model = build_model(meta["task"], meta["model_config"])
    model.load_state_dict(load_weights(latest_checkpoint(run_dir)))
    name, weight = next(iter(model.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    save_checkpoint(run_dir, meta["step"] + 1, model=model, state={}, meta=meta)
    return name


def test_evaluate_predict_and_rollout_refuse_non_finite_weights(tmp_path, capsys):
    path = str(tmp_path / "s.zarr")
    make_store(path, scenes=1, frames=29)
    runs = write_runs(tmp_path / "runs")
    broken = _with_nan_weights(tmp_path / "runs" / "stage1")
    models = ["--stage1", runs["stage1"], "--stage2", runs["stage2"], "--baseline", runs["baseline"]]
    out = str(tmp_path / "results.json")
    evaluate = ["--store", path, "--out", out, "--no-decode", "--samples", "1", "--no-progress", *models]
    predict = ["--store", path, "--out", str(tmp_path / "predict"), *models]
    rollout = ["--checkpoint", runs["stage1"], "--store", path, "--no-progress"]
    for main, args in ((evaluate_main, evaluate), (predict_main, predict), (rollout_main, rollout)):
        assert run(main, args + ["--threads", "1"]) == 1
        err = [x for x in capsys.readouterr().err.strip().splitlines() if not x.startswith("note: ")]
        assert len(err) == 1 and "non-finite weights" in err[0] and broken in err[0] and "stage1" in err[0]
    assert Store(path).pred_features_fingerprint is None  # the clean store got no rollouts
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "predict").exists()
