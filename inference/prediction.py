"""One prediction (docs/design.md, eq. 8): Stage 1 rolls out the features of latents 4-6 from the 4 context
feature maps, Stage 2 samples latents 4-6 conditioned on [context features, forecast features] (Re2Pix)
and without features (the Baseline, when there is one), both from the same initial noise, and the VAE
decodes [z0..z3, ẑ4..ẑ6] as one sequence into 25 frames, of which 13-24 are the prediction. Scored by
PSNR / SSIM per predicted frame against the ground truth when there is one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .codec import LatentCodec
from .inputs import ClipInput
from .sampling import Sampler, forecast_features, sample_models, stage2_features
from .stages import Models


@dataclass
class Prediction:
    clip: ClipInput
    forecast: np.ndarray  # [3, H, W, c1] Stage 1 features of latents 4-6
    latents: dict  # name -> [16, 7, h, w] float32 (re2pix, baseline)
    frames: dict  # "ground truth", "Baseline", "Re2Pix" -> uint8 [25 (or 13 for GT), H, W, 3]
    ground_truth: str | None  # "source_frames", "vae_reconstruction", "video" or None
    reconstruction: np.ndarray | None = None  # store clip: the VAE decoding of its stored latents [25, H, W, 3]


def predict_clip(
    clip: ClipInput, models: Models, sampler: Sampler, codec: LatentCodec, geometry, seed: int = 0
) -> Prediction:
    m, fut = geometry.context_latents, geometry.future_latents
    device = next(models.stage2.model.parameters()).device
    context = torch.from_numpy(clip.features[None, :m]).to(device)  # [1, 4, H, W, C]
    forecast = forecast_features(models, context, fut)  # [1, 3, H, W, c1]
    features = stage2_features(context, forecast, models.stage2.model.cfg.num_pca_channels)
    z_ctx = torch.from_numpy(clip.latents[None, :, :m]).to(device)
    gen = torch.Generator().manual_seed(seed)  # the same noise on every device
    noise = torch.randn((1, z_ctx.shape[1], fut, *z_ctx.shape[3:]), generator=gen).to(device)
    sampled = sample_models(models, sampler, z_ctx, features, noise)
    frames, gt, recon = {}, None, None
    decode = codec.decode_after(z_ctx)  # the context decoded once for the reconstruction and both models
    if clip.latents.shape[1] == geometry.latent_frames:  # a whole clip's latents (a store's, a 25-frame video's)
        recon = decode(torch.from_numpy(clip.latents[None, :, m:]))[0]
    if clip.frames is not None:
        frames["ground truth"], gt = clip.frames, clip.frames_kind
    elif recon is not None:
        frames["ground truth"], gt = recon, "vae_reconstruction"
    names = {"baseline": "Baseline", "re2pix": "Re2Pix"}
    for key in ("baseline", "re2pix"):
        if key in sampled:
            frames[names[key]] = decode(sampled[key][:, :, m:])[0]
    return Prediction(
        clip, forecast[0].cpu().numpy(), {k: v[0].cpu().numpy() for k, v in sampled.items()}, frames, gt, recon
    )


def frame_scores(pred: Prediction, geometry, reference: str = "ground truth") -> dict:
    """PSNR / SSIM per predicted frame against the ground truth (when there is one), or with
    reference="vae_reconstruction" against the VAE decoding of the stored latents."""
    from inference.video_metrics import psnr, ssim

    gt = pred.frames.get("ground truth") if reference == "ground truth" else pred.reconstruction
    if gt is None or len(gt) < geometry.clip_frames:
        return {}
    s = slice(geometry.context_frames, geometry.clip_frames)
    out = {}
    for name in ("Baseline", "Re2Pix"):
        if name in pred.frames:
            out[name.lower()] = {
                "psnr": [round(float(v), 4) for v in psnr(pred.frames[name][s], gt[s])],
                "ssim": [round(float(v), 5) for v in ssim(pred.frames[name][s], gt[s])],
            }
    return out


def reconstruction_scores(pred: Prediction) -> dict:
    """Mean PSNR / SSIM of the VAE reconstruction against the source (or video) frames, context and
    predicted frames: the most a decoded prediction can reach."""
    from inference.video_metrics import psnr, ssim

    if pred.ground_truth not in ("source_frames", "video") or pred.reconstruction is None:
        return {}
    gt, rec = pred.frames["ground truth"], pred.reconstruction
    return {"psnr": round(float(psnr(rec, gt).mean()), 4), "ssim": round(float(ssim(rec, gt).mean()), 5)}
