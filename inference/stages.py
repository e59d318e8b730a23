"""The trained stages, loaded from the trainer's checkpoints: the one loader of rollout, predict and evaluate.

A path is a trainer run dir (its latest checkpoint) or a checkpoint folder (model/checkpoint.py):
meta.json names the task and the model config, and the weights (model or EMA) must hash to the
fingerprint meta.json recorded, be finite, and the data they meet must be of the feature space they were
trained in (meta.json's feature_space). Imports only `model/`: the rollout job, a training job, uses it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import CheckpointError, check_feature_space, load_verified

from . import InferenceError

log = logging.getLogger("re2pix.inference")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # in eval mode, on the device asked for
    task: str  # stage1, stage2, baseline
    fingerprint: str  # of the weights loaded: the rollout job records it beside its predictions
    checkpoint: str
    meta: dict  # the checkpoint's meta.json

    def describe(self) -> dict:
        return {"task": self.task, "checkpoint": self.checkpoint, "fingerprint": self.fingerprint}

    def check_space(self, where: str, manifest: dict | None, basis: str | None = None) -> None:
        """Refuse data of another feature space than this model was trained in (model/checkpoint.py)."""
        check_feature_space(self.meta, self.checkpoint, where, manifest, basis)


def load_model(path, tasks: tuple[str, ...], weights: str = "auto", device="cpu") -> LoadedModel:
    """A trained model whose task is one of `tasks`. `weights`: "model", "ema", or "auto" (EMA when
    the run kept one). CheckpointError when the path holds none, another task, or damaged weights."""
    try:
        ckpt, meta, state, fingerprint = load_verified(path, tasks, weights)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e
    broken = next((name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()), None)
    if broken is not None:
        raise CheckpointError(
            f"{ckpt} holds non-finite weights (NaN/Inf in {broken}): the run diverged; use an earlier checkpoint"
        )
    model = build_model(meta["task"], meta["model_config"])
    model.load_state_dict(state)
    return LoadedModel(model.to(device).eval(), meta["task"], fingerprint, str(ckpt), meta)


def build_model(task: str, config: dict) -> torch.nn.Module:
    """The untrained model of a checkpoint's task and meta "model_config"."""
    from model import repa, stage1_diffusion
    from model.stage1 import MaskedFeatureTransformer, Stage1Config
    from model.stage2 import DiTConfig, Re2PixDiT

    if task == "stage1":
        return MaskedFeatureTransformer(Stage1Config.from_dict(config))
    if task == "stage1_diffusion":  # its forward samples the next frame: the rollout takes it as it is
        return stage1_diffusion.FeatureDiffusion(stage1_diffusion.DiffusionStage1Config.from_dict(config))
    if task in ("repa", "videorepa"):
        return repa.from_model_config(config)
    return Re2PixDiT(DiTConfig.from_dict(config))


def resolve_device(device: str, threads: int = 0) -> str:
    """ "auto": CUDA when there is a GPU, else the CPU; threads > 0 sets torch's CPU threads too."""
    from model.runtime import fast_math

    if threads > 0:
        torch.set_num_threads(threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device.startswith("cuda"):
        fast_math()  # TF32 and cuDNN's autotuner, as in training
    return device


def has_checkpoint(path: str | None) -> bool:
    if not path:
        return False
    p = Path(path)
    return (p / "meta.json").exists() or (p / "latest.json").exists()


@dataclass
class Models:
    """Stage 1, Stage 2 (Re2Pix) and, when trained, the Baseline."""

    stage1: LoadedModel
    stage2: LoadedModel
    baseline: LoadedModel | None

    @classmethod
    def load(cls, stage1: str, stage2: str, baseline: str | None, weights="auto", device="cpu") -> Models:
        base = None
        if has_checkpoint(baseline):
            base = load_model(baseline, ("baseline",), weights, device)
        elif baseline:
            log.warning("no Baseline checkpoint at %s: its row is left out", baseline)
        return cls(
            load_model(stage1, ("stage1", "stage1_diffusion"), weights, device),
            load_model(stage2, ("stage2",), weights, device),
            base,
        )

    def check(self, geometry, channels: int, where: str, manifest: dict | None, basis: str | None = None) -> None:
        """The data (`where`: its store's manifest, or only its PCA basis's fingerprint) must be of the models'
        feature space, geometry and channels."""
        for m in [self.stage1, self.stage2] + ([self.baseline] if self.baseline else []):
            m.check_space(where, manifest, basis)
        s1, s2 = self.stage1.model.config, self.stage2.model.cfg
        if tuple(s1.feature_hw) != tuple(geometry.feature_hw) or s1.context_frames != geometry.context_latents:
            raise InferenceError(
                f"Stage 1 takes {s1.context_frames} frames of {tuple(s1.feature_hw)}; the data "
                f"has {geometry.context_latents} of {tuple(geometry.feature_hw)}"
            )
        if max(s1.num_pca_channels, s2.num_pca_channels) > channels:
            raise InferenceError(
                f"the models read {max(s1.num_pca_channels, s2.num_pca_channels)} PCA channels; the data has {channels}"
            )
        for m in [self.stage2] + ([self.baseline] if self.baseline else []):
            if m.model.cfg.latent_channels != geometry.latent_channels:
                raise InferenceError(
                    f"{m.task} takes {m.model.cfg.latent_channels} latent channels, the data {geometry.latent_channels}"
                )

    def describe(self) -> dict:
        out = {"stage1": self.stage1.describe(), "stage2": self.stage2.describe()}
        if self.baseline:
            out["baseline"] = self.baseline.describe()
        return out
