"""What the shared loop trains: Stage 1 (masked feature transformer, or the feature diffusion model of
model/stage1_diffusion.py), Stage 2 (semantic DiT), the Baseline (the same DiT without the feature
branch), and REPA / VideoREPA (the Baseline DiT with an alignment loss to the features, model/repa.py).
Each task builds its model from the model config of its stage's settings (jobs/train.py; make_task) with the sizes
that come from the data (PCA channels read, feature grid, context frames, latent channels) taken from the
store, and computes the loss and the evaluation metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from pipeline.config import from_dict, to_dict
from pipeline.store.geometry import Geometry

from . import diffusion, repa, stage1, stage1_diffusion, stage2
from .metrics import Means, feature_metrics


class Stage1Task:
    """Teacher-forced masked-frame regression (SmoothL1, L1 + SSIM or both); evaluated by autoregressive rollout."""

    name = "stage1"
    needs_pred_features = False
    needs_latents = False

    config_class = stage1.Stage1Config

    def __init__(self, model: stage1.Stage1Config, geometry: Geometry, channels: int, **settings):
        """settings: the config class's own fields beyond Stage1Config's (the diffusion sampler's)."""
        data = {
            "num_pca_channels": channels,
            "feature_hw": geometry.feature_hw,
            "context_frames": geometry.context_latents,
        }
        self.config = from_dict(self.config_class, {**to_dict(model), **settings, **data}, "the Stage 1 model")
        self.future = geometry.future_latents

    @property
    def train_window(self) -> int:
        """Feature frames a training sample uses (context + target): the loader reads only those."""
        return self.config.context_frames + 1

    def build_model(self) -> stage1.MaskedFeatureTransformer:
        return stage1.MaskedFeatureTransformer(self.config)

    def model_config(self) -> dict:
        return to_dict(self.config)

    def saved_config(self, saved: dict) -> dict:
        return to_dict(from_dict(self.config_class, saved, "the checkpoint's model config"))

    def loss(self, model, batch: dict, generator: torch.Generator):
        # a window of train_window frames from the loader (the target is its last), or whole clips
        context, target = stage1.stage1_batch(batch["features"], generator, self.config.context_frames)
        pred = model(context)  # [B, H, W, C]
        return stage1.config_loss(self.config, pred, target)

    def evaluate(self, model, batches: Iterable[dict], generator: torch.Generator) -> Means:
        """Rollout metrics per future frame (model/metrics.py), the teacher-forced loss on every
        future frame, and the same metrics for copying the last context frame (the bar to beat)."""
        means = Means()
        n = self.config.context_frames
        for batch in batches:
            feats = batch["features"]  # [B, 7, H, W, C]
            context, future = feats[:, :n], feats[:, n:]
            pred = stage1.rollout(model, context, steps=future.shape[1]).float()  # [B, 3, H, W, C], sampled or not
            means.update(feature_metrics(pred, future, first_frame=n))
            copy = context[:, -1:].expand_as(future)
            means.update(
                {k: v for k, v in feature_metrics(copy, future, first_frame=n).items() if "@" not in k},
                prefix="copy_last/",
            )
            means.update({"loss": self.future_loss(model, feats, generator)})
        return means

    def future_loss(self, model, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The teacher-forced loss of every future frame, [B] (the batch's mean for each clip)."""
        n = self.config.context_frames
        losses = [
            stage1.config_loss(self.config, model(feats[:, t - n : t]), feats[:, t]) for t in range(n, feats.shape[1])
        ]
        return torch.stack(losses).mean().expand(feats.shape[0])


class Stage1DiffusionTask(Stage1Task):
    """The diffusion Stage 1 (model/stage1_diffusion.py): the EDM loss of the next feature frame given 4
    ground-truth context frames; evaluated like Stage 1 by a (sampled) autoregressive rollout, with the
    EDM loss on every future frame as "loss"."""

    name = "stage1_diffusion"
    config_class = stage1_diffusion.DiffusionStage1Config

    def build_model(self) -> stage1_diffusion.FeatureDiffusion:
        return stage1_diffusion.FeatureDiffusion(self.config)

    def loss(self, model, batch: dict, generator: torch.Generator):
        context, target = stage1.stage1_batch(batch["features"], generator, self.config.context_frames)
        return stage1_diffusion.training_loss(model, context, target, generator)[0]

    def future_loss(self, model, feats: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The EDM loss of every future frame given its 4 ground-truth predecessors, [B]."""
        n = self.config.context_frames
        losses = [
            stage1_diffusion.training_loss(model, feats[:, t - n : t], feats[:, t], generator)[1]["loss_per_sample"]
            for t in range(n, feats.shape[1])
        ]
        return torch.stack(losses).mean(dim=0)


class Stage2Task:
    """EDM denoising loss on the future latents, with the early-fused features after mixed supervision
    (predicted future features with probability pred_p) and nested dropout; `semantic=False` is the
    Baseline. Evaluated by the validation loss (fixed noise) and the error of sampled future latents."""

    needs_pred_features: bool
    needs_latents = True
    train_window = None  # every feature frame of a clip

    def __init__(
        self,
        model: stage2.DiTConfig,
        geometry: Geometry,
        channels: int,
        *,
        semantic: bool = True,
        pred_p: float = 0.1,
        nested_dropout: bool = True,
        sample_steps: int = 10,
        sample_solver: str = "heun",
        sample_clips: int = 4,
    ):
        data = {"num_pca_channels": channels, "latent_channels": geometry.latent_channels, "semantic": semantic}
        self.config = from_dict(stage2.DiTConfig, {**to_dict(model), **data}, "the Stage 2 model")
        self.name = "stage2" if semantic else "baseline"
        self.context_latents = geometry.context_latents
        self.pred_p = pred_p if semantic else 0.0
        self.nested_dropout = nested_dropout and semantic
        self.needs_pred_features = self.pred_p > 0
        self.sample_steps, self.sample_solver, self.sample_clips = sample_steps, sample_solver, sample_clips

    def build_model(self) -> stage2.Re2PixDiT:
        return stage2.Re2PixDiT(self.config)

    def model_config(self) -> dict:
        return to_dict(self.config)

    def saved_config(self, saved: dict) -> dict:
        return to_dict(from_dict(stage2.DiTConfig, saved, "the checkpoint's model config"))

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
            means.update({"copy_last_mse": (latents[:, :, m - 1 : m].float() - future).pow(2).mean(dim=(1, 2, 3, 4))})
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
        out = diffusion.sample(
            model,
            latents[:, :, :m],
            feats,
            num_steps=self.sample_steps,
            solver=self.sample_solver,
            generator=generator,
            num_future=latents.shape[2] - m,
        )
        return (out[:, :, m:] - latents[:, :, m:].float()).pow(2).mean(dim=(1, 2, 3, 4))


class AlignTask(Stage2Task):
    """REPA or VideoREPA (model/repa.py): the Baseline DiT trained with the denoising loss plus lambda
    times the alignment of one block's projected tokens to the ground-truth features, which never enter
    the DiT. Evaluated as the Baseline (same fixed-noise validation loss and samples), plus the
    alignment terms on the validation clips."""

    def __init__(
        self,
        method: str,
        model: stage2.DiTConfig,
        geometry: Geometry,
        channels: int,
        align: repa.AlignConfig | None = None,
        *,
        sample_steps: int = 10,
        sample_solver: str = "heun",
        sample_clips: int = 4,
    ):
        super().__init__(
            model,
            geometry,
            channels,
            semantic=False,
            pred_p=0.0,
            nested_dropout=False,
            sample_steps=sample_steps,
            sample_solver=sample_solver,
            sample_clips=sample_clips,
        )
        self.name = method
        self.align = dataclasses.replace(align or repa.AlignConfig(), method=method)

    def build_model(self) -> repa.AlignedDiT:
        return repa.AlignedDiT(self.config, self.align)

    def model_config(self) -> dict:
        return {"dit": to_dict(self.config), "align": to_dict(self.align)}

    def saved_config(self, saved: dict) -> dict:
        return {
            "dit": super().saved_config(saved.get("dit", {})),
            "align": to_dict(from_dict(repa.AlignConfig, saved.get("align", {}), "the checkpoint's align config")),
        }

    def loss(self, model, batch: dict, generator: torch.Generator):
        loss, logs = repa.training_loss(
            model,
            batch["latents"],
            batch["features"],
            self.align,
            self.context_latents,
            generator,
            patch=self.config.patch_spatial,
        )
        return loss, {k: v.mean() for k, v in logs.items()}

    def evaluate(self, model, batches: Iterable[dict], generator: torch.Generator) -> Means:
        # the alignment terms draw their noise from a generator of their own, so that the Baseline's
        # metrics see exactly the draws they see in a Baseline run
        align_gen = torch.Generator(generator.device).manual_seed(generator.initial_seed() + 1)
        terms: list[dict] = []

        def observed():
            for batch in batches:
                _, logs = repa.training_loss(
                    model,
                    batch["latents"],
                    batch["features"],
                    self.align,
                    self.context_latents,
                    align_gen,
                    patch=self.config.patch_spatial,
                )
                terms.append({k: v for k, v in logs.items() if k != "denoising_loss"})
                yield batch

        means = super().evaluate(model, observed(), generator)
        for values in terms:
            means.update(values)
        return means


def make_task(stage: str, sc, geometry, channels: int):
    """What `stage` ("stage1", "stage2", "baseline", "repa" or "videorepa") trains, from its stage settings `sc`
    (jobs/train.py's Stage1Settings / Stage2Settings) with the sizes the data fixes."""
    if stage == "stage1":
        if sc.diffusion:
            sampler = {k: getattr(sc, k) for k in ("sample_steps", "sample_solver", "forecast_samples")}
            task = Stage1DiffusionTask(sc.model, geometry, channels, **sampler)
        else:
            task = Stage1Task(sc.model, geometry, channels)
    elif stage in ("repa", "videorepa"):
        task = AlignTask(
            stage,
            sc.model,
            geometry,
            channels,
            sc.align,
            sample_steps=sc.sample_steps,
            sample_solver=sc.sample_solver,
            sample_clips=sc.sample_clips,
        )
    else:
        task = Stage2Task(
            sc.model,
            geometry,
            channels,
            semantic=stage == "stage2",
            pred_p=sc.pred_p,
            nested_dropout=sc.nested_dropout,
            sample_steps=sc.sample_steps,
            sample_solver=sc.sample_solver,
            sample_clips=sc.sample_clips,
        )
    return task
