"""Checkpoints record the feature space they were trained in (PCA basis, encoders, geometry, channels), and
rollout, resume, evaluate and predict refuse a store of another space in one line naming both fingerprints;
a channel-prefix copy of the same basis stays accepted, and a checkpoint saved before the record is used
with a one-line warning."""

import json
import logging
import shutil

import pytest

from jobs.cli import run
from jobs.evaluate import main as evaluate_main
from jobs.predict import main as predict_main
from jobs.rollout import main as rollout_main
from jobs.train import main as train_main
from model.checkpoint import latest_checkpoint, read_meta
from pipeline.store.copy import copy_store
from pipeline.store.reader import Store
from tests.run_factory import write_runs
from tests.store_factory import make_store

STAGE1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 2, "log_every": 1}


def _train(store, run_dir, *extra):
    args = ["--stage", "1", "--store", store, "--run-dir", str(run_dir), "--channels", "32", "--val-clips", "3"]
    args += ["--no-progress", "--workers", "0", "--threads", "1", "--stage1", json.dumps(STAGE1), *extra]
    return run(train_main, args)


@pytest.fixture(scope="module")
def spaces(tmp_path_factory):
    """A store, one of the same frames under another PCA basis, a 32-channel prefix copy of the first, and a
    Stage 1 trained on the first's 32 channels."""
    root = tmp_path_factory.mktemp("space")
    a, b, prefix = str(root / "a.zarr"), str(root / "b.zarr"), str(root / "a32.zarr")
    make_store(a, scenes=2, frames=33, channel_chunk=16)
    make_store(b, scenes=2, frames=33, channel_chunk=16, basis_seed=1)
    copy_store(a, prefix, channels=32, progress=False)
    assert _train(a, root / "run") == 0
    return {"a": a, "b": b, "prefix": prefix, "stage1": root / "run" / "stage1", "root": root}


def _rollout(store, ckpt):
    return run(rollout_main, ["--checkpoint", str(ckpt), "--store", store, "--no-progress", "--threads", "1"])


def _one_line_naming_both_bases(err: str, a: str, b: str) -> bool:
    lines = [x for x in err.strip().splitlines() if not x.startswith("note: ")]  # e.g. random-weight encoders
    fa, fb = Store(a).pca_fingerprint[:12], Store(b).pca_fingerprint[:12]
    return len(lines) == 1 and lines[0].startswith("error: ") and fa in lines[0] and fb in lines[0]


def test_a_checkpoint_records_the_feature_space_it_was_trained_in(spaces):
    space = read_meta(latest_checkpoint(spaces["stage1"]))["feature_space"]
    store = Store(spaces["a"])
    assert space["pca.fingerprint"] == store.pca_fingerprint and space["channels"] == 32
    assert space["encoders.dinov2.sha256"] == store.manifest["encoders"]["dinov2"]["sha256"]
    assert space["encoders.vae.name"] == store.manifest["encoders"]["vae"]["name"]
    assert space["geometry.feature_dim"] == store.geometry.feature_dim
    assert space["latent_norm.std"] == store.manifest["latent_norm"]["std"]


def test_rollout_refuses_a_store_of_another_basis_and_writes_nothing_there(spaces, capsys):
    assert _rollout(spaces["b"], spaces["stage1"]) == 1
    assert _one_line_naming_both_bases(capsys.readouterr().err, spaces["a"], spaces["b"])
    assert Store(spaces["b"]).pred_features_fingerprint is None  # no clips/pred_features was created


def test_rollout_accepts_a_channel_prefix_copy_of_the_same_basis(spaces):
    assert Store(spaces["prefix"]).pca_fingerprint != Store(spaces["a"]).pca_fingerprint  # its own basis: a prefix
    assert _rollout(spaces["prefix"], spaces["stage1"]) == 0
    assert Store(spaces["prefix"]).has_pred_features


def test_a_checkpoint_saved_before_the_record_is_used_with_a_warning(spaces, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(latest_checkpoint(spaces["stage1"]), old)
    meta = read_meta(old)
    del meta["feature_space"]
    (old / "meta.json").write_text(json.dumps(meta))
    target = str(tmp_path / "b.zarr")
    shutil.copytree(spaces["b"], target)
    with caplog.at_level(logging.WARNING, logger="re2pix.checkpoint"):
        assert _rollout(target, old) == 0
    warned = [r.getMessage() for r in caplog.records if "records no feature space" in r.getMessage()]
    assert len(warned) == 1 and str(old) in warned[0] and "\n" not in warned[0]
    assert Store(target).has_pred_features


def test_resume_refuses_a_store_of_another_basis(spaces, capsys):
    before = latest_checkpoint(spaces["stage1"])
    assert _train(spaces["b"], spaces["root"] / "run", "--resume", "--steps", "4") == 1
    assert _one_line_naming_both_bases(capsys.readouterr().err, spaces["a"], spaces["b"])
    assert latest_checkpoint(spaces["stage1"]) == before  # nothing trained or saved


def test_evaluate_and_predict_refuse_a_store_of_another_basis(spaces, tmp_path, capsys, caplog):
    runs = write_runs(tmp_path / "runs", manifest=Store(spaces["a"]).manifest)
    models = ["--stage1", runs["stage1"], "--stage2", runs["stage2"], "--baseline", runs["baseline"]]
    common = ["--threads", "1", *models]
    evaluate = ["--no-decode", "--samples", "1", "--sample-steps", "1", "--no-progress", *common]
    out = str(tmp_path / "results.json")
    assert run(evaluate_main, ["--store", spaces["b"], "--out", out, *evaluate]) == 1
    assert _one_line_naming_both_bases(capsys.readouterr().err, spaces["a"], spaces["b"])
    assert run(predict_main, ["--store", spaces["b"], "--out", str(tmp_path / "predict"), *common]) == 1
    assert _one_line_naming_both_bases(capsys.readouterr().err, spaces["a"], spaces["b"])
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "predict").exists()
    # the store they were trained on (here: its 32-channel prefix copy would not do: they read 64)
    with caplog.at_level(logging.WARNING, logger="re2pix.checkpoint"):
        assert run(evaluate_main, ["--store", spaces["a"], "--out", out, "--max-clips", "1", *evaluate]) == 0
    assert not [r for r in caplog.records if "feature space" in r.getMessage()]
