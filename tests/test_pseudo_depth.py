"""The pseudo-depth target: Depth Anything V2 in the cache job (--pseudo-depth, a tiny random-weight model saved
like a checkpoint), frames/pseudo_depth in the store (verify, resume, copy) and the depth head trained on it."""

import shutil

import numpy as np
import pytest
import zarr

from pipeline.store.format import PSEUDO_DEPTH
from pipeline.store.geometry import TINY
from pipeline.store.reader import Store

SCALE = 4  # the default --pseudo-depth-scale
DEPTH_HW = (TINY.feature_hw[0] * SCALE, TINY.feature_hw[1] * SCALE)


def save_tiny_depth_anything(folder) -> str:
    """A Depth Anything V2 architecture with small random weights, saved as a hub checkpoint is. The head's
    weights are scaled up: at their initial scale its ReLU output is ~1e-7, which float16 stores as zeros."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
        reassemble_hidden_size=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DepthAnythingForDepthEstimation(config)
        with torch.no_grad():
            for p in model.head.parameters():
                p.normal_(0, 0.5)
            model.head.conv3.bias.fill_(1.0)
    model.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def depth_model(tmp_path_factory):
    return save_tiny_depth_anything(tmp_path_factory.mktemp("depth-anything"))


def job(out, **kw):
    """The cache job of the `cached` store: tiny, both variants (frame row 2f+v, v=1 the flipped frame)."""
    from tests.test_cache import tiny_config

    return tiny_config(out, flip=True, **kw)


@pytest.fixture(scope="module")
def cached(ray_address, depth_model, tmp_path_factory):
    from pipeline.cache import run_cache

    out = tmp_path_factory.mktemp("pseudo-depth") / "store.zarr"
    run_cache(job(out, pseudo_depth=depth_model))
    return out


# ---- fast: the model and the labels, no cluster ---------------------------------------------------
def test_the_model_gives_relative_disparity_at_the_stored_size_and_is_hashed(depth_model):
    from pipeline.encoders import load_pseudo_depth

    frames = np.random.default_rng(0).integers(0, 256, (3, 72, 128, 3), dtype=np.uint8)
    model = load_pseudo_depth(depth_model, TINY.dino_input_hw, DEPTH_HW)
    d = model(frames)
    assert tuple(d.shape) == (3, *DEPTH_HW) and bool((d >= 0).all()) and float(d.std()) > 0
    desc = model.describe()
    assert desc["name"] == "depth_anything" and desc["input_size"] == list(TINY.dino_input_hw)
    assert desc["sha256"] == load_pseudo_depth(depth_model, (100, 190), DEPTH_HW).describe()["sha256"]
    assert load_pseudo_depth(depth_model, (100, 190), DEPTH_HW).input_hw == (98, 196)  # whole 14-pixel patches


def test_missing_weights_say_what_to_set(tmp_path):
    from pipeline.encoders import EncoderWeightsError, load_pseudo_depth

    with pytest.raises(EncoderWeightsError, match="not in the local Hugging Face cache.*--pseudo-depth"):
        load_pseudo_depth("depth-anything/Depth-Anything-V2-Small-hf", (112, 196), DEPTH_HW, cache_dir=tmp_path)
    with pytest.raises(EncoderWeightsError, match="does not exist.*--pseudo-depth"):
        load_pseudo_depth(str(tmp_path / "nowhere"), (112, 196), DEPTH_HW)


def test_pseudo_depth_labels_are_per_frame_normalized_disparity_in_linear_bins():
    from inference.dpt import DPTConfig
    from inference.dpt_training import targets
    from inference.labels import normalized_disparity

    disparity = np.array([[2.0, 4.0, 5.9], [6.0, 7.9, 10.0]], np.float16)  # any scale and shift
    x = normalized_disparity(disparity)
    np.testing.assert_allclose(x, [[0, 0.25, 0.4875], [0.5, 0.7375, 1.0]], atol=1e-3)
    np.testing.assert_allclose(normalized_disparity(3 * disparity + 7), x, atol=2e-3)
    cfg = DPTConfig.tiny("depth", num_classes=4, depth_min=0.0, depth_max=1.0, depth_spacing="linear")
    y = targets([{"depth": x, "seg": None}], "depth", (2, 3), cfg)[0]
    assert y.tolist() == [[0, 1, 1], [2, 2, 3]]  # [0, .25), [.25, .5), [.5, .75), [.75, 1]


def test_cache_refuses_a_bad_scale_before_anything_runs(tmp_path):
    from pipeline.cache import run_cache
    from pipeline.errors import Re2pixError
    from tests.test_cache import tiny_config

    with pytest.raises(Re2pixError, match="pseudo-depth-scale"):
        run_cache(tiny_config(tmp_path / "s.zarr", pseudo_depth="anything", pseudo_depth_scale=0))
    assert not (tmp_path / "s.zarr").exists()


# ---- the cache job and the store --------------------------------------------------------------------
def test_the_cache_job_stores_the_disparity_of_every_feature_frame(cached, depth_model):
    from pipeline.clips import build_clip_index
    from pipeline.encoders import load_pseudo_depth
    from pipeline.frames import hflip, resize_frames
    from pipeline.sources import get_source
    from tests.test_cache import SYNTH

    store = Store(str(cached))
    entry = store.manifest["pseudo_depth"]
    model = load_pseudo_depth(depth_model, TINY.dino_input_hw, DEPTH_HW)
    assert entry["scale"] == SCALE and entry["shape"] == list(DEPTH_HW) and entry["array"] == PSEUDO_DEPTH
    assert entry["model"]["sha256"] == model.describe()["sha256"] and "disparity" in entry["target"]
    assert "pseudo_depth" not in store.manifest["encoders"]  # a target: no part of the features' compatibility
    assert store.has_pseudo_depth and store.read_pseudo_depth(3).shape == (7, *DEPTH_HW)
    source = get_source("synthetic", None, "train", **SYNTH)
    index = build_clip_index(source, TINY, stride=4, progress=False)
    for f in (0, 9):  # frames of both scenes, written by different work units
        scene, ref = index.frames[f]
        frame = resize_frames(source.read_frame(scene, ref)[None], TINY.dino_input_hw)
        for row, want in ((2 * f, model(frame)[0]), (2 * f + 1, model(hflip(frame))[0])):
            got = store.read_pseudo_depth_row(row).astype(np.float32)
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-3, atol=2e-3)
    # clip 1 (scene 0 from frame 4) starts on feature frame 1: its flipped variant on row 3
    np.testing.assert_array_equal(store.read_pseudo_depth(1, variant=1)[0], store.read_pseudo_depth_row(3))
    report = store.verify()
    assert report["ok"] and report["checked"][PSEUDO_DEPTH] == 32 and report["rows_without_digest"] == 0
    assert "pseudo-depth" in (cached / "README.md").read_text()


def test_verify_catches_a_changed_or_missing_pseudo_depth_chunk(cached, tmp_path):
    from pipeline.store.format import DamagedStoreError

    damaged = tmp_path / "store.zarr"
    shutil.copytree(cached, damaged)
    chunks = damaged / "frames" / "pseudo_depth" / "c"
    chunk = chunks / "5" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    (chunks / "11" / "0" / "0").unlink()
    report = Store(str(damaged)).verify()
    bad = {(b["array"], b["row"]): b["reason"] for b in report["bad_rows"]}
    assert set(bad) == {(PSEUDO_DEPTH, 5), (PSEUDO_DEPTH, 11)}
    assert "checksum" in bad[(PSEUDO_DEPTH, 5)] and "NaN" in bad[(PSEUDO_DEPTH, 11)]
    with pytest.raises(DamagedStoreError, match=r"pseudo_depth\[11\]"):
        Store(str(damaged)).read_pseudo_depth_row(11)


def test_a_store_whose_manifest_and_array_disagree_is_refused(cached, tmp_path):
    from pipeline.store.format import StoreError

    forged = tmp_path / "store.zarr"
    shutil.copytree(cached, forged)
    g = zarr.open_group(str(forged), mode="r+")
    g.attrs["pseudo_depth"] = {**g.attrs["pseudo_depth"], "scale": 2}
    with pytest.raises(StoreError, match="pseudo_depth has shape"):
        Store(str(forged))
    g.attrs["pseudo_depth"] = {**g.attrs["pseudo_depth"], "scale": 10**9}
    with pytest.raises(StoreError, match="pseudo-depth scale must be"):
        Store(str(forged))


def test_an_interrupted_job_resumes_its_pseudo_depth(cached, depth_model, tmp_path):
    """A store left unfinished with one unit undone (marker and rows gone) is finished by a rerun, to the same maps."""
    from pipeline.cache import run_cache
    from pipeline.errors import Re2pixError

    killed = tmp_path / "store.zarr"
    shutil.copytree(cached, killed)
    g = zarr.open_group(str(killed), mode="r+")
    g.attrs["complete"] = False
    (killed / "progress" / "unit-000002.json").unlink()  # scene 1's first clip: it owns frames 8..14, rows 16..29
    for row in range(16, 30):
        (killed / "frames" / "pseudo_depth" / "c" / str(row) / "0" / "0").unlink()
    with pytest.raises(Re2pixError, match="pseudo_depth"):  # a rerun without the option does not resume it
        run_cache(job(killed))
    run_cache(job(killed, pseudo_depth=depth_model))
    resumed, original = Store(str(killed)), Store(str(cached))
    assert resumed.verify()["ok"]
    for row in range(32):
        np.testing.assert_array_equal(resumed.read_pseudo_depth_row(row), original.read_pseudo_depth_row(row))


def test_a_rerun_of_a_finished_store_with_other_pseudo_depth_settings_is_refused(cached, depth_model):
    from pipeline.cache import run_cache
    from pipeline.errors import Re2pixError

    assert run_cache(job(cached, pseudo_depth=depth_model))["already_complete"]
    with pytest.raises(Re2pixError, match="other settings"):
        run_cache(job(cached))
    with pytest.raises(Re2pixError, match="other settings"):
        run_cache(job(cached, pseudo_depth=depth_model, pseudo_depth_scale=2))


def test_a_copy_carries_the_pseudo_depth(cached, tmp_path):
    from pipeline.store.copy import copy_store

    copy_store(str(cached), str(tmp_path / "copy.zarr"), channels=16, progress=False)
    copy, original = Store(str(tmp_path / "copy.zarr")), Store(str(cached))
    report = copy.verify()
    assert report["ok"] and report["checked"][PSEUDO_DEPTH] == 32 and report["rows_without_digest"] == 0
    np.testing.assert_array_equal(copy.read_pseudo_depth(2, variant=1), original.read_pseudo_depth(2, variant=1))


def test_the_depth_head_trains_on_the_stores_pseudo_depth(cached, tmp_path):
    from inference.dpt import load_head
    from jobs.train_dpt import run_train_dpt
    from tests.test_train_dpt import config

    s = run_train_dpt(
        config(tmp_path, store=cached, labels="source", depth_labels="pseudo-depth", epochs=1, warmup_epochs=1)
    )
    seg, depth = s["heads"]["seg"], s["heads"]["depth"]
    assert (seg["labels"], depth["labels"]) == ("source", "pseudo-depth")
    assert depth["frames"] == 4 * 7 and depth["steps"] == 4  # every feature frame of the 4 clips, batches of 8
    assert len(depth["loss_per_epoch"]) == 1 and np.isfinite(depth["loss_per_epoch"][0])
    assert 0 < depth["train_frames"]["delta1"] <= 1
    head = load_head(depth["path"], task="depth")
    assert (head.cfg.depth_min, head.cfg.depth_max, head.cfg.depth_spacing) == (0.0, 1.0, "linear")
    assert (tmp_path / "heads" / "summary.json").is_file()


def test_evaluation_scores_depth_against_the_annotated_frames_normalized_pseudo_depth(cached):
    from inference import InferenceError
    from inference.labels import Labels, normalized_disparity

    store = Store(str(cached))
    labels = Labels(store.manifest, 16, None, "pseudo-depth", store)
    meta = store.clip_meta(2, variant=1)
    got = labels.depth(meta["clip_id"], meta)  # frame 16: the clip's feature frame 4
    np.testing.assert_array_equal(got, normalized_disparity(store.read_pseudo_depth(2, variant=1)[4]))
    assert labels.has_depth and got.shape == DEPTH_HW and (got.min(), got.max()) == (0, 1)
    assert labels.depth("no-such-clip", meta) is None
    with pytest.raises(InferenceError, match="no feature frame"):
        Labels(store.manifest, 15, None, "pseudo-depth", store)


def test_train_dpt_refuses_pseudo_depth_that_is_not_there(tmp_path):
    from inference import InferenceError
    from inference.labels import Labels
    from jobs.train_dpt import run_train_dpt
    from tests.store_factory import synthetic_store
    from tests.test_train_dpt import config

    store = synthetic_store(tmp_path / "plain.zarr")
    with pytest.raises(InferenceError, match="holds no pseudo-depth"):
        run_train_dpt(config(tmp_path, store=store, labels="pseudo-depth", tasks="depth"))
    with pytest.raises(InferenceError, match="no classes"):
        run_train_dpt(config(tmp_path, store=store, labels="pseudo-depth"))
    with pytest.raises(InferenceError, match="holds none"):
        Labels(Store(str(store)).manifest, 16, None, "pseudo-depth", Store(str(store)))
