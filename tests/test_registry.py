"""Frozen encoders and VAEs by registry: SigLIP-2, any transformers backbone, the Wan2.2 VAE; the clip
geometry derived from them; stores they make cached through jobs.cache and trained from."""

import json

import numpy as np
import pytest
import torch

from pipeline.encoders import EncoderWeightsError, derive_geometry, load_encoder, load_vae, parse_encoder_spec
from pipeline.store.format import IncompatibleStoresError
from pipeline.store.geometry import TINY
from pipeline.store.reader import open_stores
from tests.store_factory import ENCODERS, CountingSource, make_store

FRAMES = np.random.default_rng(0).integers(0, 256, (2, 72, 128, 3), dtype=np.uint8)


def test_specs_choose_the_kind_weights_and_layers():
    assert parse_encoder_spec("tiny") == parse_encoder_spec("dinov2:tiny")
    assert parse_encoder_spec("facebook/dinov2-with-registers-base").kind == "dinov2"
    s = parse_encoder_spec('{"kind": "hf", "weights": "/models/vit", "layers": [4, 8]}')
    assert (s.kind, s.weights, s.layers) == ("hf", "/models/vit", (4, 8))
    assert parse_encoder_spec("siglip2:google/siglip2-base-patch16-224").weights == "google/siglip2-base-patch16-224"
    for bad in ('{"kind": "clip", "weights": "x"}', '{"weights": "x", "layer": [1]}', "hf:", '{"kind": "hf"}'):
        with pytest.raises(EncoderWeightsError):
            parse_encoder_spec(bad)


def test_siglip2_tiny_gives_patch_features_that_fit_the_tiny_geometry():
    enc = load_encoder("siglip2:tiny", input_hw=TINY.dino_input_hw)
    f = enc(FRAMES)
    assert f.shape == (2, *TINY.feature_hw, TINY.feature_dim) and torch.isfinite(f).all()
    d = enc.describe()
    assert d["name"] == "siglip2" and d["layernorm"] == "post_layernorm"
    assert d["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert d["sha256"] == load_encoder("siglip2:tiny").describe()["sha256"]  # deterministic tiny weights
    assert d["sha256"] != load_encoder("tiny").describe()["sha256"]


def test_any_transformers_backbone_by_folder_with_chosen_layers(tmp_path):
    """A saved SigLIP vision tower loaded through the generic path gives the same blocks' features."""
    siglip = load_encoder("siglip2:tiny", input_hw=TINY.dino_input_hw)
    siglip.model.save_pretrained(tmp_path / "vit")
    (tmp_path / "vit" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    hf = load_encoder(
        json.dumps({"kind": "hf", "weights": str(tmp_path / "vit"), "layers": [2, 4]}), input_hw=TINY.dino_input_hw
    )
    full, two = siglip(FRAMES), hf(FRAMES)
    assert hf.feature_dim == 64 and hf.describe()["layers"] == [2, 4]
    torch.testing.assert_close(two, torch.cat([full[..., 32:64], full[..., 96:128]], -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(EncoderWeightsError):
        load_encoder(f"hf:{tmp_path / 'missing'}")


def test_wan22_vae_has_48_channels_at_16x_and_the_geometry_follows_it():
    vae = load_vae("tiny-wan2.2")
    clip = np.random.default_rng(1).integers(0, 256, (1, 9, 96, 160, 3), dtype=np.uint8)
    z = vae(clip)
    assert z.shape == (1, 48, 3, 6, 10) and vae.name == "wan2.2_vae"
    assert vae.describe()["latent_channels"] == 48 and vae.describe()["spatial_downsample"] == 16
    g = derive_geometry(TINY, load_encoder("tiny"), vae)
    assert g.latents_shape == (48, 7, 6, 10) and g.features_shape == TINY.features_shape
    assert derive_geometry(TINY, load_encoder("tiny"), load_vae("tiny")) == TINY  # WAN2.1: unchanged
    with pytest.raises(ValueError, match="temporal_downsample"):  # 25 frames do not fit an 8x temporal VAE
        TINY.for_encoders(
            patch_size=14, feature_dim=128, latent_channels=16, spatial_downsample=8, temporal_downsample=8
        )


def test_stores_of_two_encoders_are_refused_naming_the_encoder_field(tmp_path):
    siglip = {**ENCODERS, "dinov2": {**ENCODERS["dinov2"], "name": "siglip2"}}
    make_store(tmp_path / "a.zarr")
    make_store(tmp_path / "b.zarr", encoders=siglip)
    with pytest.raises(IncompatibleStoresError, match=r"encoders\.dinov2\.name differs") as e:
        open_stores([str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")])
    assert e.value.field == "encoders.dinov2.name"


# --- through the cache job (Ray) and the trainer ---------------------------------------------------------

SYNTH = {"num_scenes": 2, "frames_per_scene": 29, "height": 72, "width": 128}


def _cache(tmp_path_factory, name, **kw):
    from pipeline.cache import CacheConfig, run_cache

    out = tmp_path_factory.mktemp(name) / "store.zarr"
    run_cache(
        CacheConfig(
            **{
                "dataset": "synthetic",
                "source_options": SYNTH,
                "out": str(out),
                "geometry": "tiny",
                "encoder": "tiny",
                "vae": "tiny",
                "pca_frames": 64,
                "stride": 4,
                "unit_clips": 1,
                "channel_chunk": 16,
                "progress": False,
                "vae_threads": 1,
                **kw,
            }
        )
    )
    return str(out)


@pytest.fixture(scope="module")
def siglip_store(ray_address, tmp_path_factory):
    return _cache(tmp_path_factory, "siglip", encoder="siglip2:tiny")


@pytest.fixture(scope="module")
def wan22_store(ray_address, tmp_path_factory):
    return _cache(tmp_path_factory, "wan22", vae="tiny-wan2.2")


def _train(store, run_dir, stage, settings):
    from jobs.train import main as train_main

    key = "--stage1" if stage == "1" else "--stage2"
    rc = train_main(
        [
            "--stage",
            stage,
            "--store",
            store,
            "--run-dir",
            str(run_dir),
            "--val-clips",
            "1",
            "--no-progress",
            "--workers",
            "0",
            "--threads",
            "1",
            key,
            json.dumps(settings),
        ]
    )
    assert rc in (0, None)
    from model.loop import read_metrics

    sub = "stage1" if stage == "1" else "stage2"
    return [r for r in read_metrics(run_dir / sub) if r["kind"] == "train"]


@pytest.mark.slow
def test_a_siglip2_store_is_cached_named_and_trains_stage1(siglip_store, tmp_path):
    from pipeline.store.reader import Store

    store = Store(siglip_store)
    assert store.manifest["encoders"]["dinov2"]["name"] == "siglip2"
    assert store.geometry.feature_dim == 128 and len(store) == 4
    assert np.isfinite(store.read_clip(0).features).all()
    rows = _train(siglip_store, tmp_path, "1", {"model": "tiny", "batch_size": 2, "steps": 3, "log_every": 1})
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


@pytest.mark.slow
def test_a_wan22_store_has_48_latent_channels_and_trains_stage2(wan22_store, tmp_path):
    from pipeline.store.reader import Store

    store = Store(wan22_store)
    assert store.geometry.latent_channels == 48 and store.geometry.spatial_downsample == 16
    assert store.read_clip(0).latents.shape == (48, 7, 6, 10)
    assert store.manifest["encoders"]["vae"]["name"] == "wan2.2_vae"
    assert len(store.manifest["latent_norm"]["mean"]) == 48
    settings = {
        "model": {"size": "tiny", "dim": 48, "num_heads": 4, "adaln_lora_rank": 8},
        "batch_size": 2,
        "steps": 3,
        "log_every": 1,
        "pred_p": 0.0,
        "sample_steps": 2,
        "sample_clips": 1,
    }
    rows = _train(wan22_store, tmp_path, "2", settings)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    from model.checkpoint import latest_checkpoint, read_meta

    assert read_meta(latest_checkpoint(tmp_path / "stage2"))["model_config"]["latent_channels"] == 48


@pytest.mark.slow
def test_cached_stores_of_two_encoders_are_never_mixed(siglip_store, wan22_store):
    with pytest.raises(IncompatibleStoresError) as e:
        open_stores([wan22_store, siglip_store])
    assert e.value.field == "encoders.dinov2.name"
    assert "dinov2_with_registers" in str(e.value) and "siglip2" in str(e.value)


# --- a video backbone (V-JEPA 2): each feature frame from the window of scene frames ending at it -----------

VIDEO_GEOMETRY = {**TINY.to_dict(), "dino_input_hw": [112, 112]}  # V-JEPA 2 wants its square crop


class IndexedSource(CountingSource):
    """One scene of 29 frames whose frame i is a flat picture of value 8 i, so a window's frames say which."""

    def __init__(self):
        super().__init__(scenes=1, frames=29)

    def read_frame(self, scene, frame):
        if frame.index == 2 and getattr(self, "broken", False):
            raise OSError("truncated PNG")
        return np.full((16, 16, 3), 8 * frame.index, np.uint8)


def test_video_windows_end_at_each_feature_frame_and_repeat_the_scene_start():
    from pipeline.cache.read import read_unit
    from pipeline.clips import build_clip_index
    from pipeline.store.geometry import Geometry
    from pipeline.units import plan_units

    geometry = Geometry(**{k: tuple(v) if isinstance(v, list) else v for k, v in VIDEO_GEOMETRY.items()})
    source = IndexedSource()
    index = build_clip_index(source, geometry, stride=4, progress=False)  # clips at 0 and 4
    unit = plan_units(index, 1)[1]  # the clip at 4 owns only feature frame 28
    out = read_unit(plan_units(index, 1)[0], source, geometry, ["orig"], True, window=4)
    rows = json.loads(out["own_rows"])
    frames = out["dino_frames"][:, :, 0, 0, 0] // 8  # [feature frames, window] -> source frame index
    assert out["dino_frames"].shape == (7, 4, 112, 112, 3)
    assert frames.tolist() == [[0, 0, 0, 0]] + [[f - 3, f - 2, f - 1, f] for f in range(4, 25, 4)]
    assert [index.frames[r][1].index for r in rows] == list(range(0, 25, 4))
    later = read_unit(unit, source, geometry, ["orig"], True, window=4)
    assert (later["dino_frames"][:, :, 0, 0, 0] // 8).tolist() == [[25, 26, 27, 28]]
    # frame 2 is not in the clip at 4, but in the window of its feature frame 4 (owned by the other unit):
    # the clip fails in its own unit too, naming the frame, so no valid clip points at an unwritten row
    source.broken = True
    failures = json.loads(read_unit(unit, source, geometry, ["orig"], True, window=4)["failures"])
    assert [f["clip_id"] for f in failures] == [index.clips[1].clip_id]
    assert failures[0]["reason"] == "scene-00/0002.png: OSError: truncated PNG"


def test_vjepa2_tiny_features_see_the_whole_window():
    enc = load_encoder('{"kind": "vjepa2", "weights": "tiny", "window": 4}', input_hw=(112, 112))
    windows = np.random.default_rng(2).integers(0, 256, (2, 4, 72, 128, 3), dtype=np.uint8)
    f = enc(windows)
    assert f.shape == (2, 7, 7, 128) and enc.patch_size == 16 and enc.describe()["window"] == 4
    changed = windows.copy()
    changed[:, 0] = 0  # only the oldest frame differs
    assert not torch.allclose(enc(changed), f)
    with pytest.raises(ValueError, match="square"):
        load_encoder("vjepa2:tiny", input_hw=(112, 196))


@pytest.fixture(scope="module")
def video_store(ray_address, tmp_path_factory):
    return _cache(tmp_path_factory, "vjepa2", encoder="vjepa2:tiny", geometry=json.dumps(VIDEO_GEOMETRY))


@pytest.mark.slow
def test_a_video_backbone_store_is_cached_and_trains_stage1(video_store, tmp_path):
    from pipeline.store.reader import Store

    store = Store(video_store)
    d = store.manifest["encoders"]["dinov2"]
    assert d["name"] == "vjepa2" and d["window"] == 4 and store.geometry.feature_hw == (7, 7)
    assert store.read_clip(0).features.shape == (7, 7, 7, 64) and store.verify()["bad_rows"] == []
    rows = _train(video_store, tmp_path, "1", {"model": "tiny", "batch_size": 2, "steps": 3, "log_every": 1})
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_any_diffusers_video_vae_by_folder_sizes_the_geometry(tmp_path):
    """HunyuanVideo's causal VAE (tiny): channels and compression from the model, normalization from
    its scalar scaling_factor; a saved folder loads through the generic path to the same latents."""
    vae = load_vae("tiny-hunyuan", input_hw=(96, 160))
    clip = np.random.default_rng(1).integers(0, 256, (1, 9, 96, 160, 3), dtype=np.uint8)
    z = vae(clip)
    assert z.shape == (1, 16, 3, 12, 20) and vae.name == "diffusers:AutoencoderKLHunyuanVideo"
    assert vae.latents_std == [1 / vae.vae.config.scaling_factor] * 16 and vae.latents_mean == [0.0] * 16
    raw = vae.vae.encode(vae.preprocess(clip)).latent_dist.mean
    torch.testing.assert_close(z, raw * vae.vae.config.scaling_factor)
    assert vae.decode(z).shape == (1, 9, 96, 160, 3)
    vae.vae.save_pretrained(tmp_path / "hunyuan" / "vae")
    again = load_vae(f"diffusers:{tmp_path / 'hunyuan'}", input_hw=(96, 160))  # a repo folder with vae/
    torch.testing.assert_close(again(clip), z)
    assert again.describe()["sha256"] == vae.describe()["sha256"]
    assert derive_geometry(TINY, load_encoder("tiny"), vae).latents_shape == (16, 7, 12, 20)
    (tmp_path / "notvae").mkdir()
    (tmp_path / "notvae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(EncoderWeightsError, match="not a diffusers autoencoder"):
        load_vae(f"diffusers:{tmp_path / 'notvae'}")
