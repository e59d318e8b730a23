"""jobs/train_dpt.py (inference/dpt_training.py): DPT heads trained on a store's features with the synthetic
source's classes and depth."""

import json

import numpy as np
import pytest

from inference import InferenceError
from inference.dpt import load_head
from pipeline.sources.synthetic import CLASSES
from pipeline.store.geometry import TINY
from tests.store_factory import make_store, synthetic_store


def config(tmp_path, **kw):
    from jobs.config import parse_config
    from jobs.train_dpt import TrainDPTConfig

    cfg, _ = parse_config(
        TrainDPTConfig,
        "train_dpt",
        ["--preset", "tiny", "--store", str(kw.pop("store")), "--out", str(tmp_path / "heads"), "--threads", "1"],
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_heads_train_on_the_sources_classes_and_depth_and_load_for_evaluation(tmp_path):
    from jobs.train_dpt import run_train_dpt

    store = synthetic_store(tmp_path / "train.zarr")
    val = synthetic_store(tmp_path / "val.zarr", split="val")
    s = run_train_dpt(config(tmp_path, store=store, val_store=str(val), epochs=6))
    assert s["classes"] == list(CLASSES)
    assert s["heads"]["seg"]["frames"] == s["heads"]["depth"]["frames"] == 2 * 7  # every feature frame of both clips
    seg, depth = load_head(s["heads"]["seg"]["path"], task="segmentation"), load_head(s["heads"]["depth"]["path"])
    assert seg.cfg.num_classes == len(CLASSES) and seg.cfg.in_dim == TINY.feature_dim // 4
    assert depth.cfg.task == "depth" and depth.cfg.num_classes == 16 and depth.cfg.depth_spacing == "log"
    for name in ("seg", "depth"):
        losses = s["heads"][name]["loss_per_epoch"]
        assert len(losses) == 6 and losses[-1] < losses[0]
        assert s["heads"][name]["steps"] == 6 * 2  # 14 frames in batches of 8
    assert 0 <= s["heads"]["seg"]["val"]["miou"] <= 1 and s["heads"]["depth"]["val"]["absrel"] > 0
    saved = json.loads((tmp_path / "heads" / "summary.json").read_text())
    assert saved["heads"]["seg"]["val"] == s["heads"]["seg"]["val"]


def test_depth_targets_are_log_bins_with_the_sky_ignored():
    from inference.dpt import DPTConfig
    from inference.dpt_training import IGNORE, targets

    cfg = DPTConfig.tiny("depth", num_classes=4, depth_min=1.0, depth_max=16.0)
    depth = np.array([[1.0, 2.5, 5.0], [15.9, 100.0, np.inf]], np.float32)
    y = targets([{"depth": depth, "seg": None}], "depth", (2, 3), cfg)[0]
    assert y.tolist() == [[0, 1, 2], [3, 3, IGNORE]]  # log2 bins of [1, 16]: [1, 2), [2, 4), [4, 8), [8, 16]


def test_refuses_stores_whose_source_has_no_ground_truth(tmp_path):
    from jobs.train_dpt import run_train_dpt

    make_store(tmp_path / "counting.zarr", scenes=1, frames=29)
    with pytest.raises(InferenceError, match="cannot read the labels|renders no ground truth"):
        run_train_dpt(config(tmp_path, store=tmp_path / "counting.zarr"))
    with pytest.raises(InferenceError, match="no depth"):
        run_train_dpt(config(tmp_path, store=tmp_path / "counting.zarr", labels="cityscapes"))
