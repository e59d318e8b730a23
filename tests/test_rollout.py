"""The rollout job writes Stage 1's predictions for every flip variant into the store, resumably, and
`--stage all` chains Stage 1 -> rollout -> Stage 2 -> Baseline."""

import json

import numpy as np
import pytest
import torch

from inference.stages import load_model
from jobs.cli import run
from jobs.rollout import main as rollout_main
from jobs.train import main as train_main
from jobs.train import parse as train_parse
from jobs.train import run as train_run
from model.checkpoint import latest_checkpoint, read_meta
from model.stage1 import rollout
from pipeline.store.format import StoreError
from pipeline.store.reader import Store
from tests.store_factory import killed_at_second_write, make_store

TINY1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 2, "log_every": 1}


def _train_stage1(store, run_dir, seed=0):
    train_main(
        [
            "--stage",
            "1",
            "--store",
            store,
            "--run-dir",
            str(run_dir),
            "--val-clips",
            "3",
            "--no-progress",
            "--workers",
            "0",
            "--threads",
            "1",
            "--seed",
            str(seed),
            "--stage1",
            json.dumps(TINY1),
        ]
    )
    return run_dir / "stage1"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    store = str(root / "store.zarr")
    make_store(store, scenes=2, frames=33, variants=("orig", "hflip"), channel_chunk=16)  # 6 clips, 12 rows
    return store, _train_stage1(store, root / "run")


def _rollout(store, ckpt, *extra):
    return run(
        rollout_main,
        [
            "--checkpoint",
            str(ckpt),
            "--store",
            store,
            "--chunk-rows",
            "4",
            "--batch-size",
            "3",
            "--no-progress",
            *extra,
        ],
    )


def test_rollout_writes_every_variant_resumably_and_the_reader_returns_it(trained, monkeypatch, capsys):
    store_path, ckpt = trained
    with killed_at_second_write():
        assert _rollout(store_path, ckpt) == 130  # interrupted
    store = Store(store_path)
    assert not store.has_pred_features
    with pytest.raises(StoreError, match="rollout"):
        store.read_pred_features(0)

    written = []
    import inference.rollout

    real_store = inference.rollout.rollout_store

    def recording(*args, **kwargs):
        summary = real_store(*args, **kwargs)
        written.append(summary["written"])
        return summary

    monkeypatch.setattr(inference.rollout, "rollout_store", recording)
    _rollout(store_path, ckpt)
    assert written == [8]  # 12 rows in chunks of 4: the first chunk was recorded before the kill

    store = Store(store_path)
    stage1 = load_model(str(ckpt), ("stage1",))
    model, fingerprint = stage1.model, stage1.fingerprint
    assert store.has_pred_features and store.pred_features_fingerprint == fingerprint
    assert fingerprint == read_meta(latest_checkpoint(ckpt))["fingerprint"]
    g = store.geometry
    for i in range(len(store)):
        preds = []
        for v in range(store.num_variants):
            pred = store.read_pred_features(i, variant=v)
            assert pred.shape == (g.future_latents, *g.feature_hw, g.num_pca_channels) and pred.dtype == np.float16
            context = torch.from_numpy(store.read_features(i, variant=v)[:4]).float()[None]
            with torch.no_grad():
                expected = rollout(model, context, steps=3)[0].numpy()
            np.testing.assert_allclose(pred.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
            assert np.abs(pred).max() > 0
            preds.append(pred)
        assert not np.array_equal(preds[0], preds[1])  # each variant from its own features
    np.testing.assert_array_equal(store.read_pred_features(2, channels=16), store.read_pred_features(2)[..., :16])
    assert store.verify()["bad_rows"] == []  # the rollout's progress records leave the cache job's alone

    # another checkpoint's rollouts are refused unless --overwrite
    other = _train_stage1(store_path, ckpt.parent.parent / "other", seed=1)
    assert _rollout(store_path, other) == 1  # refused: the error names --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    written.clear()
    _rollout(store_path, other, "--overwrite")
    assert written == [12]
    assert Store(store_path).pred_features_fingerprint == load_model(str(other), ("stage1",)).fingerprint


def test_stage_all_trains_stage1_rolls_out_then_stage2_and_baseline(tmp_path):
    store = str(tmp_path / "store.zarr")
    make_store(store, scenes=3, frames=33, channel_chunk=16)  # 9 clips: 6 to train, 3 held out
    stage2 = {
        "model": {"size": "tiny", "dim": 48, "num_heads": 4, "adaln_lora_rank": 8},
        "batch_size": 2,
        "steps": 2,
        "log_every": 1,
        "sample_steps": 2,
        "sample_clips": 2,
    }
    stage1 = {**TINY1, "channels": 16}  # Stage 1 on the first 16 PCA channels, Stage 2 on all 64
    base = [
        "--store",
        store,
        "--run-dir",
        str(tmp_path / "run"),
        "--val-clips",
        "3",
        "--no-progress",
        "--workers",
        "0",
        "--threads",
        "1",
        "--stage1",
        json.dumps(stage1),
        "--stage2",
        json.dumps(stage2),
    ]
    with pytest.raises(StoreError, match="rollout"):  # Stage 2's mixed supervision needs the rollouts
        train_run(train_parse(["--stage", "2", *base]))
    results = train_run(train_parse(["--stage", "all", *base]))
    assert list(results) == ["stage1", "rollout", "stage2", "baseline"]
    assert results["rollout"][0]["rows"] == 9 and Store(store).has_pred_features
    assert Store(store).pred_features_fingerprint == results["stage1"]["fingerprint"]
    pred = Store(store).read_pred_features(0)
    assert np.abs(pred[..., :16]).max() > 0 and not pred[..., 16:].any()  # channels it did not predict are 0
    assert Store(store).group["clips/pred_features"].attrs["channels"] == 16
    s2, bl = results["stage2"], results["baseline"]
    assert {"loss", "sample_mse", "sample_mse_gt_features", "copy_last_mse"} <= set(s2["eval"])
    assert {"loss", "sample_mse", "copy_last_mse"} <= set(bl["eval"])
    meta1, meta2, metab = (read_meta(latest_checkpoint(tmp_path / "run" / s)) for s in ("stage1", "stage2", "baseline"))
    assert meta1["model_config"]["num_pca_channels"] == 16 and meta2["model_config"]["num_pca_channels"] == 64
    assert meta2["model_config"]["semantic"] and not metab["model_config"]["semantic"]
    assert meta2["data"]["with_pred"] and not metab["data"]["with_pred"]
    run_files = {p.name for p in (tmp_path / "run").iterdir()}
    assert run_files == {"stage1", "stage2", "baseline", "val_scenes.json"}  # and the scenes held out
