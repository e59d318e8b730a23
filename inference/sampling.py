"""Sampling the future: Stage 1's rollout of the features, Stage 2's conditioning, and the sampler
that draws Re2Pix and the Baseline from the same initial noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.diffusion import SAMPLE_STEPS, SIGMA_MAX, SIGMA_MIN

from .stages import Models


@dataclass
class Sampler:
    steps: int = SAMPLE_STEPS
    solver: str = "heun"
    guidance_channels: int | None = None
    guidance_weight: float = 0.0
    channels: int | None = None  # Stage 2 reads only the first c PCA channels, the rest zeroed (paper table 5)
    sigma_max: float = SIGMA_MAX  # the noise range the sampler walks down
    sigma_min: float = SIGMA_MIN
    # the network's evaluations under autocast: auto is bf16 on GPU, float32 on CPU; the sampler's own
    # update arithmetic stays float32 (model.runtime.autocast_network)
    precision: str = "auto"

    @classmethod
    def of(cls, cfg) -> Sampler:
        """The sampler a job's config names: sample_steps, sample_solver, guidance_*, sigma_*, channels and
        precision if any."""
        fields = (cfg.guidance_channels, cfg.guidance_weight, getattr(cfg, "channels", None))
        precision = getattr(cfg, "precision", "auto")
        return cls(cfg.sample_steps, cfg.sample_solver, *fields, cfg.sigma_max, cfg.sigma_min, precision)

    def __call__(self, model, context_latents, features, noise: torch.Tensor) -> torch.Tensor:
        """[B, 16, 4, h, w] context + [B, 7, H, W, c] features or None -> [B, 16, 7, h, w]."""
        from model.diffusion import sample, truncate_features
        from model.runtime import autocast_dtype, autocast_network

        device = context_latents.device
        net = autocast_network(model, autocast_dtype(self.precision, device), device)
        if features is not None and self.channels is not None:
            features = truncate_features(features, self.channels)
        guided = features is not None and self.guidance_weight != 0.0
        return sample(
            net,
            context_latents,
            features,
            num_steps=self.steps,
            solver=self.solver,
            sigma_max=self.sigma_max,
            sigma_min=self.sigma_min,
            num_future=noise.shape[2],
            initial_noise=noise,
            guidance_channels=self.guidance_channels if guided else None,
            guidance_weight=self.guidance_weight if guided else 0.0,
        )


def forecast_features(models: Models, context: torch.Tensor, future: int) -> torch.Tensor:
    """Stage 1 rollout: context [B, 4, H, W, >=c1] -> [B, future, H, W, c1] float32."""
    from model.stage1 import rollout

    c1 = models.stage1.model.config.num_pca_channels
    with torch.no_grad():
        return rollout(models.stage1.model, context[..., :c1].float(), steps=future).float()


def stage2_features(context: torch.Tensor, forecast: torch.Tensor, channels: int) -> torch.Tensor:
    """Re2Pix conditioning [B, 4 + F, H, W, channels]: ground-truth context features and Stage 1's
    forecast, cut or zero-padded to the DiT's channels (zero channels = nested truncation)."""
    from model.diffusion import fit_channels

    return torch.cat([context[..., :channels].float(), fit_channels(forecast, channels).float()], dim=1)


def sample_models(
    models: Models, sampler: Sampler, context_latents: torch.Tensor, features: torch.Tensor, noise: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{"re2pix": [B, 16, 7, h, w], "baseline": ...} from the same initial noise [B, 16, F, h, w]."""
    out = {"re2pix": sampler(models.stage2.model, context_latents, features, noise)}
    if models.baseline is not None:
        out["baseline"] = sampler(models.baseline.model, context_latents, None, noise)
    return out


def clip_noise(seed: int, run: int, clips: list[int], shape) -> torch.Tensor:
    """Initial noise [len(clips), *shape], one generator per (seed, sampling run, clip): the same noise
    for a clip whatever the batch it is in, and on every device."""
    out = []
    for c in clips:
        s = int(np.random.SeedSequence([seed, run, c]).generate_state(1)[0])
        out.append(torch.randn(shape, generator=torch.Generator().manual_seed(s)))
    return torch.stack(out)
