"""bf16 where it is safe: the sampler's network evaluations under autocast with its update arithmetic in
float32, and the encoders at inference in the precision the cache job recorded in the store manifest."""

import pytest
import torch

from inference.encoders import load_dinov2_for, load_vae_for
from inference.sampling import Sampler
from model.diffusion import sample
from model.stage2 import DiTConfig, Re2PixDiT
from pipeline.encoders.registry import cache_precision
from pipeline.store.format import compatibility_view
from pipeline.store.geometry import TINY


def _random_dit() -> Re2PixDiT:
    torch.manual_seed(0)
    model = Re2PixDiT(DiTConfig.tiny(num_pca_channels=16)).eval()
    with torch.no_grad():  # a fresh DiT predicts F = 0 whatever its input: give the zero layers weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_bf16_sampling_stays_close_to_fp32_and_auto_is_fp32_on_cpu():
    model = _random_dit()
    ctx, feats = torch.randn(1, 16, 4, 8, 16), torch.randn(1, 7, 4, 8, 16)
    noise = torch.randn(1, 16, 3, 8, 16)
    run = {p: Sampler(steps=4, precision=p)(model, ctx, feats, noise) for p in ("auto", "fp32", "bf16")}
    exact = sample(model, ctx, feats, num_steps=4, num_future=3, initial_noise=noise)
    torch.testing.assert_close(run["auto"], exact, rtol=0, atol=0)  # CPU: float32 unless asked
    torch.testing.assert_close(run["fp32"], exact, rtol=0, atol=0)
    assert run["bf16"].dtype == torch.float32  # the update arithmetic stays float32
    future = slice(4, None)
    err = (run["bf16"][:, :, future] - exact[:, :, future]).norm() / exact[:, :, future].norm()
    assert 0 < err < 0.05  # bf16 did run, and stays close
    torch.testing.assert_close(run["bf16"][:, :, :4], ctx)  # the context is held exactly


def test_sampler_precision_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        Sampler(steps=2, precision="fp16")(
            _random_dit(), torch.randn(1, 16, 4, 8, 16), None, torch.randn(1, 16, 3, 8, 16)
        )


def test_the_cache_job_records_bf16_on_gpu_and_fp32_on_cpu():
    assert [cache_precision(n, "cuda") for n in ("dinov2", "vae")] == ["bf16", "bf16"]
    assert [cache_precision(n, "cpu") for n in ("dinov2", "vae")] == ["fp32", "fp32"]


@pytest.mark.parametrize("recorded", [None, "fp32", "bf16"])
def test_inference_encoders_use_the_precision_the_manifest_records(recorded):
    entry = {} if recorded is None else {"precision": recorded}
    manifest = {"encoders": {"vae": {"weights_id": "tiny", **entry}, "dinov2": {"weights_id": "tiny", **entry}}}
    want = torch.bfloat16 if recorded == "bf16" else None
    assert load_vae_for(None, manifest, TINY, "cpu").autocast_dtype is want
    assert load_dinov2_for(None, manifest, TINY, "cpu").autocast_dtype is want


def test_stores_encoded_in_another_precision_read_together():
    a = {"encoders": {"vae": {"name": "wan2.1_vae", "precision": "bf16"}}}
    b = {"encoders": {"vae": {"name": "wan2.1_vae", "precision": "fp32"}}}
    assert compatibility_view(a) == compatibility_view(b)
