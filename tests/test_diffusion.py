"""EDM preconditioning, loss, sigma sampling, nested dropout, mixed supervision, sampler."""

import functools
import math

import pytest
import torch

from model.diffusion import (
    CONTEXT_C_NOISE,
    MISSING_PRED_FEATURES,
    denoise,
    karras_sigmas,
    loss_weight,
    mix_features,
    nested_dropout,
    nested_dropout_choices,
    precondition,
    sample,
    sample_sigma,
    training_loss,
    truncate_features,
)
from model.stage2 import DiTConfig, Re2PixDiT

SIGMAS = torch.tensor([0.005, 0.3, 1.0, 4.0, 80.0, 250.0, 1e5])


class IdealVelocity(torch.nn.Module):
    """Returns F = eps - z for known z and eps, and records what it was given."""

    def __init__(self, z, eps, context_out=None):
        super().__init__()
        self.z, self.eps, self.context_out = z, eps, context_out
        self.calls = []

    def forward(self, x_in, c_noise, context_mask, features):
        self.calls.append((x_in.clone(), c_noise.clone(), context_mask.clone()))
        out = self.eps - self.z
        if self.context_out is not None:  # garbage on the context frames
            out = torch.where(context_mask[:, None, :, None, None], self.context_out, out)
        return out


def _clip(b=None, seed=0):
    b = len(SIGMAS) if b is None else b
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 7, 4, 6, generator=g), torch.randn(b, 16, 7, 4, 6, generator=g)


def test_preconditioning_coefficients():
    pre = precondition(SIGMAS)
    t = SIGMAS / (1 + SIGMAS)
    torch.testing.assert_close(pre["c_skip"], 1 - t)
    torch.testing.assert_close(pre["c_in"], 1 - t)
    torch.testing.assert_close(pre["c_out"], -t)
    torch.testing.assert_close(pre["c_noise"], t)
    torch.testing.assert_close(loss_weight(SIGMAS), (1 + SIGMAS) ** 2 / SIGMAS**2)
    torch.testing.assert_close(loss_weight(SIGMAS) * t**2, torch.ones_like(t))


def test_ideal_velocity_makes_the_denoiser_exact_and_the_loss_zero():
    z, eps = _clip()
    model = IdealVelocity(z, eps)
    loss, logs = training_loss(model, z, None, sigma=SIGMAS, noise=eps)
    assert loss.item() < 1e-8
    assert logs["loss_per_sample"].shape == (len(SIGMAS),)
    mask = (torch.arange(7) < 4)[None].expand(len(SIGMAS), 7)
    x = z + torch.where(mask[:, None, :, None, None], 0.0, SIGMAS.view(-1, 1, 1, 1, 1) * eps)
    d = denoise(model, x, SIGMAS, mask)
    torch.testing.assert_close(d, z, atol=1e-4, rtol=1e-4)
    # the network sees c_in * x = (1 - t) z + t eps on the future frames
    x_in = model.calls[-1][0]
    t = (SIGMAS / (1 + SIGMAS)).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x_in[:, :, 4:], ((1 - t) * z + t * eps)[:, :, 4:], atol=1e-4, rtol=1e-4)


def test_weighted_loss_is_velocity_mse_on_future_frames_only():
    z, eps = _clip(seed=1)
    g = torch.Generator().manual_seed(2)
    f = torch.randn(z.shape, generator=g)

    def net(x_in, c_noise, mask, features):
        return f

    loss, _ = training_loss(net, z, None, sigma=SIGMAS, noise=eps)
    expected = (f - (eps - z))[:, :, 4:].pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # what the network outputs on the context frames is not used
    garbage = IdealVelocity(z, eps, context_out=torch.full_like(z, 1e3))
    loss_garbage, _ = training_loss(garbage, z, None, sigma=SIGMAS, noise=eps)
    assert loss_garbage.item() < 1e-8


def test_context_latents_are_clean_unscaled_and_returned_unchanged():
    z, eps = _clip(seed=3)
    model = IdealVelocity(z, eps, context_out=torch.randn_like(z))
    training_loss(model, z, None, sigma=SIGMAS, noise=eps)
    x_in, c_noise, mask = model.calls[-1]
    assert torch.equal(mask, (torch.arange(7) < 4)[None].expand(len(SIGMAS), 7))
    assert torch.equal(x_in[:, :, :4], z[:, :, :4])  # no noise, no c_in
    assert torch.all(c_noise[:, :4] == CONTEXT_C_NOISE)
    torch.testing.assert_close(c_noise[:, 4:], (SIGMAS / (1 + SIGMAS))[:, None].expand(-1, 3))

    # a real (randomised) DiT: the full denoiser hands the context latents back bit for bit
    dit = Re2PixDiT(DiTConfig.tiny())
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.2 * torch.randn_like(p))
    feats = torch.randn(len(SIGMAS), 7, 4, 6, 64)
    x = z.clone()
    x[:, :, 4:] += SIGMAS.view(-1, 1, 1, 1, 1) * eps[:, :, 4:]
    d = denoise(dit, x, SIGMAS, mask, feats)
    assert torch.equal(d[:, :, :4], z[:, :, :4])
    assert (d[:, :, 4:] - x[:, :, 4:]).abs().max() > 1e-3


def test_sigma_sampler_tail_and_lognormal_body():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    sigma = sample_sigma(n, g)
    assert sigma.dtype == torch.float32 and sigma.shape == (n,)
    tail = (sigma >= 200) & (sigma <= 1e5)
    frac = tail.float().mean().item()
    assert abs(frac - 0.05) < 4 * math.sqrt(0.05 * 0.95 / n)
    assert sigma.max() <= 1e5 * (1 + 1e-6) and sigma.min() > 0
    body = sigma[~tail]
    assert abs(body.median().item() - 1.0) < 0.02
    assert abs(body.log().std().item() - 1.0) < 0.02  # log sigma ~ N(0, 1), not sigmoid(u) < 1
    assert (body > 1).float().mean().item() == pytest.approx(0.5, abs=0.01)
    # the tail is log-uniform on [log 200, log 1e5]
    log_tail = sigma[tail].log()
    assert log_tail.mean().item() == pytest.approx((math.log(200) + math.log(1e5)) / 2, abs=0.05)


def test_nested_dropout_keeps_exactly_the_first_c_channels():
    g = torch.Generator().manual_seed(0)
    for channels, expected in (
        (1152, [8, 16, 32, 64, 128, 256, 512, 1152]),
        (64, [8, 16, 32, 64]),
        (48, [8, 16, 32, 48]),
    ):
        assert nested_dropout_choices(channels) == expected
        feats = torch.rand(400, 3, 2, 2, channels) + 0.5  # no zeros to start with
        out, kept = nested_dropout(feats, g, return_channels=True)
        assert set(kept.tolist()) == set(expected)  # every choice drawn, nothing else
        counts = torch.bincount(torch.tensor([expected.index(c) for c in kept.tolist()]), minlength=len(expected))
        assert counts.min() > 400 / len(expected) * 0.5
        keep = (torch.arange(channels)[None, :] < kept[:, None]).view(-1, 1, 1, 1, channels).expand_as(feats)
        assert torch.equal(out[keep], feats[keep])  # every frame keeps channels 0..c-1 untouched
        assert torch.count_nonzero(out[~keep]) == 0  # and loses c..C-1
    plain = nested_dropout(torch.ones(2, 7, 1, 1, 64), g)
    assert isinstance(plain, torch.Tensor)
    trunc = truncate_features(torch.ones(1, 7, 1, 1, 64), 8)
    assert trunc.sum().item() == 7 * 8


def test_mix_features_rate_and_placement():
    g = torch.Generator().manual_seed(0)
    n = 10_000
    gt = torch.zeros(n, 7, 1, 1, 2)
    pred = torch.ones(n, 3, 1, 1, 2)
    out, used = mix_features(gt, pred, p=0.1, generator=g, return_mask=True)
    replaced = (out[:, 4:] == 1).all(dim=(1, 2, 3, 4))
    assert torch.equal(replaced, used)
    assert torch.count_nonzero(out[:, :4]) == 0  # context features always ground truth
    assert torch.count_nonzero(out[~used]) == 0
    k = used.sum().item()
    assert abs(k - 0.1 * n) < 4 * math.sqrt(n * 0.1 * 0.9)
    assert torch.count_nonzero(gt) == 0  # the input is not modified
    assert torch.equal(mix_features(gt, None, p=0.0, generator=g), gt)
    assert torch.equal(mix_features(gt, pred, p=1.0, generator=g)[:, 4:], pred)
    with pytest.raises(ValueError) as err:
        mix_features(gt, None, p=0.1, generator=g)
    assert str(err.value) == MISSING_PRED_FEATURES
    assert "make rollout" in MISSING_PRED_FEATURES


def test_karras_schedule():
    s = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert torch.all(s[1:] < s[:-1])


def _random_dit(semantic=True, seed=0):
    torch.manual_seed(seed)
    dit = Re2PixDiT(DiTConfig.tiny(semantic=semantic))
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return dit.eval()


def test_sampler_holds_context_and_guidance_is_off_by_default():
    dit = _random_dit()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(2, 16, 4, 4, 6, generator=g)
    feats = torch.randn(2, 7, 4, 6, 64, generator=g)
    noise = torch.randn(2, 16, 3, 4, 6, generator=g)
    kw = {"num_steps": 4, "initial_noise": noise}
    heun = sample(dit, ctx, feats, **kw)
    assert heun.shape == (2, 16, 7, 4, 6)
    assert torch.equal(heun[:, :, :4], ctx)
    euler = sample(dit, ctx, feats, solver="euler", **kw)
    assert torch.equal(euler[:, :, :4], ctx) and not torch.allclose(euler, heun)
    # guidance: same as no guidance with w = 0 or with all channels; different otherwise
    assert torch.equal(sample(dit, ctx, feats, guidance_channels=8, guidance_weight=0.0, **kw), heun)
    torch.testing.assert_close(
        sample(dit, ctx, feats, guidance_channels=64, guidance_weight=0.4, **kw), heun, atol=1e-4, rtol=1e-4
    )
    guided = sample(dit, ctx, feats, guidance_channels=8, guidance_weight=0.4, **kw)
    assert (guided - heun).abs().max() > 1e-3 and torch.equal(guided[:, :, :4], ctx)
    # a seeded generator makes sampling reproducible; the Baseline samples without features
    a = sample(dit, ctx, feats, num_steps=3, generator=torch.Generator().manual_seed(5))
    b = sample(dit, ctx, feats, num_steps=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    base = sample(_random_dit(semantic=False), ctx, None, num_steps=3, generator=g)
    assert base.shape == (2, 16, 7, 4, 6) and torch.isfinite(base).all()
    with pytest.raises(ValueError):
        sample(dit, ctx, feats, solver="rk4")


def _blob_clips(n=4, t=7, h=8, w=12, seed=0):
    """Latent clips [n, 16, t, h, w] of two 16-channel Gaussian blobs each moving at constant velocity (unit
    std), and their layout [n, 2, t, h, w]: where each blob is (one channel per blob), not what it carries."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    lat, layout = torch.zeros(n, 16, t, h, w), torch.zeros(n, 2, t, h, w)
    for i in range(n):
        for b in range(2):
            pattern = torch.randn(16, generator=g)
            start = torch.rand(2, generator=g) * torch.tensor([h - 1.0, w - 1.0])
            velocity = (torch.rand(2, generator=g) - 0.5) * torch.tensor([1.0, 2.0])
            for f in range(t):
                cy, cx = start + velocity * f
                layout[i, b, f] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.5)
                lat[i, :, f] += pattern[:, None, None] * layout[i, b, f]
    return lat / lat.std(), layout, g


@functools.cache
def _overfit(semantic: bool):
    """Train the tiny DiT for 200 steps on 4 clips, sample their futures (12 Heun steps)."""
    torch.manual_seed(0)
    lat, layout, g = _blob_clips()
    # features as a forecaster gives them: where each blob is, extrapolated at constant velocity (which the
    # context frames show), never what the future latents hold (the blobs' patterns are not in them)
    proj = torch.randn(2, 64, generator=g)
    feats = torch.einsum("ncthw,cf->nthwf", layout, proj)  # [4, 7, 8, 12, 64] -> resized to the 4 x 6 tokens
    model = Re2PixDiT(DiTConfig.tiny(semantic=semantic))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    losses = []
    for _ in range(200):
        loss, _ = training_loss(model, lat, feats if semantic else None, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    out = sample(model, lat[:, :, :4], feats if semantic else None, num_steps=12, solver="heun", generator=g)
    future = lat[:, :, 4:]
    mse = (out[:, :, 4:] - future).pow(2).mean().item()
    mean_mse = (future.mean(dim=0, keepdim=True) - future).pow(2).mean().item()  # predict the mean latent
    context_kept = torch.equal(out[:, :, :4], lat[:, :, :4])
    return mse, mean_mse, losses, context_kept


@pytest.mark.slow
def test_tiny_dit_overfits_clips_and_sampler_reconstructs_the_future():
    mse, mean_mse, losses, context_kept = _overfit(True)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert mse <= 0.3 * mean_mse, (mse, mean_mse)
    assert context_kept


@pytest.mark.slow
def test_semantic_features_beat_the_baseline_on_the_same_budget():
    mse_semantic, mean_mse, _, _ = _overfit(True)
    mse_baseline, _, _, context_kept = _overfit(False)
    assert context_kept
    assert mse_baseline > 1.5 * mse_semantic, (mse_baseline, mse_semantic, mean_mse)
