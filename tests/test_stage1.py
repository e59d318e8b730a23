"""Stage 1 masked feature transformer: shapes, masking, size, rollout, batching, and that it learns."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.stage1 import MaskedFeatureTransformer, Stage1Config, loss, rollout, stage1_batch


def _randomize_output(model: MaskedFeatureTransformer, seed: int = 0) -> MaskedFeatureTransformer:
    """A fresh model's output weight is zero (it predicts a constant): give it a random one so that
    tests about what the output depends on are not vacuous."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.output_proj.weight.copy_(torch.randn(model.output_proj.weight.shape, generator=g) * 0.1)
    return model


def _tiny_model(seed: int = 0, **overrides) -> MaskedFeatureTransformer:
    torch.manual_seed(seed)
    return _randomize_output(MaskedFeatureTransformer(Stage1Config.tiny(**overrides)), seed).eval()


def _features(b: int, t: int, cfg: Stage1Config, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = cfg.feature_hw
    return torch.randn(b, t, h, w, cfg.num_pca_channels, generator=g)  # [B, T, H, W, C]


def test_tiny_forward_shapes():
    cfg = Stage1Config.tiny()
    assert cfg.num_frames == 5 and cfg.context_frames == 4
    assert 64 <= cfg.dim <= 96 and 2 <= cfg.num_layers <= 4 and cfg.num_heads == 4
    model = _tiny_model()
    context = _features(2, 4, cfg)
    pred = model(context)
    assert pred.shape == (2, *cfg.feature_hw, cfg.num_pca_channels)
    assert torch.isfinite(pred).all()
    # Transformer input: context + one masked frame, at hidden width.
    assert model.embed(context).shape == (2, 5, *cfg.feature_hw, cfg.dim)
    # fp16 features (as stored) are accepted.
    assert model(context.half()).dtype == torch.float32


def test_fresh_model_predicts_zero():
    # Zero-initialised output weight and bias (as DINO-Foresight's fc_out): prediction is the PCA mean.
    model = MaskedFeatureTransformer(Stage1Config.tiny())
    assert torch.equal(model(_features(1, 4, model.config)), torch.zeros(1, 8, 14, 64))


def test_target_frame_is_replaced_by_mask_token():
    model = _tiny_model()
    cfg = model.config
    window = _features(2, 5, cfg, seed=1)  # context + target, as DINO-Foresight's trainer feeds it
    other = window.clone()
    other[:, 4] = torch.randn_like(other[:, 4]) * 100.0
    with torch.no_grad():
        out = model(window)
        # The target frame's values never reach the output ...
        assert torch.equal(out, model(other))
        # ... and a 5-frame window gives exactly what its 4 context frames give.
        assert torch.equal(out, model(window[:, :4]))
        # The internal 5-frame input: frame 4 is the learned mask token plus its position
        # embedding, the same for every sample; frames 0-3 are the projected context.
        tokens = model.embed(window[:, :4])
        pos = model.pos_embed()  # [T, H, W, d]
        expected_mask = model.mask_token.expand(*cfg.feature_hw, cfg.dim) + pos[4]
        torch.testing.assert_close(tokens[:, 4], expected_mask.expand(2, -1, -1, -1))
        torch.testing.assert_close(tokens[:, :4], model.input_proj(window[:, :4]) + pos[:4])
        # The output does depend on the context (the test above is not vacuous).
        changed = window[:, :4].clone()
        changed[:, 3] += 1.0
        assert not torch.allclose(out, model(changed))
    # The mask token is a trained parameter: the loss sends it a gradient.
    model.train()
    loss(model(window[:, :4]), window[:, 4]).backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_position_embeddings_break_symmetry():
    # With a spatially constant input, only the position embeddings tell tokens apart: the
    # prediction must still vary over (h, w).
    model = _tiny_model()
    cfg = model.config
    const = torch.ones(1, 4, *cfg.feature_hw, cfg.num_pca_channels)
    with torch.no_grad():
        pred = model(const)
    assert pred.std(dim=(1, 2)).mean() > 1e-4
    assert model.pos_embed().shape == (5, *cfg.feature_hw, cfg.dim)


def test_rejects_wrong_shapes():
    model = _tiny_model()
    cfg = model.config
    with pytest.raises(ValueError):
        model(_features(1, 3, cfg))  # too few frames
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, 8, 12, cfg.num_pca_channels))  # wrong grid
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, *cfg.feature_hw, 32))  # wrong channels
    with pytest.raises(ValueError):
        Stage1Config.tiny(dim=100)  # not divisible by 3 for the (t, h, w) tables
    with pytest.raises(ValueError):
        Stage1Config.tiny(dim=96, num_heads=5)


def test_config_round_trips_through_a_dict():
    cfg = Stage1Config.tiny(num_layers=3)
    # JSON turns the (H, W) tuple into a list; from_dict restores it.
    values = {**cfg.to_dict(), "feature_hw": list(cfg.feature_hw)}
    assert Stage1Config.from_dict(values) == cfg
    with pytest.raises(ValueError):
        Stage1Config.from_dict({**cfg.to_dict(), "num_blocks": 3})


def test_paper_preset_parameter_count():
    cfg = Stage1Config.paper()
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.num_pca_channels) == (1152, 12, 8, 1152)
    assert cfg.feature_hw == (32, 56) and cfg.num_frames == 5
    with torch.device("meta"):
        model = MaskedFeatureTransformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"Stage 1 paper preset: {n:,} parameters")
    d, c, (h, w) = cfg.dim, cfg.num_pca_channels, cfg.feature_hw
    per_block = 2 * (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 3 * 2 * d  # 2 attentions, MLP, 3 norms
    expected = (
        cfg.num_layers * per_block
        + 2 * (c * d + d)  # input projection (C -> d), output projection (d -> C), with biases
        + (cfg.num_frames + h + w) * (d // 3)  # t, h, w position tables
        + 2 * d  # final norm
        + d  # mask token
    )
    assert n == expected == 257_762_304
    # docs/design.md, "Reading the paper": Stage 1 is "≈ 260M by our count"; the paper's Re2Pix 1.1B minus its 782M DiT
    # leaves ≈ 320M for Stage 1 plus the DiT's feature embedding. Within ±8 % of 260M.
    assert 240e6 <= n <= 280e6


def test_rollout_feeds_back_its_own_predictions():
    model = _tiny_model()
    cfg = model.config
    context = _features(2, 4, cfg, seed=3)
    calls = []
    handle = model.register_forward_hook(lambda mod, args, out: calls.append((args[0].clone(), out.clone())))
    try:
        with torch.no_grad():
            preds = rollout(model, context, steps=3)
    finally:
        handle.remove()
    assert preds.shape == (2, 3, *cfg.feature_hw, cfg.num_pca_channels)
    assert len(calls) == 3
    (in0, out0), (in1, out1), (in2, out2) = calls
    # frame 4 from (0, 1, 2, 3)
    assert torch.equal(in0, context)
    # frame 5 from (1, 2, 3, 4̂)
    assert torch.equal(in1[:, :3], context[:, 1:])
    assert torch.equal(in1[:, 3], out0)
    # frame 6 from (2, 3, 4̂, 5̂)
    assert torch.equal(in2[:, :2], context[:, 2:])
    assert torch.equal(in2[:, 2], out0) and torch.equal(in2[:, 3], out1)
    for i, out in enumerate((out0, out1, out2)):
        assert torch.equal(preds[:, i], out)
    # Predictions differ from step to step (the window really moves).
    assert not torch.allclose(preds[:, 0], preds[:, 1])
    with pytest.raises(ValueError):
        rollout(model, _features(2, 5, cfg))


def test_stage1_batch_windows_and_determinism():
    b, t, h, w, c = 64, 7, 2, 3, 4
    # Each frame holds its own (sample, frame) code, so alignment is checkable.
    code = torch.arange(b)[:, None] * 100 + torch.arange(t)[None, :]  # [B, T]
    features = code[:, :, None, None, None].expand(b, t, h, w, c).float()
    context, target = stage1_batch(features, torch.Generator().manual_seed(0))
    assert context.shape == (b, 4, h, w, c) and target.shape == (b, h, w, c)
    target_idx = target[:, 0, 0, 0].long() - torch.arange(b) * 100
    assert set(target_idx.tolist()) == {4, 5, 6}  # every future frame is a target
    for i in range(b):
        ti = int(target_idx[i])
        assert torch.equal(context[i, :, 0, 0, 0], features[i, ti - 4 : ti, 0, 0, 0])
    again = stage1_batch(features, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], context) and torch.equal(again[1], target)
    different = stage1_batch(features, torch.Generator().manual_seed(1))
    assert not torch.equal(different[1], target)
    # Roughly uniform over {4, 5, 6}.
    many = stage1_batch(features.repeat(16, 1, 1, 1, 1), torch.Generator().manual_seed(2))[1]
    idx = many[:, 0, 0, 0].long() % 100
    counts = torch.bincount(idx, minlength=7)[4:]
    assert counts.min() > 0.25 * len(idx)
    with pytest.raises(ValueError):
        stage1_batch(features[:, :4])


def test_loss_is_smooth_l1_with_dino_foresight_beta():
    assert Stage1Config.paper().smooth_l1_beta == 0.1
    zero = torch.zeros(1, 2, 2, 3)
    # quadratic region |x| < beta: 0.5 x^2 / beta
    torch.testing.assert_close(loss(zero, zero + 0.05), torch.tensor(0.5 * 0.05**2 / 0.1))
    # linear region: |x| - beta / 2
    torch.testing.assert_close(loss(zero, zero + 1.0), torch.tensor(1.0 - 0.05))
    a, b = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(loss(a, b), F.smooth_l1_loss(a, b, beta=0.1))
    torch.testing.assert_close(loss(a, b, beta=1.0), F.smooth_l1_loss(a, b))
    assert loss(a.half(), b.half()).dtype == torch.float32
    with pytest.raises(ValueError):
        loss(a, b[:1])


def test_gradient_checkpointing_matches():
    cfg = Stage1Config.tiny(num_layers=2)
    x = _features(2, 4, cfg, seed=4)
    y = _features(2, 1, cfg, seed=5)[:, 0]
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = _randomize_output(MaskedFeatureTransformer(Stage1Config.tiny(gradient_checkpointing=ckpt)))
        model.train()
        loss(model(x), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def _translating_clips(n: int, frames: int, hw: tuple[int, int], c: int, seed: int) -> torch.Tensor:
    """Smooth periodic fields (a few low spatial frequencies, random per channel) that translate by
    one cell per frame, each clip in its own direction: [n, frames, H, W, C]."""
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    clips = []
    for i in range(n):
        field = torch.zeros(c, h, w)
        for ky, kx in [(0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 1)]:
            amp = torch.randn(c, 1, 1, generator=g)
            phase = torch.rand(c, 1, 1, generator=g) * 2 * math.pi
            field += amp * torch.cos(2 * math.pi * (ky * yy / h + kx * xx / w) + phase)
        field = field / field.std()
        dim, shift = [(2, 1), (2, -1), (1, 1), (1, -1)][i % 4]
        clip = torch.stack([torch.roll(field, shifts=shift * t, dims=dim) for t in range(frames)])
        clips.append(clip.permute(0, 2, 3, 1))  # [T, H, W, C]
    return torch.stack(clips)


@pytest.mark.slow
def test_tiny_model_overfits_translating_clips():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = Stage1Config.tiny()
        clips = _translating_clips(4, 7, cfg.feature_hw, cfg.num_pca_channels, seed=0)  # [4, 7, H, W, C]
        # Evaluation set: all three windows of every clip (targets 4, 5, 6).
        eval_context = torch.cat([clips[:, t - 4 : t] for t in (4, 5, 6)])
        eval_target = torch.cat([clips[:, t] for t in (4, 5, 6)])
        torch.manual_seed(0)
        model = MaskedFeatureTransformer(cfg)
        with torch.no_grad():
            loss_before = loss(model(eval_context), eval_target).item()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
        g = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(80):
            context, target = stage1_batch(clips, g)
            step_loss = loss(model(context), target, beta=cfg.smooth_l1_beta)
            opt.zero_grad()
            step_loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = model(eval_context)
            loss_after = loss(pred, eval_target).item()
            mse_model = F.mse_loss(pred, eval_target).item()
            mse_copy = F.mse_loss(eval_context[:, -1], eval_target).item()
            rolled = rollout(model, clips[:, :4], steps=3)
            mse_rollout = F.mse_loss(rolled, clips[:, 4:]).item()
            mse_rollout_copy = F.mse_loss(clips[:, 3:4].expand_as(rolled), clips[:, 4:]).item()
        print(
            f"loss {loss_before:.4f} -> {loss_after:.5f}; MSE model {mse_model:.5f} vs copy {mse_copy:.4f}; "
            f"rollout {mse_rollout:.5f} vs copy {mse_rollout_copy:.4f}"
        )
        assert loss_after * 10 <= loss_before
        assert mse_model < mse_copy
        assert mse_rollout < mse_rollout_copy
    finally:
        torch.set_num_threads(threads)
