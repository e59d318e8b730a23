"""What the shared loop trains: Stage 1 (masked feature transformer), Stage 2 (semantic DiT) and the
Baseline (the same DiT without the feature branch). Each task builds its model from a preset name
('tiny' or 'paper') plus overrides, with the sizes that come from the data (PCA channels read, feature
grid, context frames) taken from the store, and computes the loss and the evaluation metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from pipeline.store.geometry import Geometry

from . import diffusion, stage1, stage2
from .metrics import Means, feature_metrics


class Stage1Task:
    """Teacher-forced masked-frame regression (SmoothL1); evaluated by autoregressive rollout."""

    name = "stage1"
    needs_pred_features = False
    needs_latents = False

    def __init__(self, preset: str, geometry: Geometry, channels: int, overrides: dict | None = None):
        data = {"num_pca_channels": channels, "feature_hw": geometry.feature_hw,
                "context_frames": geometry.context_latents}
        self.config = _preset(stage1.Stage1Config, preset)(**{**data, **(overrides or {})})
        self.future = geometry.future_latents

    @property
    def train_window(self) -> int:
        """Feature frames a training sample uses (context + target): the loader reads only those."""
        return self.config.context_frames + 1

    @classmethod
    def from_config(cls, config: dict) -> Stage1Task:
        task = cls.__new__(cls)
        task.config = stage1.Stage1Config(**config)
        task.future = None
        return task

    def build_model(self) -> stage1.MaskedFeatureTransformer:
        return stage1.MaskedFeatureTransformer(self.config)

    def model_config(self) -> dict:
        return _jsonable(dataclasses.asdict(self.config))

    def loss(self, model, batch: dict, generator: torch.Generator):
        # a window of train_window frames from the loader (the target is its last), or whole clips
        context, target = stage1.stage1_batch(batch["features"], generator, self.config.context_frames)
        pred = model(context)  # [B, H, W, C]
        return stage1.loss(pred, target, self.config.smooth_l1_beta)

    def evaluate(self, model, batches: Iterable[dict], generator: torch.Generator) -> Means:
        """Rollout metrics per future frame (model/metrics.py), the teacher-forced loss on every
        future frame, and the same metrics for copying the last context frame (the bar to beat)."""
        means = Means()
        n = self.config.context_frames
        for batch in batches:
            feats = batch["features"]  # [B, 7, H, W, C]
            context, future = feats[:, :n], feats[:, n:]
            pred = stage1.rollout(model, context, steps=future.shape[1]).float()  # [B, 3, H, W, C]
            means.update(feature_metrics(pred, future, first_frame=n))
            copy = context[:, -1:].expand_as(future)
            means.update({k: v for k, v in feature_metrics(copy, future, first_frame=n).items() if "@" not in k},
                         prefix="copy_last/")
            losses = [stage1.loss(model(feats[:, t - n: t]), feats[:, t], self.config.smooth_l1_beta)
                      for t in range(n, feats.shape[1])]
            means.update({"loss": torch.stack(losses).mean().expand(feats.shape[0])})
        return means


class Stage2Task:
    """EDM denoising loss on the future latents, with the early-fused features after mixed supervision
    (predicted future features with probability pred_p) and nested dropout; `semantic=False` is the
    Baseline. Evaluated by the validation loss (fixed noise) and the error of sampled future latents."""

    needs_pred_features: bool
    needs_latents = True
    train_window = None  # every feature frame of a clip

    def __init__(self, preset: str, geometry: Geometry, channels: int, overrides: dict | None = None, *,
                 semantic: bool = True, pred_p: float = 0.1, nested_dropout: bool = True,
                 sample_steps: int = 10, sample_solver: str = "heun", sample_clips: int = 4):
        data = {"feature_channels": channels, "latent_channels": geometry.latent_channels, "semantic": semantic}
        self.config = _preset(stage2.DiTConfig, preset)(**{**data, **(overrides or {})})
        self.name = "stage2" if semantic else "baseline"
        self.context_latents = geometry.context_latents
        self.pred_p = pred_p if semantic else 0.0
        self.nested_dropout = nested_dropout and semantic
        self.needs_pred_features = self.pred_p > 0
        self.sample_steps, self.sample_solver, self.sample_clips = sample_steps, sample_solver, sample_clips

    def build_model(self) -> stage2.Re2PixDiT:
        return stage2.Re2PixDiT(self.config)

    def model_config(self) -> dict:
        return _jsonable(dataclasses.asdict(self.config))

    def _features(self, batch: dict, generator, train: bool):
        if not self.config.semantic:
            return None
        feats = batch["features"]  # [B, 7, H, W, c]
        if train and self.pred_p > 0:
            feats = diffusion.mix_features(feats, batch.get("pred_features"), self.pred_p, generator)
        if train and self.nested_dropout:
            feats = diffusion.nested_dropout(feats, generator)
        return feats

    def loss(self, model, batch: dict, generator: torch.Generator):
        feats = self._features(batch, generator, train=True)
        return diffusion.training_loss(model, batch["latents"], feats, self.context_latents, generator)[0]

    def evaluate(self, model, batches: Iterable[dict], generator: torch.Generator) -> Means:
        means = Means()
        m = self.context_latents
        sampled = 0
        for batch in batches:
            latents = batch["latents"]  # [B, 16, 7, h, w]
            feats = self._features(batch, generator, train=False)
            _, logs = diffusion.training_loss(model, latents, feats, m, generator)
            means.update({"loss": logs["loss_per_sample"]})
            future = latents[:, :, m:].float()
            means.update({"copy_last_mse": (latents[:, :, m - 1: m].float() - future).pow(2).mean(dim=(1, 2, 3, 4))})
            if sampled >= self.sample_clips:
                continue
            sampled += latents.shape[0]
            inference = feats
            if feats is not None and "pred_features" in batch:  # the inference setting: predicted futures
                inference = feats.clone()
                inference[:, m:] = batch["pred_features"].to(feats.dtype)
                means.update({"sample_mse_gt_features": self._sample_mse(model, latents, feats, generator)})
            means.update({"sample_mse": self._sample_mse(model, latents, inference, generator)})
        return means

    def _sample_mse(self, model, latents, feats, generator) -> torch.Tensor:
        m = self.context_latents
        out = diffusion.sample(model, latents[:, :, :m], feats, num_steps=self.sample_steps,
                               solver=self.sample_solver, generator=generator,
                               num_future=latents.shape[2] - m)
        return (out[:, :, m:] - latents[:, :, m:].float()).pow(2).mean(dim=(1, 2, 3, 4))


def _preset(cls, preset: str):
    if preset not in ("tiny", "paper"):
        raise ValueError(f"model preset must be 'tiny' or 'paper', got {preset!r}")
    return getattr(cls, preset)


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
