"""EDM-style diffusion for Stage 2 (paper section 3.2 and appendix 9.1, as read in docs/design.md, "Reading the paper").

Noise levels and preconditioning
--------------------------------
- ``sample_sigma``: log sigma ~ N(0, 1) (the paper's eq. 11 prints sigma = sigmoid(u); docs/design.md reads it
  as t = sigmoid(u), i.e. sigma = e^u), plus a 5 % tail with log sigma ~ U(log 200, log 1e5). One
  sigma per sample, shared by its future latents; float32.
- With t = sigma / (1 + sigma): c_skip = 1 - t, c_out = -t, c_in = 1 - t, c_noise = t (eqs. 12-14).
  The denoiser is D(x; sigma) = c_skip x + c_out F(c_in x, c_noise). With x = z + sigma eps,
  c_in x = (1 - t) z + t eps and the ideal network output is F = eps - z (a velocity).
- Loss weight lambda = (1 + sigma)^2 / sigma^2 = 1 / t^2 (eq. 16), so lambda ||D - z||^2 equals
  ||F - (eps - z)||^2: every noise level contributes on the same scale.

Context latents (0-3) are clean: no noise, not scaled by c_in, c_noise = 0.001, the mask channel set,
and the denoiser returns them unchanged (the network output there is replaced by the ground truth);
the loss covers the future latents (4-6) only. Everything sigma-dependent runs in float32
(sigma reaches 1e5).

Semantic conditioning helpers: ``nested_dropout`` (section 3.4, eq. 9), ``mix_features`` (mixed
supervision, 90 % ground-truth / 10 % predicted future features) and ``truncate_features``.

Sampling: ``sample`` integrates the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma with
deterministic Euler or Heun steps (EDM Algorithm 1 without churn) on the Karras schedule
sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, then 0.
Defaults sigma_max 80, sigma_min 0.002, rho 7 are EDM's and Cosmos-Predict2's (the paper gives none).
Cosmos-Predict2.5 pairs the training tail with 200 / 0.01; measured side by side (`python
scripts/measure_noise_range.py`: a tiny Baseline, 300 steps on demo-VAE latents of 8 synthetic scenes, 4 held-out
clips, 35 Heun steps, 3 sampling runs from the same noise), future-latent MSE 1.202 ± 0.011 with 80 / 0.002
vs 1.219 ± 0.011 with 200 / 0.01, so 80 / 0.002 stays the default (a small gap, at a scale where both lose
to copying the last latent, 0.462: re-measure on a trained model before changing it).
Representation guidance (appendix 6.2, eq. 10 as docs/design.md reads it): a second pass with every frame's
features truncated to their first c channels, D = (1 + w) D_full - w D_c; off by default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "CONTEXT_C_NOISE",
    "MISSING_PRED_FEATURES",
    "NESTED_DROPOUT_CHOICES",
    "denoise",
    "fit_channels",
    "karras_sigmas",
    "loss_weight",
    "mix_features",
    "nested_dropout",
    "nested_dropout_choices",
    "precondition",
    "sample",
    "sample_sigma",
    "training_loss",
    "truncate_features",
]

CONTEXT_C_NOISE = 0.001  # c_noise of the clean context latents (appendix 9.1)
NESTED_DROPOUT_CHOICES = (8, 16, 32, 64, 128, 256, 512, 1152)  # section 3.4
SAMPLE_STEPS = 35  # the sampler's steps at paper size (Heun, as Cosmos-Predict2 samples); the tiny presets take fewer
MISSING_PRED_FEATURES = "store has no clips/pred_features: run the rollout job first (make rollout)"

# A denoiser network: (x_in [B,C,T,h,w], c_noise [B,T], context_mask [B,T] bool, features or None) -> F
Network = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------- random helpers


def _gen_device(generator: torch.Generator | None, device) -> torch.device:
    return generator.device if generator is not None else torch.device(device if device is not None else "cpu")


def _randn(shape, generator=None, device=None) -> torch.Tensor:
    out = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=torch.float32)
    return out.to(device) if device is not None else out


def _rand(shape, generator=None, device=None) -> torch.Tensor:
    out = torch.rand(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=torch.float32)
    return out.to(device) if device is not None else out


def _randint(high: int, shape, generator=None, device=None) -> torch.Tensor:
    out = torch.randint(high, tuple(shape), generator=generator, device=_gen_device(generator, device))
    return out.to(device) if device is not None else out


# --------------------------------------------------------------------------- noise levels, preconditioning


def sample_sigma(
    batch: int,
    generator: torch.Generator | None = None,
    *,
    tail_prob: float = 0.05,
    tail_range: tuple[float, float] = (200.0, 1e5),
    device=None,
) -> torch.Tensor:
    """One training noise level per sample: [batch] float32.

    log sigma ~ N(0, 1), except that each sample with probability ``tail_prob`` instead takes
    log sigma ~ U(log tail_range[0], log tail_range[1]).
    """
    u = _randn((batch,), generator, device)
    in_tail = _rand((batch,), generator, device) < tail_prob
    lo, hi = math.log(tail_range[0]), math.log(tail_range[1])
    log_tail = lo + (hi - lo) * _rand((batch,), generator, device)
    return torch.exp(torch.where(in_tail, log_tail, u)).float()


def precondition(sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    """c_skip, c_out, c_in, c_noise (and t) for sigma (any shape), in float32.

    t = sigma / (1 + sigma); c_skip = c_in = 1 - t (computed as 1 / (1 + sigma)); c_out = -t; c_noise = t.
    """
    sigma = sigma.float()
    one_minus_t = 1.0 / (1.0 + sigma)
    t = sigma / (1.0 + sigma)
    return {"t": t, "c_skip": one_minus_t, "c_out": -t, "c_in": one_minus_t, "c_noise": t}


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = (1 + sigma)^2 / sigma^2 (eq. 16), float32."""
    sigma = sigma.float()
    return ((1.0 + sigma) / sigma) ** 2


def _context_mask(batch: int, frames: int, context_latents: int, device) -> torch.Tensor:
    if not 0 <= context_latents < frames:
        raise ValueError(f"context_latents must be in [0, {frames}), got {context_latents}")
    return (torch.arange(frames, device=device) < context_latents)[None, :].expand(batch, frames)


def denoise(
    model: Network,
    x: torch.Tensor,
    sigma: torch.Tensor,
    context_mask: torch.Tensor,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """The preconditioned denoiser D(x; sigma), float32.

    x [B, C, T, h, w]: noisy future latents (x = z + sigma eps) and clean context latents;
    sigma [B]: the future latents' noise level; context_mask [B, T] bool.
    Context frames are fed unscaled with c_noise = 0.001 and returned unchanged.
    """
    x = x.float()
    b, _, t, _, _ = x.shape
    sigma = sigma.float().reshape(b)
    pre = precondition(sigma)
    mask = context_mask.to(torch.bool)

    def frame(v: torch.Tensor) -> torch.Tensor:  # [B] -> [B, T]
        return v[:, None].expand(b, t)

    c_in = torch.where(mask, torch.ones_like(frame(pre["c_in"])), frame(pre["c_in"]))
    c_noise = torch.where(mask, torch.full_like(frame(pre["c_noise"]), CONTEXT_C_NOISE), frame(pre["c_noise"]))
    net_out = model(x * c_in[:, None, :, None, None], c_noise, mask, features).float()
    d = pre["c_skip"].view(b, 1, 1, 1, 1) * x + pre["c_out"].view(b, 1, 1, 1, 1) * net_out
    return torch.where(mask[:, None, :, None, None], x, d)


def training_loss(
    model: Network,
    latents: torch.Tensor,
    features: torch.Tensor | None = None,
    context_latents: int = 4,
    generator: torch.Generator | None = None,
    *,
    sigma: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted denoising loss on the future latents.

    latents [B, 16, 7, h, w] (clean); features [B, 7, Hf, Wf, C] or None (after nested dropout and
    mixing). ``sigma`` [B] and ``noise`` (like latents) may be given; otherwise drawn from
    ``generator``. Returns (loss, logs): loss = mean over samples of lambda(sigma) * mean over the
    future latents' elements of (D - z)^2; logs hold detached per-sample values.
    """
    z = latents.float()
    b, _, t, _, _ = z.shape
    if sigma is None:
        sigma = sample_sigma(b, generator, device=z.device)
    sigma = sigma.float().reshape(b).to(z.device)
    if noise is None:
        noise = _randn(z.shape, generator, z.device)
    noise = noise.float()
    mask = _context_mask(b, t, context_latents, z.device)
    future = ~mask[:, None, :, None, None]
    x = z + torch.where(future, sigma.view(b, 1, 1, 1, 1) * noise, torch.zeros_like(noise))
    d = denoise(model, x, sigma, mask, features)
    err = (d - z)[:, :, context_latents:]  # the loss covers latents 4-6 only
    per_sample = loss_weight(sigma) * err.pow(2).flatten(1).mean(dim=1)
    loss = per_sample.mean()
    logs = {"loss": loss.detach(), "loss_per_sample": per_sample.detach(), "sigma": sigma.detach()}
    return loss, logs


# --------------------------------------------------------------------------- semantic conditioning


def nested_dropout_choices(channels: int, choices: Sequence[int] = NESTED_DROPOUT_CHOICES) -> list[int]:
    """The choices that fit in ``channels`` feature channels, plus ``channels`` itself (sorted, unique)."""
    return sorted({c for c in choices if 0 < c <= channels} | {channels})


def truncate_features(features: torch.Tensor, channels: int | torch.Tensor) -> torch.Tensor:
    """Keep the first ``channels`` channels (last axis) of every frame, zero the rest: nested truncation.

    ``channels`` is one count for all, or a tensor [B] of one count per sample (nested dropout)."""
    c_total = features.shape[-1]
    keep = torch.arange(c_total, device=features.device)
    if isinstance(channels, torch.Tensor):  # [B, 1, ..., 1, C]
        keep = (keep[None, :] < channels[:, None]).view(features.shape[0], *([1] * (features.ndim - 2)), c_total)
    else:
        keep = keep < channels
    return features * keep.to(features.dtype)


def fit_channels(features: torch.Tensor, channels: int) -> torch.Tensor:
    """The first ``channels`` channels (last axis), zero-padded to ``channels`` when there are fewer: a reader
    that fetched only the first c PCA channels conditions a model exactly as truncate_features to c does."""
    features = features[..., :channels]
    if features.shape[-1] < channels:
        features = torch.nn.functional.pad(features, (0, channels - features.shape[-1]))
    return features


def nested_dropout(
    features: torch.Tensor,
    generator: torch.Generator | None = None,
    choices: Sequence[int] = NESTED_DROPOUT_CHOICES,
    *,
    return_channels: bool = False,
):
    """Nested dropout (eq. 9): per sample, keep the first c channels of all frames, zero the rest.

    features [B, T, H, W, C] (channels last); c is drawn uniformly from
    ``nested_dropout_choices(C, choices)`` (the paper's {8, ..., 512, 1152} at C = 1152).
    Returns the dropped features (and the per-sample c [B] when ``return_channels``).
    """
    b, c_total = features.shape[0], features.shape[-1]
    options = torch.tensor(nested_dropout_choices(c_total, choices), device=features.device)
    kept = options[_randint(len(options), (b,), generator, features.device)]  # [B]
    out = truncate_features(features, kept)
    return (out, kept) if return_channels else out


def mix_features(
    gt_features: torch.Tensor,
    pred_features: torch.Tensor | None,
    p: float = 0.1,
    generator: torch.Generator | None = None,
    *,
    return_mask: bool = False,
):
    """Mixed supervision: per sample, with probability p, the future frames' features become predicted.

    gt_features [B, 7, ...]; pred_features [B, 3, ...] (Stage 1's rollout for the last frames) or None.
    Returns the mixed features (and the per-sample bool [B] "used predicted" when ``return_mask``).
    """
    b = gt_features.shape[0]
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mixing probability must be in [0, 1], got {p}")
    if p > 0 and pred_features is None:
        raise ValueError(MISSING_PRED_FEATURES)
    if p == 0:
        used = torch.zeros(b, dtype=torch.bool, device=gt_features.device)
        return (gt_features, used) if return_mask else gt_features
    n_pred = pred_features.shape[1]
    if pred_features.shape[0] != b or pred_features.shape[2:] != gt_features.shape[2:] or n_pred > gt_features.shape[1]:
        raise ValueError(
            f"pred_features {tuple(pred_features.shape)} do not match the future frames of gt_features "
            f"{tuple(gt_features.shape)}"
        )
    used = _rand((b,), generator, gt_features.device) < p
    future = gt_features[:, -n_pred:]
    # torch.where, not future[used] = ...: boolean indexing makes the host wait for the device
    mixed = torch.where(used.view(b, *[1] * (future.ndim - 1)), pred_features.to(future.device, future.dtype), future)
    out = torch.cat([gt_features[:, :-n_pred], mixed], dim=1)
    return (out, used) if return_mask else out


# --------------------------------------------------------------------------- sampler

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002  # EDM's noise range (Cosmos-Predict2.5 uses 200 / 0.01)


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = 7.0, device=None
) -> torch.Tensor:
    """EDM's schedule: num_steps noise levels from sigma_max down to sigma_min, then a final 0 (float64)."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    if num_steps == 1:
        ramp = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        ramp = torch.arange(num_steps, dtype=torch.float64, device=device) / (num_steps - 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


@torch.no_grad()
def sample(
    model: Network,
    context_latents: torch.Tensor,
    features: torch.Tensor | None = None,
    num_steps: int = SAMPLE_STEPS,
    solver: str = "heun",
    sigma_max: float = SIGMA_MAX,
    sigma_min: float = SIGMA_MIN,
    rho: float = 7.0,
    generator: torch.Generator | None = None,
    *,
    num_future: int = 3,
    guidance_channels: int | None = None,
    guidance_weight: float = 0.0,
    initial_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predict the future latents by integrating the probability-flow ODE with D.

    context_latents [B, 16, M, h, w] (clean, M = 4); features [B, M + num_future, Hf, Wf, C] or None
    (Baseline). The future latents start at sigma_max * eps and take ``num_steps`` deterministic
    Euler or Heun steps on the Karras schedule (Heun: 2 * num_steps - 1 network evaluations); the
    context latents are held fixed at every step. Representation guidance is on when
    ``guidance_channels`` is set and ``guidance_weight`` is non-zero.

    Returns the whole latent sequence [B, 16, M + num_future, h, w] float32: the causal VAE decoder
    needs the context latents in front of the prediction.
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"solver must be 'heun' or 'euler', got {solver!r}")
    guided = guidance_channels is not None and guidance_weight != 0.0
    if guided and features is None:
        raise ValueError("representation guidance needs features")
    ctx = context_latents.float()
    b, c, m, h, w = ctx.shape
    t_total = m + num_future
    device = ctx.device
    mask = _context_mask(b, t_total, m, device)
    coarse = truncate_features(features, guidance_channels) if guided else None

    def d_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
        sig = torch.full((b,), sigma, dtype=torch.float32, device=device)
        d = denoise(model, x, sig, mask, features)
        if guided:
            d = (1.0 + guidance_weight) * d - guidance_weight * denoise(model, x, sig, mask, coarse)
        return d

    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist()
    eps = (
        initial_noise.float().to(device)
        if initial_noise is not None
        else _randn((b, c, num_future, h, w), generator, device)
    )
    x = torch.cat([ctx, sigmas[0] * eps], dim=2)
    for i in range(num_steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        d_cur = (x - d_fn(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if solver == "heun" and s_next > 0:
            d_next = (x_next - d_fn(x_next, s_next)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = torch.cat([ctx, x_next[:, :, m:]], dim=2)  # clean context held fixed
    return x
