"""PSNR, SSIM and the Fréchet distance against values derived by hand, and the FID / FVD network loaders."""

import math

import numpy as np
import pytest
import torch

from inference import InferenceError
from inference.video_metrics import (
    FIDInceptionV3,
    frechet_distance,
    gaussian_stats,
    gaussian_window,
    load_fid_network,
    load_fvd_network,
    psnr,
    ssim,
)


def frames(seed=0, shape=(3, 24, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_psnr_identical_is_inf_and_known_constant_error():
    x = frames()
    assert torch.isinf(psnr(x, x)).all()
    y = x.astype(np.int16)
    y = np.where(y < 255, y + 1, y - 1).astype(np.uint8)  # every value off by exactly 1: MSE 1
    out = psnr(y, x)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 20 * math.log10(255), dtype=torch.float64), atol=1e-9)  # 48.1308 dB
    assert abs(float(out[0]) - 48.1308) < 1e-4


def test_psnr_float_frames_use_range_one():
    x = torch.rand(2, 16, 16, 3, dtype=torch.float64)
    y = (x + 0.1).clamp(max=10)  # constant error 0.1 -> MSE 0.01 -> 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2,), 20.0, dtype=torch.float64), atol=1e-9)
    with pytest.raises(TypeError):
        psnr(x, (x * 255).to(torch.uint8))


def test_ssim_identical_is_one_and_constant_images_closed_form():
    x = frames(1)
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64), atol=1e-12)
    a = np.full((20, 20, 3), 100, np.uint8)
    b = np.full((20, 20, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)  # variances and covariance are 0
    assert abs(float(ssim(a, b)) - want) < 1e-12


def test_ssim_single_window_matches_hand_computation():
    # An 11 x 11 frame holds exactly one window position: SSIM is the formula on the weighted moments.
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (11, 11, 1)).astype(np.float64)
    y = np.clip(0.7 * x + rng.normal(0, 20, x.shape) + 30, 0, 255).round()
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    xs, ys = x[..., 0], y[..., 0]
    mx, my = (w * xs).sum(), (w * ys).sum()
    vx, vy = (w * (xs - mx) ** 2).sum(), (w * (ys - my) ** 2).sum()
    cxy = (w * (xs - mx) * (ys - my)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    got = float(ssim(x.astype(np.uint8), y.astype(np.uint8)))
    assert abs(got - want) < 1e-10
    assert 0 < want < 1


def test_ssim_matches_skimage_algorithm_via_scipy_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
    y = np.clip(x.astype(np.int16) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)

    def ref(a, b):  # skimage.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        a, b = a.astype(np.float64), b.astype(np.float64)
        filt = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5)
        mx, my = filt(a), filt(b)
        vx, vy, cxy = filt(a * a) - mx * mx, filt(b * b) - my * my, filt(a * b) - mx * my
        c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
        s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        return s[5:-5, 5:-5].mean()

    want = [np.mean([ref(x[i, ..., c], y[i, ..., c]) for c in range(3)]) for i in range(2)]
    assert np.allclose(ssim(x, y).numpy(), want, atol=1e-10)
    luma = np.array([0.299, 0.587, 0.114])
    want_y = [ref(x[i] @ luma, y[i] @ luma) for i in range(2)]
    assert np.allclose(ssim(x, y, channels="luma").numpy(), want_y, atol=1e-10)


def test_ssim_refuses_small_frames_and_window_is_normalised():
    assert abs(float(gaussian_window().sum()) - 1) < 1e-15
    with pytest.raises(ValueError, match="11 x 11"):
        ssim(np.zeros((10, 40, 3), np.uint8), np.zeros((10, 40, 3), np.uint8))


def test_frechet_distance_closed_forms():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    want = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())  # diagonal: sum (sqrt a - sqrt b)^2 = 1 + 1 + 0
    assert abs(frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) - want) < 1e-10
    # non-commuting 2 x 2: tr sqrt(S1^1/2 S2 S1^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    tr = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
    want = float(torch.trace(s1) + torch.trace(s2)) - 2 * tr
    assert abs(frechet_distance(torch.zeros(2), s1, torch.zeros(2), s2) - want) < 1e-10
    assert abs(frechet_distance(mu1, torch.diag(a), mu1, torch.diag(a))) < 1e-9


def test_gaussian_stats_match_numpy_cov():
    f = np.random.default_rng(4).normal(size=(50, 6))
    mu, cov = gaussian_stats(f)
    assert np.allclose(mu.numpy(), f.mean(0)) and np.allclose(cov.numpy(), np.cov(f, rowvar=False))


def test_fid_inception_loads_its_state_dict_and_gives_2048_features(tmp_path):
    net = FIDInceptionV3()
    state = dict(net.state_dict(), **{"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    torch.save(state, tmp_path / "pt_inception.pth")  # pytorch-fid's file layout (with its fc)
    fid_net = load_fid_network(tmp_path / "pt_inception.pth")
    feats = fid_net(frames(5, (2, 40, 60, 3)))
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InferenceError, match="not pytorch-fid"):
        load_fid_network(tmp_path / "other.pth")
    with pytest.raises(InferenceError, match="--fid-weights"):
        load_fid_network(tmp_path / "missing.pth")


class _TinyI3D(torch.nn.Module):
    """Stands in for StyleGAN-V's TorchScript I3D: same call convention, mean colour per clip."""

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        assert not rescale and not resize and return_features
        return torch.cat([x.mean(dim=(2, 3, 4)), x.amin(dim=(1, 2, 3, 4))[:, None]], dim=1)


def test_fvd_network_is_torchscript_with_i3d_convention(tmp_path):
    torch.jit.script(_TinyI3D()).save(str(tmp_path / "i3d.pt"))
    net = load_fvd_network(tmp_path / "i3d.pt")
    videos = np.zeros((3, 12, 48, 80, 3), np.uint8)
    videos[1] = 255
    feats = net(videos)
    assert feats.shape == (3, 4)
    assert torch.allclose(feats[0], torch.tensor([-1.0, -1, -1, -1], dtype=torch.float64))  # [-1, 1] input
    assert torch.allclose(feats[1], torch.ones(4, dtype=torch.float64))
    torch.save({"a": torch.zeros(1)}, tmp_path / "state.pth")
    with pytest.raises(InferenceError, match="TorchScript"):
        load_fvd_network(tmp_path / "state.pth")
