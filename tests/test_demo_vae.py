"""The demo VAE presets (`--vae demo`, `--vae demo-predictive`): trained weights shipped in
pipeline/encoders/weights/."""

import json
import math

import numpy as np
import pytest

from pipeline.store.geometry import TINY

# scripts/train_demo_vae.py measured VAL_PSNR_DB (see weights/demo_wan_vae.json "training.val") on the
# synthetic val split at seed 0, scene-0000 and scene-0001, frames 0-24 and 24-48, posterior mean.
# The clip here is scene-0000 frames 0-24 of that set; 3 dB below the measurement leaves room for
# another torch build / CPU while still failing for random or wrongly loaded weights (~11-14 dB).
PSNR_MARGIN_DB = 3.0


SHIPPED = ("demo", "demo-predictive")


def stem(spec: str):
    from pipeline.encoders.vae import DEMO_VAES

    return DEMO_VAES[spec][0]


@pytest.fixture(scope="module", params=SHIPPED)
def demo(request):
    from pipeline.encoders import load_vae

    return load_vae(request.param)


@pytest.fixture(scope="module")
def val_clip():
    from pipeline.frames import resize_frames
    from pipeline.sources import get_source

    # the demo's val scenes (a scene depends on its length: 49 frames, as the training job renders them)
    src = get_source("synthetic", None, "val", num_scenes=1, frames_per_scene=49, seed=0)
    frames = np.stack([src.read_frame("scene-0000", f) for f in src.frames("scene-0000")[:25]])  # 144 x 256
    return frames, resize_frames(frames, TINY.vae_input_hw)


@pytest.mark.parametrize("spec", SHIPPED)
def test_demo_vae_record(spec):
    weights = stem(spec).with_suffix(".safetensors")
    assert weights.stat().st_size < 5e6
    meta = json.loads(stem(spec).with_suffix(".json").read_text())
    cfg = meta["config"]
    assert cfg["z_dim"] == 16 and len(cfg["latents_mean"]) == len(cfg["latents_std"]) == 16
    assert meta["training"]["steps"] > 0 and meta["training"]["val"]["psnr_db"] > 20


@pytest.mark.slow  # a whole evaluation / prediction run: 6-10 s alone
def test_demo_vae_encodes_to_unit_scale_and_reconstructs(demo, val_clip):
    frames, small = val_clip
    d = demo.describe()
    record = stem(d["weights_id"]).with_suffix(".json")
    assert d["weights_id"] in SHIPPED and d["input_size"] == [96, 160] and len(d["sha256"]) == 64
    assert demo.latents_std == json.loads(record.read_text())["config"]["latents_std"]
    z = demo(frames[None])  # native 144 x 256, resized inside as the cache job does
    assert tuple(z.shape) == (1, *TINY.latents_shape) == (1, 16, 7, 12, 20)
    per_channel = z.transpose(0, 1).reshape(16, -1)
    assert 0.3 < float(z.std()) < 3 and abs(float(z.mean())) < 1
    assert bool(((per_channel.std(1) > 0.1) & (per_channel.std(1) < 5)).all())
    rec = demo.decode(z)[0].numpy()
    assert rec.shape == (25, 96, 160, 3)
    mse = np.mean((rec.astype(np.float64) - small.astype(np.float64)) ** 2)
    psnr = 10 * math.log10(255**2 / mse)
    measured = json.loads(record.read_text())["training"]["val"]["psnr_per_clip"][0]
    assert psnr > measured - PSNR_MARGIN_DB, (psnr, measured)


def test_missing_demo_weights_say_how_to_make_them(tmp_path):
    from pipeline.encoders import EncoderWeightsError
    from pipeline.encoders.vae import demo_vae_model

    with pytest.raises(EncoderWeightsError, match="python scripts/train_demo_vae.py"):
        demo_vae_model(tmp_path / "demo_wan_vae")


def test_tiny_still_means_random_weights():
    from pipeline.encoders import load_vae

    d = load_vae("tiny").describe()
    assert d["weights_id"] == "tiny" and d["config"]["base_dim"] == 4
