"""PredGS (model/gaussian_splat.py): the renderer's gradients and what it renders, the Gaussian head in
Stage 1 (it learns, its config, old checkpoints), and its rollout through the jobs like any Stage 1."""

import json
import math

import numpy as np
import pytest
import torch

import inference.rollout
from inference.stages import load_model
from jobs.cli import run
from jobs.rollout import main as rollout_main
from jobs.train import main as train_main
from model.gaussian_splat import MIN_SCALE, GaussianHead, max_offset, render, scale_bounds
from model.ssim import l1_ssim, ssim
from model.stage1 import MaskedFeatureTransformer, Stage1Config, config_loss, rollout, stage1_batch
from pipeline.config import ConfigError, to_dict
from pipeline.store.reader import Store
from tests.store_factory import killed_at_second_write, make_store
from tests.test_stage1 import _translating_clips


def _gaussians(b, k, h, w, c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    offsets = (torch.rand(b, k, h, w, 2, generator=g, dtype=dtype) - 0.5) * 0.8
    log_scales = math.log(0.3) + torch.rand(b, k, h, w, 2, generator=g, dtype=dtype) * math.log(2.0)
    angles = torch.rand(b, k, h, w, generator=g, dtype=dtype) * math.pi
    amplitudes = torch.randn(b, k, h, w, c, generator=g, dtype=dtype)
    return offsets, log_scales, angles, amplitudes


@pytest.mark.parametrize("scale", [1, 2])
def test_render_gradients_match_finite_differences(scale):
    inputs = tuple(t.requires_grad_() for t in _gaussians(1, 2, 3, 4, 2))
    assert torch.autograd.gradcheck(lambda *x: render(*x, window=3, scale=scale), inputs)


def _dense_reference(offsets, log_scales, angles, amplitudes, scale):
    """The same Gaussians evaluated on every sample point of the map (no window) from their covariance
    matrices, then average-pooled to cells: [B, H, W, C]."""
    b, k, h, w, c = amplitudes.shape
    sub = (torch.arange(scale, dtype=torch.float64) + 0.5) / scale - 0.5
    ys = (torch.arange(h, dtype=torch.float64)[:, None] + sub).reshape(-1)
    xs = (torch.arange(w, dtype=torch.float64)[:, None] + sub).reshape(-1)
    points = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # [hs, ws, 2] as (y, x)
    out = torch.zeros(b, h * scale, w * scale, c, dtype=torch.float64)
    for bi, ki, y, x in np.ndindex(b, k, h, w):
        theta = angles[bi, ki, y, x]
        rot = torch.stack([torch.stack([theta.sin(), theta.cos()]), torch.stack([theta.cos(), -theta.sin()])])
        # columns: the Gaussian's u and v axes in (y, x) coordinates
        cov = rot @ torch.diag(torch.exp(2 * log_scales[bi, ki, y, x])) @ rot.T
        d = points - (torch.tensor([y, x], dtype=torch.float64) + offsets[bi, ki, y, x])
        q = torch.einsum("...i,ij,...j->...", d, torch.linalg.inv(cov), d)
        out[bi] += torch.exp(-0.5 * q)[..., None] * amplitudes[bi, ki, y, x]
    return out.reshape(b, h, scale, w, scale, c).mean(dim=(2, 4))


@pytest.mark.parametrize("scale", [1, 2])
def test_rendered_map_of_known_gaussians_matches_their_dense_sum(scale):
    # scales <= 0.6 and offsets <= 0.4 cells: a 7-cell window cuts each Gaussian beyond 5 sigma
    gaussians = _gaussians(2, 2, 5, 6, 3, seed=1)
    expected = _dense_reference(*gaussians, scale)
    torch.testing.assert_close(render(*gaussians, window=7, scale=scale), expected, atol=1e-4, rtol=0)
    # a window of 3 cuts them at about 2 sigma: the tails it drops are what the dense sum has more
    assert (render(*gaussians, window=3, scale=scale) - expected).abs().max() > 1e-3


def test_one_narrow_gaussian_per_cell_reproduces_the_amplitudes():
    b, h, w, c = 2, 4, 5, 3
    amplitudes = torch.randn(b, 1, h, w, c)
    offsets = torch.zeros(b, 1, h, w, 2)
    log_scales = torch.full((b, 1, h, w, 2), math.log(MIN_SCALE))
    angles = torch.rand(b, 1, h, w)
    torch.testing.assert_close(render(offsets, log_scales, angles, amplitudes, window=5), amplitudes[:, 0])


def test_head_starts_at_zero_with_distinct_gaussians_and_keeps_them_in_bounds():
    head = GaussianHead(dim=8, channels=3, per_token=4, window=5, scale=2)
    tokens = torch.randn(2, 3, 4, 8)
    assert torch.equal(head(tokens), torch.zeros(2, 3, 4, 3))
    offsets, log_scales, _, _ = head.gaussians(tokens)
    assert len({tuple(o.tolist()) for o in offsets[0, :, 0, 0]}) == 4  # K start points, not one
    with torch.no_grad():  # huge raw parameters: the bounds hold
        head.geometry.weight.normal_(std=100.0)
    offsets, log_scales, _, _ = head.gaussians(tokens)
    lo, hi = scale_bounds(5)
    assert offsets.abs().max() <= max_offset(5)
    assert math.log(lo) - 1e-6 <= log_scales.min() and log_scales.max() <= math.log(hi) + 1e-6


def test_ssim_is_one_for_equal_maps_and_l1_ssim_weighs_as_pdr():
    a = torch.randn(2, 8, 14, 5)
    b = a + 0.5 * torch.randn(2, 8, 14, 5)
    torch.testing.assert_close(ssim(a, a), torch.ones(2))
    assert (ssim(a, b) < 0.9).all()
    expected = 0.8 * (a - b).abs().mean() + 0.2 * (1 - ssim(a, b).mean())
    torch.testing.assert_close(l1_ssim(a, b), expected)


def test_predgs_stage1_overfits_one_batch():
    cfg = Stage1Config.tiny(dim=48, head="gaussian", loss="l1_ssim")
    clips = _translating_clips(2, 7, cfg.feature_hw, cfg.num_pca_channels, seed=0)  # [2, 7, H, W, C]
    context, target = stage1_batch(clips, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = MaskedFeatureTransformer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(40):
        step_loss = config_loss(cfg, model(context), target)
        opt.zero_grad()
        step_loss.backward()
        opt.step()
        losses.append(step_loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_config_checks_and_checkpoints_saved_before_load_as_linear_smooth_l1():
    saved = to_dict(Stage1Config.tiny())
    for new in ("head", "loss", "gaussians_per_token", "render_window", "render_scale", "ssim_weight"):
        saved.pop(new)
    old = Stage1Config.from_dict(saved)
    assert (old.head, old.loss) == ("linear", "smooth_l1")
    assert isinstance(MaskedFeatureTransformer(old).output_proj, torch.nn.Linear)
    for bad in ({"head": "splat"}, {"loss": "l2"}, {"render_window": 4}, {"render_scale": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Stage1Config.from_dict({**saved, **bad})
    from model.stage1_diffusion import DiffusionStage1Config

    with pytest.raises(ConfigError, match="not diffusion"):
        DiffusionStage1Config.tiny(head="gaussian")


def test_a_bad_head_flag_is_one_line(capsys):
    assert run(train_main, ["--print-config", "--stage1.model.head", "splats"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "head" in err and "gaussian" in err and "\n" not in err


@pytest.fixture(scope="module")
def predgs_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predgs")
    store = str(root / "store.zarr")
    make_store(store, scenes=2, frames=33, channel_chunk=16)  # 6 clips
    stage1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 2, "log_every": 1}
    argv = ["--stage", "1", "--store", store, "--run-dir", str(root / "run"), "--val-clips", "3", "--no-progress"]
    argv += ["--workers", "0", "--threads", "1", "--stage1", json.dumps(stage1)]
    argv += ["--stage1.model.head", "gaussian", "--stage1.model.loss", "l1_ssim"]
    assert train_main(argv) == 0
    return store, root / "run" / "stage1"


def test_predgs_rollout_writes_pred_features_and_resumes(predgs_run, monkeypatch):
    store_path, ckpt = predgs_run
    argv = ["--checkpoint", str(ckpt), "--store", store_path, "--chunk-rows", "2", "--batch-size", "2", "--no-progress"]
    with killed_at_second_write():
        assert run(rollout_main, argv) == 130
    assert not Store(store_path).has_pred_features
    written = []
    real_store = inference.rollout.rollout_store

    def recording(*args, **kwargs):
        written.append(real_store(*args, **kwargs))
        return written[-1]

    monkeypatch.setattr(inference.rollout, "rollout_store", recording)
    assert run(rollout_main, argv) == 0
    assert [summary["written"] for summary in written] == [4]  # 6 rows in chunks of 2: the first was kept

    stage1 = load_model(str(ckpt), ("stage1",))
    assert isinstance(stage1.model.output_proj, GaussianHead) and stage1.model.config.loss == "l1_ssim"
    store = Store(store_path)
    assert store.has_pred_features and store.pred_features_fingerprint == stage1.fingerprint
    for i in range(len(store)):
        pred = store.read_pred_features(i)
        context = torch.from_numpy(store.read_features(i)[:4]).float()[None]
        with torch.no_grad():
            expected = rollout(stage1.model, context, steps=3)[0].numpy()
        assert pred.shape == expected.shape and np.abs(pred).max() > 0
        np.testing.assert_allclose(pred.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
