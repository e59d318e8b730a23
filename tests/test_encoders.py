"""Encoders on tiny random configs of the real architectures (no weights can be downloaded here)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.encoders import EncoderWeightsError, load_dinov2, load_vae
from pipeline.store.geometry import TINY


@pytest.fixture(scope="module")
def dino():
    return load_dinov2("tiny")


@pytest.fixture(scope="module")
def vae():
    return load_vae("tiny")


def frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_dinov2_features_are_layernormed_patch_tokens_of_chosen_blocks(dino):
    x = frames(2, 144, 256)  # native size differs from the 112 x 196 input
    feats = dino(x)
    assert feats.shape == (2, *TINY.feature_hw, TINY.feature_dim) and feats.dtype == torch.float32

    # by hand: resize, ImageNet-normalize, HF hidden_states -> final layernorm -> drop CLS + 4 registers
    pv = F.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, size=(112, 196), mode="bilinear", antialias=True
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pv = (pv - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    m = dino.model
    with torch.no_grad():
        out = m(pixel_values=pv, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == 1 + 4  # embeddings + one per block
        torch.testing.assert_close(m.layernorm(hs[4]), out.last_hidden_state)  # hs[i] = block i, un-normed
        expected = torch.cat([m.layernorm(hs[i])[:, 5:] for i in (1, 2, 3, 4)], -1).reshape(2, 8, 14, 128)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats[..., :32], hs[1][:, 5:].reshape(2, 8, 14, 32))  # the layernorm matters


def test_dinov2_layer_choice_and_torch_input(dino):
    x = torch.from_numpy(frames(1, 112, 196, seed=1))
    full = dino(x)
    two = load_dinov2("tiny", layers=(2, 4))(x)
    assert two.shape == (1, 8, 14, 64)
    torch.testing.assert_close(two, torch.cat([full[..., 32:64], full[..., 96:128]], -1))
    with pytest.raises(ValueError, match="uint8"):
        dino(x.float())
    with pytest.raises(ValueError, match="block indices"):
        load_dinov2("tiny", layers=(0, 5))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        load_dinov2("tiny", input_hw=(112, 200))


def test_dinov2_interpolates_position_embeddings_to_a_non_square_grid(dino):
    emb = dino.model.embeddings
    assert emb.position_embeddings.shape[1] == 1 + 5 * 5  # trained on a square 5 x 5 grid
    assert emb.interpolate_pos_encoding(torch.zeros(1, 1 + 8 * 14, 32), 112, 196).shape == (1, 1 + 8 * 14, 32)


def test_dinov2_describe_and_deterministic_tiny_weights(dino):
    rng_state = torch.get_rng_state()
    again = load_dinov2("tiny")
    assert torch.equal(torch.get_rng_state(), rng_state)  # building the tiny preset leaves the global RNG alone
    d = dino.describe()
    assert d["sha256"] == again.describe()["sha256"]
    assert d["weights_id"] == "tiny" and d["config"]["hidden_size"] == 32 and d["revision"] is None
    assert d["feature_dim"] == TINY.feature_dim and d["patch_size"] == TINY.patch_size
    assert d["input_size"] == list(TINY.dino_input_hw) and d["layers"] == [1, 2, 3, 4]
    assert d["normalization"] == {"name": "imagenet", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    json.dumps(d)


def test_dinov2_loads_a_local_folder_and_a_cached_hub_id(dino, tmp_path):
    dino.model.save_pretrained(tmp_path / "folder")
    local = load_dinov2(str(tmp_path / "folder"), input_hw=(112, 196), layers=(1, 2, 3, 4))
    assert local.describe()["sha256"] == dino.describe()["sha256"]
    assert local.describe()["weights_id"] == str((tmp_path / "folder").resolve())
    # a hub id answered from a Hugging Face cache laid out as `hf download` leaves it
    repo, commit = tmp_path / "hub" / "models--acme--tiny-dino", "0123456789abcdef" * 2 + "01234567"
    dino.model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub = load_dinov2("acme/tiny-dino", (112, 196), (1, 2, 3, 4), cache_dir=str(tmp_path / "hub"))
    d = hub.describe()
    assert (d["weights_id"], d["revision"], d["sha256"]) == ("acme/tiny-dino", commit, dino.describe()["sha256"])
    x = frames(1, 50, 90, seed=2)
    torch.testing.assert_close(hub(x), dino(x))


def test_missing_weights_raise_and_say_what_to_set(tmp_path):
    with pytest.raises(EncoderWeightsError, match="/no/such/dinov2-reg.*--dinov2"):
        load_dinov2("/no/such/dinov2-reg")
    with pytest.raises(EncoderWeightsError, match="facebook/dinov2-with-registers-base.*hf download"):
        load_dinov2("facebook/dinov2-with-registers-base", cache_dir=str(tmp_path))
    with pytest.raises(EncoderWeightsError, match="/no/such/wan.*--vae"):
        load_vae("/no/such/wan")
    with pytest.raises(EncoderWeightsError, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers"):
        load_vae("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", cache_dir=str(tmp_path))
    with pytest.raises(EncoderWeightsError, match="could not load"):
        load_vae(str(tmp_path))  # exists, holds no VAE


def test_vae_latents_are_the_normalized_posterior_mean(vae):
    clip = np.random.default_rng(3).integers(0, 256, (1, 25, 120, 200, 3), dtype=np.uint8)
    z = vae(clip)
    assert z.shape == (1, *TINY.latents_shape) and z.dtype == torch.float32

    x = F.interpolate(
        torch.from_numpy(clip[0]).permute(0, 3, 1, 2).float() / 255, size=(96, 160), mode="bilinear", antialias=True
    )
    x = (x * 2 - 1).permute(1, 0, 2, 3)[None]  # [1, 3, 25, 96, 160] in [-1, 1]
    cfg = vae.vae.config
    with torch.no_grad():
        post = vae.vae.encode(x).latent_dist
    assert post.std.min() > 0  # a sample would differ from the mean
    mean, std = (torch.tensor(v).view(1, 16, 1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    torch.testing.assert_close(z, (post.mean - mean) / std, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae(clip[:, :24])


def test_vae_decode_unnormalizes_and_returns_uint8_frames(vae):
    z = torch.randn(1, 16, 2, 12, 20, generator=torch.Generator().manual_seed(4))
    out = vae.decode(z.numpy())
    assert out.shape == (1, 5, 96, 160, 3) and out.dtype == torch.uint8  # 2 latents -> 1 + 4 frames
    cfg = vae.vae.config
    raw = z * torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        ref = vae.vae.decode(raw).sample
    ref = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert (out.int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("spec", ["tiny", "tiny-wan2.2"])
def test_futures_after_one_context_decode_to_the_whole_clips_frames(spec):
    """An evaluation decodes the shared context once and each prediction's future from the decoder's kept state:
    the frames are exactly those of decoding the whole clip, for every future, in any order."""
    vae = load_vae(spec)
    g = torch.Generator().manual_seed(5)
    h, w = TINY.vae_input_hw[0] // vae.spatial_downsample, TINY.vae_input_hw[1] // vae.spatial_downsample
    context = torch.randn(2, vae.latent_channels, 2, h, w, generator=g)
    futures = [torch.randn(2, vae.latent_channels, 2, h, w, generator=g) for _ in range(3)]
    decode = vae.decode_after(context)
    for future in [futures[1], futures[0], futures[2], futures[1]]:
        assert torch.equal(decode(future), vae.decode(torch.cat([context, future], 2)))  # [2, 9, H, W, 3]
    vae.vae.enable_tiling()  # a decode that cannot resume decodes the whole clip instead, with the same result
    try:
        tiled = vae.decode_after(context)
        assert tiled.state is None and torch.equal(tiled(futures[0]), vae.decode(torch.cat([context, futures[0]], 2)))
    finally:
        vae.vae.disable_tiling()


def test_vae_describe_deterministic_tiny_and_local_folder(vae, tmp_path):
    d = vae.describe()
    assert d["sha256"] == load_vae("tiny").describe()["sha256"]
    assert d["weights_id"] == "tiny" and d["posterior"] == "mean" and d["input_size"] == list(TINY.vae_input_hw)
    assert len(d["latents_mean"]) == len(d["latents_std"]) == TINY.latent_channels == 16
    assert (d["spatial_downsample"], d["temporal_downsample"]) == (TINY.spatial_downsample, TINY.temporal_downsample)
    json.dumps(d)
    vae.vae.save_pretrained(tmp_path / "Wan-local" / "vae")  # a diffusers repo layout, VAE in vae/
    local = load_vae(str(tmp_path / "Wan-local"), input_hw=(96, 160))
    assert local.describe()["sha256"] == d["sha256"]
