"""Pixel-space metrics of predicted frames on torch alone: PSNR, SSIM, and the Fréchet distance
behind FID (Inception-v3 pool features) and FVD (I3D features). No torchvision, no scipy.

Frames are channels-last, as the decoder returns them: ``[..., H, W, C]`` uint8 (data range 255)
or floating point in [0, 1] (data range 1); metrics come out per frame, ``[...]``.

- **PSNR** = 10 log10(L^2 / MSE) over a frame's H * W * C values; ``inf`` for identical frames.
- **SSIM** follows Wang et al. (2004) as skimage reproduces it with ``gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=L``: an 11 x 11 Gaussian window (sigma 1.5,
  normalised to sum 1), K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2, population (weighted)
  moments, and the mean of the SSIM map over the positions where the whole window fits (skimage
  filters the padded image and crops 5 pixels off each side: the same numbers). Colour frames:
  ``channels="rgb"`` (default) is the mean of the per-channel SSIMs (skimage's ``channel_axis=-1``);
  ``channels="luma"`` is SSIM of the BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B.
- **Fréchet distance** of two Gaussians: |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2,
  in float64 with symmetric eigendecompositions (exact for positive semi-definite covariances,
  which sample covariances are, even when rank-deficient).

Feature networks load from a path the user gives (nothing is downloaded):

- FID: pytorch-fid's Inception weights (``pt_inception-2015-12-05-6726825d.pth``, a state dict for
  :class:`FIDInceptionV3`, loaded with ``weights_only=True``; or the same tensors as safetensors), or
  a TorchScript Inception called ``net(x, return_features=True)`` with x float [N, 3, H, W] in
  0..255 (StyleGAN2-ADA / clean-fid's ``inception-2015-12-05.pt``). pytorch-fid preprocessing for
  the state-dict network: bilinear resize to 299 x 299 (align_corners=False), x -> 2x - 1.
- FVD: a TorchScript I3D called ``net(x, rescale=False, resize=False, return_features=True)`` with
  x float [N, 3, T, 224, 224] in [-1, 1] (StyleGAN-V's ``i3d_torchscript.pt``, 400-d logits): frames
  are resized so the short side is 224 (bilinear), centre-cropped to 224 x 224 and scaled to [-1, 1].
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import InferenceError

__all__ = [
    "FIDInceptionV3",
    "FeatureNet",
    "frechet_distance",
    "gaussian_stats",
    "gaussian_window",
    "load_fid_network",
    "load_fvd_network",
    "psnr",
    "ssim",
]

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
LUMA = (0.299, 0.587, 0.114)


def _as_float(x) -> tuple[torch.Tensor, float]:
    """(float64 tensor, data range): uint8 -> 255, floating point -> 1."""
    x = torch.as_tensor(x)
    if x.dtype == torch.uint8:
        return x.double(), 255.0
    if not x.is_floating_point():
        raise TypeError(f"frames must be uint8 or floating point in [0, 1], got {x.dtype}")
    return x.double(), 1.0


def _pair(pred, target) -> tuple[torch.Tensor, torch.Tensor, float]:
    p, lp = _as_float(pred)
    t, lt = _as_float(target)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and target {tuple(t.shape)} differ")
    if lp != lt:
        raise TypeError("pred and target must both be uint8 or both be floating point")
    if p.ndim < 3:
        raise ValueError(f"frames must be [..., H, W, C], got {tuple(p.shape)}")
    return p, t, lp


def psnr(pred, target) -> torch.Tensor:
    """PSNR in dB per frame: [..., H, W, C] -> [...] float64 (``inf`` where the frames are equal)."""
    p, t, data_range = _pair(pred, target)
    mse = (p - t).pow(2).mean(dim=(-3, -2, -1))
    return 10.0 * torch.log10(data_range**2 / mse)  # mse 0 -> inf


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian taps [size] float64 (the 2-D window is their outer product)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of [N, 1, H, W]."""
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, k))
    return F.conv2d(x, g.view(1, 1, k, 1))


def ssim(pred, target, channels: str = "rgb") -> torch.Tensor:
    """SSIM per frame (module docstring): [..., H, W, C] -> [...] float64, 1 for identical frames."""
    p, t, data_range = _pair(pred, target)
    if channels == "luma":
        if p.shape[-1] != 3:
            raise ValueError("channels='luma' needs RGB frames")
        w = torch.tensor(LUMA, dtype=torch.float64)
        p, t = (p * w).sum(-1, keepdim=True), (t * w).sum(-1, keepdim=True)
    elif channels != "rgb":
        raise ValueError(f"channels must be 'rgb' or 'luma', got {channels!r}")
    *lead, h, w_, c = p.shape
    if min(h, w_) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {h} x {w_}")
    x = p.reshape(-1, h, w_, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w_)  # [N*C, 1, H, W]
    y = t.reshape(-1, h, w_, c).permute(0, 3, 1, 2).reshape(-1, 1, h, w_)
    g = gaussian_window()
    mx, my = _filter(x, g), _filter(y, g)
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(y * y, g) - my * my
    cxy = _filter(x * y, g) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    per_channel = smap.mean(dim=(1, 2, 3)).reshape(-1, c)
    return per_channel.mean(dim=1).reshape(lead)


# --------------------------------------------------------------------------- Fréchet distance


def gaussian_stats(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) of features [N, D] in float64; covariance with N - 1 (np.cov)."""
    f = torch.as_tensor(features).double()
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {tuple(f.shape)}")
    mu = f.mean(dim=0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (module docstring)."""
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    cov1, cov2 = torch.as_tensor(cov1).double(), torch.as_tensor(cov2).double()
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError("means [D] and covariances [D, D] of both distributions must match in D")
    s1 = _psd_sqrt(cov1)
    inner = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt
    return float(value)


# --------------------------------------------------------------------------- Inception-v3 (FID)


class _Conv(nn.Module):
    """BasicConv2d of torchvision: conv (no bias), BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the FID blocks average without counting the padding (TF's behaviour)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _BlockA(nn.Module):
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _BlockB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class _BlockD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _BlockE(nn.Module):
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # pytorch-fid's FIDInceptionE_2 (the last block) max-pools
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's Inception-v3 (TF-ported FID network), up to the 2048-d pool3 features.

    Parameter names are torchvision's, so pytorch-fid's weight file loads as is (its 1008-way
    ``fc`` is not used). ``forward`` takes float [N, 3, H, W] in [0, 1] and returns [N, 2048].
    """

    FEATURES = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------- feature networks


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


class FeatureNet:
    """A frozen feature network with its preprocessing. ``net(frames)`` -> float64 [N, D] on CPU.

    kind "fid": frames uint8 [N, H, W, 3]. kind "fvd": videos uint8 [N, T, H, W, 3].
    """

    def __init__(self, module, kind: str, style: str, path: str, device="cpu", batch: int = 16):
        self.module, self.kind, self.style, self.path = module, kind, style, str(path)
        self.device, self.batch = torch.device(device), batch

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8:
            raise TypeError(f"{self.kind} features take uint8 frames, got {x.dtype}")
        x = x.to(self.device)
        if self.kind == "fid":  # [N, H, W, 3] -> [N, 3, H, W]
            x = x.permute(0, 3, 1, 2).float()
            return x if self.style == "torchscript" else x / 255.0
        n, t, h, w, _ = x.shape  # videos: short side -> 224, centre crop, [-1, 1]
        frames = x.reshape(n * t, h, w, 3).permute(0, 3, 1, 2).float() / 255.0
        scale = 224 / min(h, w)
        size = (max(224, math.ceil(h * scale)), max(224, math.ceil(w * scale)))
        frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
        frames = frames[:, :, top : top + 224, left : left + 224]
        return (frames.reshape(n, t, 3, 224, 224).permute(0, 2, 1, 3, 4) * 2 - 1).contiguous()

    @torch.inference_mode()
    def __call__(self, x) -> torch.Tensor:
        out = []
        for i in range(0, len(x), self.batch):
            inp = self._prepare(x[i : i + self.batch])
            if self.style == "torchscript" and self.kind == "fid":
                f = self.module(inp, return_features=True)
            elif self.style == "torchscript":
                f = self.module(inp, rescale=False, resize=False, return_features=True)
            else:
                f = self.module(inp)
            out.append(f.reshape(f.shape[0], -1).double().cpu())
        return torch.cat(out)


def load_fid_network(path, device="cpu") -> FeatureNet:
    """The FID Inception from a user-given file (module docstring); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"--fid-weights {path}: no such file")
    if _is_torchscript(path):
        return FeatureNet(torch.jit.load(str(path), map_location=device).eval(), "fid", "torchscript", path, device)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InferenceError(f"--fid-weights {path}: neither TorchScript nor a tensor state dict ({e})") from e
    if not isinstance(state, dict):
        raise InferenceError(f"--fid-weights {path}: expected a state dict of tensors, got {type(state).__name__}")
    net = FIDInceptionV3()
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InferenceError(
            f"--fid-weights {path} is not pytorch-fid's Inception-v3: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return FeatureNet(net.to(device).eval(), "fid", "inception", path, device)


def load_fvd_network(path, device="cpu") -> FeatureNet:
    """The FVD I3D: a TorchScript file (StyleGAN-V's i3d_torchscript.pt convention)."""
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"--fvd-weights {path}: no such file")
    if not _is_torchscript(path):
        raise InferenceError(
            f"--fvd-weights {path} is not a TorchScript file: FVD takes the I3D as TorchScript "
            "(e.g. StyleGAN-V's i3d_torchscript.pt)"
        )
    return FeatureNet(
        torch.jit.load(str(path), map_location=device).eval(), "fvd", "torchscript", path, device, batch=4
    )


def load_feature_networks(fid: bool, fid_weights, fvd: bool, fvd_weights, decode: bool, device, skipped: dict):
    """(FID network or None, FVD network or None) for evaluation's flags: --fid / --fvd require their
    weights (nothing is downloaded), either needs decoded frames (`decode`); what is not measured, the
    pixel metrics without `decode` included, goes to `skipped` with the reason."""
    want_fid, want_fvd = fid or bool(fid_weights), fvd or bool(fvd_weights)
    if want_fid and not fid_weights:
        raise InferenceError(
            "FID needs the Inception-v3 weights: give --fid-weights PATH (pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth, or a TorchScript Inception); nothing is downloaded"
        )
    if want_fvd and not fvd_weights:
        raise InferenceError(
            "FVD needs the I3D network: give --fvd-weights PATH (a TorchScript I3D such as "
            "StyleGAN-V's i3d_torchscript.pt); nothing is downloaded"
        )
    if (want_fid or want_fvd) and not decode:
        raise InferenceError("FID and FVD need decoded frames: drop --no-decode")
    if not decode:
        skipped["pixels"] = "--no-decode: PSNR, SSIM, FID, FVD and the decoded frames' segmentation/depth"
    if not want_fid:
        skipped["fid"] = "no --fid-weights given"
    if not want_fvd:
        skipped["fvd"] = "no --fvd-weights given"
    return (
        load_fid_network(fid_weights, device) if want_fid else None,
        load_fvd_network(fvd_weights, device) if want_fvd else None,
    )
