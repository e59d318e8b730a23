"""The PV-VAE objective of scripts/train_demo_vae.py (issue #28): partial temporal context at the encoder
only, the motion-aware loss on frame differences, the decoder phase with the encoder frozen; and
`--vae demo-predictive`, whose weights the same script makes."""

from argparse import Namespace

import numpy as np
import pytest
import torch

from scripts.train_demo_vae import INPUT_HW, kept_chunks, motion_loss, train_phase, training_loss


def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, num_res_blocks=1, z_dim=16)


def objective_args(**kw) -> Namespace:
    values = dict(predictive_drop=0.0, motion_weight=0.0, mse_weight=1.0, kl_weight=0.0, warmup=1)
    return Namespace(**{**values, **kw})


def inputs_of(module, run) -> list[torch.Tensor]:
    """What `module` was called with during run() (the causal WAN encoder and decoder go chunk by chunk)."""
    seen = []
    hook = module.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    try:
        run()
    finally:
        hook.remove()
    return seen


def test_predictive_objective_drops_frames_at_the_encoder_only_and_scores_every_frame():
    vae = tiny_vae()
    x = torch.rand(2, 3, 9, 16, 16) * 2 - 1  # 3 latent chunks: frame 0, frames 1-4, frames 5-8
    args = objective_args(predictive_drop=1.0, motion_weight=0.5)
    draws = np.random.default_rng(0)
    draws.random()  # kept_chunks' draws: whether to drop (always, p = 1), then k
    k = int(draws.integers(1, 3))
    out = {}

    def step():
        out["loss"], _, out["y"] = training_loss(vae, x, np.random.default_rng(0), args)

    decoded = []
    decoder_hook = vae.post_quant_conv.register_forward_pre_hook(lambda _, i: decoded.append(i[0].detach().clone()))
    try:
        seen = torch.cat(inputs_of(vae.encoder, step), dim=2)
    finally:
        decoder_hook.remove()
    assert torch.equal(seen, x[:, :, : 1 + 4 * (k - 1)])  # the encoder saw the first k chunks' frames only
    (z,) = decoded
    assert z.shape[2] == 3 and torch.all(z[:, :, k:] == 0) and torch.any(z[:, :, :k] != 0)  # padded latents
    y = out["y"]
    assert y.shape == x.shape  # the decoder reconstructs every frame of the window
    want = (y - x).abs().mean() + ((y - x) ** 2).mean() + 0.5 * motion_loss(y, x)  # kl_weight 0
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)  # the loss covers every real frame
    kept = slice(0, 1 + 4 * (k - 1))
    yk, xk = y[:, :, kept], x[:, :, kept]
    kept_only = (yk - xk).abs().mean() + ((yk - xk) ** 2).mean() + 0.5 * motion_loss(yk, xk)
    assert out["loss"].item() != pytest.approx(kept_only.item(), rel=1e-3)  # not just the frames it saw


def test_without_the_flag_the_encoder_sees_the_whole_window_and_no_random_draw_is_made():
    vae = tiny_vae()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    seen = torch.cat(inputs_of(vae.encoder, lambda: training_loss(vae, x, rng, objective_args())), dim=2)
    assert torch.equal(seen, x) and rng.bit_generator.state == state  # today's trainer, draw for draw
    assert kept_chunks(2, rng, 0.0) == 2 and rng.bit_generator.state == state


def test_motion_loss_is_the_l1_of_frame_differences():
    x = torch.zeros(1, 3, 3, 4, 4)
    x[:, :, 1:] = 1.0  # a step between frames 0 and 1
    assert motion_loss(x + 0.25, x).item() == 0.0  # a constant offset has the target's motion
    still = torch.zeros_like(x)
    assert motion_loss(still, x).item() == pytest.approx(0.5)  # differences (1, 0) vs (0, 0): mean 0.5


def test_decoder_phase_leaves_the_encoder_unchanged_and_trains_the_decoder():
    vae = tiny_vae()
    train = np.random.default_rng(0).integers(0, 256, (2, 9, *INPUT_HW, 3), dtype=np.uint8)
    args = objective_args(predictive_drop=0.5, motion_weight=0.5, kl_weight=1e-4)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    rng = np.random.default_rng(0)
    train_phase(vae, train, rng, "decoder", 2, 1, 5, (16, 16), 1e-2, args, decoder_only=True)
    after = vae.state_dict()
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    assert all(q.requires_grad for q in vae.parameters())  # a later phase trains everything again


def test_demo_predictive_without_weights_names_the_missing_file_and_the_command(tmp_path):
    from pipeline.encoders import EncoderWeightsError
    from pipeline.encoders.vae import DEMO_VAES, demo_vae_model

    stem = tmp_path / "demo_wan_vae_predictive"
    stem.with_suffix(".json").write_text("{}")  # only the weights are missing
    with pytest.raises(EncoderWeightsError) as e:
        demo_vae_model(stem, "demo-predictive")
    message = str(e.value)
    assert "\n" not in message and str(stem.with_suffix(".safetensors")) in message and ".json" not in message
    assert f"`python {DEMO_VAES['demo-predictive'][1]}`" in message
    assert "--predictive-drop" in message and "--out pipeline/encoders/weights/demo_wan_vae_predictive" in message
