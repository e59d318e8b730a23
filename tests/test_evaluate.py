"""jobs/evaluate.py (the JSON schema, mean ± std over sampling runs, refusals) and the DPT heads."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from inference import InferenceError
from inference.dpt import (
    MOVING_CLASSES,
    DPTConfig,
    DPTHead,
    depth_metrics,
    load_head,
    miou,
    save_head,
    segmentation_confusion,
    split_blocks,
)
from tests.run_factory import MeanClip, MeanColour, write_runs
from tests.store_factory import make_store

# --------------------------------------------------------------------------- DPT heads


def test_dpt_paper_heads_map_dinov2_base_blocks_to_per_pixel_classes_and_depth_bins():
    # four 768-d DINOv2-B blocks on an h x w patch grid -> logits at the input's pixels (h, w x 14)
    blocks = [torch.randn(1, 768, 3, 4) for _ in range(4)]
    with torch.no_grad():
        seg = DPTHead(DPTConfig.paper("segmentation")).eval()(blocks)
        depth = DPTHead(DPTConfig.paper("depth")).eval()(blocks)
    assert seg.shape == (1, 19, 3 * 14, 4 * 14) and depth.shape == (1, 256, 3 * 14, 4 * 14)
    assert torch.isfinite(seg).all() and torch.isfinite(depth).all()


def test_dpt_head_shapes_and_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = DPTHead(DPTConfig.tiny("segmentation")).eval()
    feats = torch.randn(2, 8, 14, 4 * 32)  # [B, h, w, 4 blocks x 32]: the tiny DINOv2's features
    blocks = split_blocks(feats)
    assert [tuple(b.shape) for b in blocks] == [(2, 32, 8, 14)] * 4
    logits = head(blocks)
    assert logits.shape == (2, 19, 8 * 14, 14 * 14)  # the DINOv2 input resolution
    assert head.predict(blocks, size=(30, 50)).shape == (2, 30, 50)
    path = save_head(tmp_path / "seg.safetensors", head)
    again = load_head(path, task="segmentation")
    assert torch.equal(again(blocks), logits)
    with pytest.raises(InferenceError, match="not a depth"):
        load_head(path, task="depth")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InferenceError, match="not a re2pix DPT head"):
        load_head(tmp_path / "other.safetensors")


def test_depth_head_decodes_expected_bin_centre():
    cfg = DPTConfig.tiny("depth", num_classes=4, depth_min=1.0, depth_max=5.0, depth_spacing="linear")
    assert torch.allclose(cfg.bin_centres(), torch.tensor([1.5, 2.5, 3.5, 4.5]))
    log_cfg = DPTConfig.tiny("depth", num_classes=2, depth_min=1.0, depth_max=100.0)
    assert torch.allclose(log_cfg.bin_centres(), torch.tensor([10**0.5, 10**1.5]))
    head = DPTHead(cfg)
    with torch.no_grad():  # constant logits: the expectation is the mean centre
        head.scratch.output_conv2[-1].weight.zero_()
        head.scratch.output_conv2[-1].bias.zero_()
    out = head.predict(split_blocks(torch.randn(1, 8, 14, 128)))
    assert torch.allclose(out, torch.full_like(out, 3.0))


def test_segmentation_and_depth_metrics_known_values():
    label = torch.tensor([[0, 0, 1, 1], [11, 11, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [11, 12, 5, 2]])
    conf = segmentation_confusion(pred, label, 19)
    assert int(conf.sum()) == 7  # the 255 pixel is ignored
    # IoU: class 0 1/2, class 1 2/3, class 2 1, class 11 1/2, class 12 0/1
    assert math.isclose(miou(conf), (0.5 + 2 / 3 + 1 + 0.5 + 0) / 5)
    assert math.isclose(miou(conf, MOVING_CLASSES), (0.5 + 0) / 2)
    d = depth_metrics(torch.tensor([1.0, 2.0, 4.0, 9.0]), torch.tensor([1.0, 4.0, 4.0, 0.0]))
    assert float(d["count"]) == 3  # depth 0 is invalid
    assert math.isclose(float(d["absrel_sum"]) / 3, 0.5 / 3)
    assert math.isclose(float(d["delta1_sum"]) / 3, 2 / 3)


# --------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from pipeline.encoders import load_dinov2, load_vae

    root = tmp_path_factory.mktemp("evaluate")
    encoders = {"dinov2": load_dinov2("tiny").describe(), "vae": load_vae("tiny").describe()}
    make_store(root / "store.zarr", scenes=1, frames=29, encoders=encoders)  # 2 clips
    runs = write_runs(root / "runs", stage1_channels=64, stage2_channels=64)
    torch.manual_seed(1)
    save_head(root / "seg.safetensors", DPTHead(DPTConfig.tiny("segmentation")))
    save_head(root / "depth.safetensors", DPTHead(DPTConfig.tiny("depth", depth_min=1.0, depth_max=50.0)))
    (root / "labels").mkdir()
    (root / "depth").mkdir()
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 19, (48, 80)).astype(np.uint8)
    seg[:4] = 255
    Image.fromarray(seg).save(root / "labels" / "scene-00-000000.png")  # the second clip has no label
    for cid in ("scene-00-000000", "scene-00-000004"):
        np.save(root / "depth" / f"{cid}.npy", rng.uniform(1, 50, (48, 80)).astype(np.float32))
    torch.jit.script(MeanColour()).save(str(root / "inception.pt"))
    torch.jit.script(MeanClip()).save(str(root / "i3d.pt"))
    return root, runs


def config(setup, **kw):
    from jobs.evaluate import EvaluateConfig

    root, runs = setup
    values = dict(
        store=str(root / "store.zarr"),
        samples=2,
        sample_steps=2,
        threads=1,
        progress=False,
        out=str(root / "results.json"),
        **runs,
    )
    values.update(kw)
    return EvaluateConfig(**values)


@pytest.mark.slow  # a whole evaluation / prediction run: 6-10 s alone
def test_evaluation_json_schema_and_mean_std_over_runs(setup):
    from inference.evaluation import format_table
    from jobs.evaluate import run_evaluate

    root, _ = setup
    r = run_evaluate(
        config(
            setup,
            seg_head=str(root / "seg.safetensors"),
            labels=str(root / "labels"),
            depth_head=str(root / "depth.safetensors"),
            depth_labels=str(root / "depth"),
            fid_weights=str(root / "inception.pt"),
            fvd_weights=str(root / "i3d.pt"),
        )
    )
    on_disk = json.loads(
        (root / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")
    )
    assert on_disk == json.loads(json.dumps(r))
    assert {
        "schema",
        "store",
        "clips",
        "clip_ids",
        "samples",
        "models",
        "stage1",
        "reference",
        "sampler",
        "checkpoints",
        "skipped",
        "reference_metrics",
        "annotated_frame",
    } <= set(r)
    assert r["schema"] == "re2pix-evaluation/1" and r["clips"] == 2 and r["samples"] == 2
    assert r["reference"]["pixels"] == "vae_reconstruction" and "latents, not pixels" in r["reference"]["note"]
    assert set(r["models"]) == {"re2pix", "baseline", "copy_last"}
    for name, metrics in r["models"].items():
        want = {
            "latent_mse",
            "latent_mse/t4",
            "latent_mse/t6",
            "psnr",
            "ssim",
            "psnr/f13",
            "psnr/f24",
            "ssim/f13",
            "ssim/f24",
            "fid",
            "fvd",
            "seg/miou_all",
            "seg/miou_moving",
            "depth/absrel",
            "depth/delta1",
        }
        assert want <= set(metrics), (name, want - set(metrics))
        runs = 1 if name == "copy_last" else 2  # copying the last latent is deterministic: one run
        for key, v in metrics.items():
            assert len(v["runs"]) == runs, key
            assert math.isclose(v["mean"], np.mean(v["runs"]), rel_tol=1e-12, abs_tol=1e-12)
            if runs > 1:
                assert math.isclose(v["std"], np.std(v["runs"], ddof=1), rel_tol=1e-9, abs_tol=1e-12)
        if name != "copy_last":
            assert metrics["latent_mse"]["std"] > 0  # the runs differ: independent samples
        assert 0 <= metrics["seg/miou_all"]["mean"] <= 1 and 0 <= metrics["depth/delta1"]["mean"] <= 1
        assert metrics["fid"]["mean"] >= 0 and metrics["fvd"]["mean"] >= 0
    s1 = r["stage1"]
    assert {
        "mse",
        "cos",
        "t4/mse",
        "t6/cos",
        "mse@8",
        "cos@64",
        "copy_last/mse",
        "seg/miou_all",
        "depth/absrel",
        "t6/sharpness",
        "copy_last/sharpness",
        "copy_last/seg/miou_all",  # the head on the last context frame's features, the forecast's row to beat
    } <= set(s1)
    assert {"seg/miou_all", "depth/delta1"} <= set(r["reference_metrics"])
    assert "1 of 2 clips have no label" in r["skipped"]["seg_labels"]
    assert "fid" not in r["skipped"] and "fvd" not in r["skipped"]
    table = format_table(r)
    assert "re2pix" in table and "baseline" in table and "copy_last" in table and "±" in table and "fid" in table


def test_copy_last_is_scored_as_a_model_from_the_stored_latents(setup):
    from jobs.evaluate import run_evaluate
    from pipeline.store.reader import Store

    root, _ = setup
    r = run_evaluate(config(setup, decode=False, out=None))
    store = Store(str(root / "store.zarr"))
    latents = np.stack([store.read_latents(i) for i in range(len(store))]).astype(np.float64)
    want = ((latents[:, :, 3:4] - latents[:, :, 4:]) ** 2).mean()
    got = r["models"]["copy_last"]
    assert got["latent_mse"]["mean"] == pytest.approx(want, rel=1e-5) and got["latent_mse"]["std"] == 0
    per_t = [((latents[:, :, 3] - latents[:, :, t]) ** 2).mean() for t in (4, 5, 6)]
    assert [got[f"latent_mse/t{t}"]["mean"] for t in (4, 5, 6)] == pytest.approx(per_t, rel=1e-5)
    assert got["latent_mse"]["mean"] != r["models"]["re2pix"]["latent_mse"]["mean"]


def test_a_diffusion_stage1_is_evaluated_like_the_regression_one(setup, tmp_path):
    # the experiment's forecaster table conditions Re2Pix on each Stage 1, the diffusion one included
    from jobs.evaluate import run_evaluate
    from model.checkpoint import save_checkpoint
    from model.stage1_diffusion import DiffusionStage1Config, FeatureDiffusion
    from tests.run_factory import perturb

    model = perturb(FeatureDiffusion(DiffusionStage1Config.tiny(num_pca_channels=64, sample_steps=2)), 3)
    meta = {"task": "stage1_diffusion", "model_config": model.config.to_dict()}
    save_checkpoint(tmp_path / "stage1", 1, model=model, state={}, meta=meta)
    r = run_evaluate(config(setup, decode=False, out=None, stage1=str(tmp_path / "stage1"), samples=1))
    regression = run_evaluate(config(setup, decode=False, out=None, samples=1))
    assert r["checkpoints"]["stage1"]["task"] == "stage1_diffusion"
    assert r["stage1"]["t6/mse"] > 0 and r["stage1"]["t6/mse"] != regression["stage1"]["t6/mse"]
    assert r["stage1"]["copy_last/mse"] == regression["stage1"]["copy_last/mse"]


def test_truth_features_condition_re2pix_on_the_stores_future_features_whatever_stage1_forecasts(setup, tmp_path):
    # the experiment's upper-bound row: a perfect forecaster; the Stage 1 metrics still score the forecast
    from jobs.evaluate import run_evaluate
    from model.checkpoint import save_checkpoint
    from model.stage1_diffusion import DiffusionStage1Config, FeatureDiffusion
    from tests.run_factory import perturb

    model = perturb(FeatureDiffusion(DiffusionStage1Config.tiny(num_pca_channels=64, sample_steps=2)), 3)
    save_checkpoint(
        tmp_path / "stage1",
        1,
        model=model,
        state={},
        meta={"task": "stage1_diffusion", "model_config": model.config.to_dict()},
    )
    other = {"stage1": str(tmp_path / "stage1")}
    run = lambda features, **kw: run_evaluate(  # noqa: E731
        config(setup, decode=False, out=None, samples=1, baseline="", features=features, **kw)
    )
    truth, truth_other, forecast, forecast_other = (
        run("truth"),
        run("truth", **other),
        run("forecast"),
        run("forecast", **other),
    )
    mse = lambda r: r["models"]["re2pix"]["latent_mse"]["mean"]  # noqa: E731
    assert mse(truth) == mse(truth_other) and mse(forecast) != mse(forecast_other) and mse(truth) != mse(forecast)
    assert truth["features"] == "truth" and forecast["features"] == "forecast"
    assert truth_other["stage1"]["t6/mse"] == forecast_other["stage1"]["t6/mse"] != truth["stage1"]["t6/mse"]
    with pytest.raises(InferenceError, match="--features 'oracle'"):
        run("oracle")


@pytest.mark.slow  # four whole evaluations with decoding: about 25 s
def test_decode_cache_keeps_the_repeated_decodes_and_changes_no_number(setup, tmp_path):
    # the experiment's evaluations share the reconstruction and copy-last decodes through --decode-cache
    from jobs.evaluate import run_evaluate

    cache = tmp_path / "decoded"
    run = lambda **kw: run_evaluate(config(setup, out=None, samples=1, baseline="", **kw))  # noqa: E731
    plain, first = run(), run(decode_cache=str(cache))
    kept = sorted(cache.glob("*.npy"))
    assert len(kept) == 2 * plain["clips"]  # per clip: the reconstruction and copy-last
    stamps = [p.stat().st_mtime_ns for p in kept]
    again = run(decode_cache=str(cache))
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # read, not decoded again
    kept[0].write_bytes(b"not an array")  # a damaged file is decoded again, not trusted
    damaged = run(decode_cache=str(cache))
    for r in (first, again):
        assert r["models"] == plain["models"] and r["reference_metrics"] == plain["reference_metrics"]
    # the damaged clip decoded alone, not in its batch: the same frames up to the convolutions' rounding
    assert damaged["models"]["re2pix"]["psnr"]["mean"] == pytest.approx(plain["models"]["re2pix"]["psnr"]["mean"])
    assert kept[0].stat().st_size > 1000 and not list(cache.glob(".*.tmp"))


def test_refuses_fid_and_fvd_without_weights(setup):
    from jobs.evaluate import main, run_evaluate

    with pytest.raises(InferenceError, match="--fid-weights"):
        run_evaluate(config(setup, fid=True))
    with pytest.raises(InferenceError, match="--fvd-weights"):
        run_evaluate(config(setup, fvd=True))
    with pytest.raises(InferenceError, match="--fid-weights"):
        main(["--store", config(setup).store, "--fid"])


def test_skips_are_explained_and_results_do_not_depend_on_batch_size(setup, tmp_path):
    from jobs.evaluate import run_evaluate

    root, _ = setup
    a = run_evaluate(
        config(
            setup,
            decode=False,
            batch_size=1,
            baseline="",
            out=str(tmp_path / "a.json"),
            seg_head=str(root / "seg.safetensors"),
        )
    )
    assert set(a["models"]) == {"re2pix", "copy_last"} and "baseline" in a["skipped"]
    assert "no segmentation labels" in a["skipped"]["seg"] and "--labels" in a["skipped"]["seg"]
    assert "no --fid-weights" in a["skipped"]["fid"] and "--no-decode" in a["skipped"]["pixels"]
    assert a["reference"]["pixels"] is None and "psnr" not in a["models"]["re2pix"]
    b = run_evaluate(config(setup, decode=False, batch_size=2, baseline="", out=None))
    assert a["models"]["re2pix"]["latent_mse"] == b["models"]["re2pix"]["latent_mse"]
    assert a["stage1"]["mse"] == pytest.approx(b["stage1"]["mse"], rel=1e-6)


def test_cityscapes_labels_come_from_gtfine_of_the_annotated_frame(tmp_path):
    from inference.labels import Labels
    from jobs.evaluate import EvaluateConfig

    city = tmp_path / "gtFine" / "val" / "frankfurt"
    city.mkdir(parents=True)
    ids = np.array([[7, 26, 24], [0, 33, 23]], np.uint8)  # road, car, person | unlabeled, bicycle, sky
    # snippet frames 100..129: the clip starts at snippet frame 3 (103); clip frame 16 is frame 119
    Image.fromarray(ids).save(city / "frankfurt_000001_000119_gtFine_labelIds.png")
    labels = Labels(
        {"dataset": "cityscapes", "split": "val", "source_root": str(tmp_path)}, EvaluateConfig().annotated_frame
    )
    assert labels.has_seg and not labels.has_depth
    got = labels.seg("any", {"scene": "frankfurt_000001_000100", "start": 3})
    assert got.tolist() == [[0, 13, 11], [255, 18, 10]]
    assert labels.seg("any", {"scene": "frankfurt_000001_000100", "start": 4}) is None  # not annotated
    assert not Labels({"dataset": "synthetic"}, EvaluateConfig().annotated_frame).has_seg


def test_source_labels_are_the_synthetic_class_maps_of_the_annotated_frame():
    from inference import InferenceError
    from inference.labels import Labels
    from pipeline.sources import get_source
    from pipeline.sources.synthetic import CAR, PEDESTRIAN

    manifest = {
        "dataset": "synthetic",
        "split": "val",
        "source_root": "builtin:synthetic",
        "generator": {"num_scenes": 1, "frames_per_scene": 29},
    }
    labels = Labels(manifest, 16, "source", "source")
    assert labels.has_seg and labels.has_depth and labels.moving == (CAR, PEDESTRIAN)
    source = get_source("synthetic", split="val", num_scenes=1, frames_per_scene=29)
    scene = source.scenes()[0]
    want = source.read_targets(scene, source.frames(scene)[4 + 16])
    meta = {"scene": scene, "start": 4}
    assert np.array_equal(labels.seg("any", meta), want["classes"])
    assert np.array_equal(labels.depth("any", meta), want["depth"])
    with pytest.raises(InferenceError, match="labels from the source"):
        Labels({"dataset": "videos", "split": "val"}, 16, "source")
