"""The diffusion Stage 1: model/diffusion.py's EDM loss and sampler in the PCA feature space, a rollout
that samples, the same for a clip however it is batched, and the trainer + rollout job writing the
sampled features into the store."""

import json

import numpy as np
import pytest
import torch

from inference.stages import load_model
from jobs.rollout import main as rollout_main
from jobs.train import main as train_main
from model import diffusion
from model.checkpoint import latest_checkpoint, read_meta
from model.loop import read_metrics
from model.stage1 import rollout
from model.stage1_diffusion import DiffusionStage1Config, FeatureDiffusion, context_scale, training_loss
from pipeline.store.reader import Store
from tests.store_factory import make_store


def _moving_clips(n=2, seed=0):
    """Clips [n, 7, 8, 14, 16] whose frames move one token to the right per frame, with per-channel scales
    from 0.1 to 10 (PCA channels differ that much): the next frame follows from the context."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, 14, 16, generator=g) * torch.logspace(1, -1, 16)
    return torch.stack([torch.roll(base, shifts=t, dims=2) for t in range(7)], dim=1)


def _config(**kw):
    return DiffusionStage1Config.tiny(**{"num_pca_channels": 16, "dim": 48, "num_heads": 4, "sample_steps": 8, **kw})


def test_fresh_denoiser_outputs_zero_and_the_context_comes_back_unchanged():
    model = FeatureDiffusion(_config())
    clips = _moving_clips()
    x = clips[:, :5].permute(0, 4, 1, 2, 3)  # [B, C, 5, H, W]
    mask = (torch.arange(5) < 4)[None].expand(2, 5)
    assert torch.count_nonzero(model(x, torch.rand(2, 5), mask)) == 0  # F starts at 0
    sigma = torch.tensor([2.0, 3.0])
    d = diffusion.denoise(model, x, sigma, mask)
    torch.testing.assert_close(d[:, :, :4], x[:, :, :4], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected x"):
        model(x[:, :, :4], torch.rand(2, 4), mask[:, :4])


def test_context_scale_is_per_clip_and_channel_and_floored():
    clips = _moving_clips()
    clips[..., 3] = 0  # a channel that carries nothing (e.g. truncated)
    scale = context_scale(clips[:, :4])
    assert scale.shape == (2, 1, 1, 1, 16)
    direct = clips[:, :4].pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(scale[:, 0, 0, 0, 0], direct[:, 0])
    assert torch.allclose(scale[:, 0, 0, 0, 3], 1e-2 * direct.amax(dim=-1))


def test_sampling_is_the_same_for_a_clip_whatever_the_batch():
    torch.manual_seed(0)
    model = FeatureDiffusion(_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clips = _moving_clips(3)
    together = rollout(model, clips[:, :4], steps=3)
    alone = torch.cat([rollout(model, clips[i : i + 1, :4], steps=3) for i in range(3)])
    assert together.shape == (3, 3, 8, 14, 16)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rollout(model, clips[:, :4], steps=3), together, rtol=0, atol=0)
    assert (together[0] - together[1]).abs().max() > 1e-3  # other clips, other noise


def test_forecast_samples_makes_the_rollout_forecast_the_mean_of_that_many_samples():
    torch.manual_seed(0)
    one = FeatureDiffusion(_config()).eval()
    with torch.no_grad():
        for p in one.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mean4 = FeatureDiffusion(_config(forecast_samples=4)).eval()
    mean4.load_state_dict(one.state_dict())
    clips = _moving_clips(2)
    draws = one.samples(clips[:, :4], 4)  # [2, 4, H, W, C]: each clip's 4 noises in turn
    assert (draws[:, 0] - draws[:, 1]).abs().max() > 1e-3  # distinct samples: their mean is no single one
    torch.testing.assert_close(draws[:, 0], rollout(one, clips[:, :4], steps=1)[:, 0], rtol=0, atol=0)
    got = rollout(mean4, clips[:, :4], steps=2)  # [2, 2, H, W, C]
    torch.testing.assert_close(got[:, 0], draws.mean(dim=1), rtol=1e-5, atol=1e-5)
    window = torch.cat([clips[:, 1:4], got[:, :1]], dim=1)  # the next frame: from the mean forecast
    torch.testing.assert_close(got[:, 1], one.samples(window, 4).mean(dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="forecast_samples"):
        _config(forecast_samples=0)


@pytest.mark.slow
def test_the_loss_falls_and_the_sampled_forecast_beats_copying_the_last_frame():
    torch.manual_seed(0)
    clips = _moving_clips()
    model = FeatureDiffusion(_config(sample_steps=12))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(200):
        t = 4 + step % 3
        loss, _ = training_loss(model, clips[:, t - 4 : t], clips[:, t], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20]), (losses[:5], losses[-5:])
    model.eval()
    pred = rollout(model, clips[:, :4], steps=3)
    future = clips[:, 4:]
    mse = (pred - future).pow(2).mean().item()
    copy_last = (clips[:, 3:4] - future).pow(2).mean().item()
    assert mse < 0.5 * copy_last, (mse, copy_last)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stage1_diffusion") / "store.zarr"
    make_store(path, scenes=3, frames=33, channel_chunk=16)  # 9 clips: 6 to train, 3 held out
    return str(path)


def test_trainer_trains_it_and_the_rollout_job_writes_sampled_features(store, tmp_path):
    stage1 = {
        "diffusion": True,
        "channels": 16,
        "batch_size": 2,
        "steps": 3,
        "log_every": 1,
        "ckpt_every": 3,
        "model": {"size": "tiny", "dim": 48, "num_heads": 4},
        "sample_steps": 2,
    }
    assert (
        train_main(
            [
                "--stage",
                "1",
                "--store",
                store,
                "--run-dir",
                str(tmp_path),
                "--val-clips",
                "3",
                "--no-progress",
                "--workers",
                "0",
                "--threads",
                "1",
                "--stage1",
                json.dumps(stage1),
            ]
        )
        == 0
    )
    ckpt = latest_checkpoint(tmp_path / "stage1")
    meta = read_meta(ckpt)
    assert meta["task"] == "stage1_diffusion" and meta["model_config"]["sample_steps"] == 2
    evals = [r for r in read_metrics(tmp_path / "stage1") if r["kind"] == "eval"]
    assert {"loss", "mse", "cos", "t4/mse", "copy_last/mse"} <= set(evals[-1])
    assert (
        rollout_main(["--checkpoint", str(tmp_path / "stage1"), "--store", store, "--no-progress", "--batch-size", "4"])
        == 0
    )
    loaded = load_model(str(tmp_path / "stage1"), ("stage1_diffusion",))
    model, fingerprint = loaded.model, loaded.fingerprint
    assert isinstance(model, FeatureDiffusion)
    s = Store(store)
    assert s.has_pred_features and s.pred_features_fingerprint == fingerprint
    pred = s.read_pred_features(0)
    context = torch.from_numpy(s.read_features(0, channels=16)[:4]).float()[None]
    expected = rollout(model, context, steps=3)[0].numpy().astype(np.float16)
    np.testing.assert_allclose(pred[..., :16].astype(np.float32), expected.astype(np.float32), atol=2e-3, rtol=2e-3)
    assert not pred[..., 16:].any()
