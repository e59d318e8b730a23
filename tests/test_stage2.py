"""Stage 2 DiT: sizes, RoPE, early fusion, Baseline behaviour."""

import pytest
import torch

from model.stage2 import (
    DiTConfig,
    Re2PixDiT,
    SelfAttention,
    apply_rope,
    grid_positions,
    parameter_breakdown,
    rope_angles,
    rope_split,
)

PAPER_BASELINE_PARAMS = 782e6


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every weight off its (partly zero) initialisation so outputs depend on all inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _inputs(b=2, t=7, h=8, w=12, cf=64, hf=8, wf=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, t, h, w, generator=g)
    c_noise = torch.rand(b, t, generator=g)
    mask = (torch.arange(t) < 4)[None].expand(b, t)
    features = torch.randn(b, t, hf, wf, cf, generator=g)
    return x, c_noise, mask, features


def test_paper_param_count_matches_baseline_782m():
    with torch.device("meta"):
        baseline = Re2PixDiT(DiTConfig.paper(semantic=False))
        semantic = Re2PixDiT(DiTConfig.paper())
    counts = parameter_breakdown(baseline)
    assert abs(counts["total"] - PAPER_BASELINE_PARAMS) / PAPER_BASELINE_PARAMS < 0.03
    # the exact Cosmos-Predict2 block minus cross-attention: 781,989,376
    assert counts["total"] == 781_989_376
    assert counts["feature_embedder"] == 0
    assert not any("feature" in name for name, _ in baseline.named_parameters())
    sem = parameter_breakdown(semantic)
    assert sem["total"] - counts["total"] == 1152 * 2048 == sem["feature_embedder"]
    cfg = DiTConfig.paper()
    assert (cfg.num_layers, cfg.num_heads, cfg.dim, cfg.patch_spatial, cfg.patch_temporal) == (
        14,
        16,
        2048,
        2,
        1,
    )
    assert (cfg.latent_channels, cfg.mlp_ratio, cfg.adaln_lora_rank, cfg.num_pca_channels) == (
        16,
        4.0,
        256,
        1152,
    )
    assert cfg.semantic is True


def test_rope_split_follows_cosmos():
    assert rope_split(128) == (44, 42, 42)
    for head_dim in (16, 24, 32, 64, 128):
        dt, dh, dw = rope_split(head_dim)
        assert dt + dh + dw == head_dim and dh == dw and dh % 2 == 0 and dt % 2 == 0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rope_scores_depend_only_on_relative_position(axis):
    g = torch.Generator().manual_seed(axis)
    head_dim = 32
    q = torch.randn(5, head_dim, generator=g)
    k = torch.randn(5, head_dim, generator=g)
    pos_q = torch.randint(0, 20, (5, 3), generator=g).float()
    pos_k = torch.randint(0, 20, (5, 3), generator=g).float()
    shift = torch.zeros(3)
    shift[axis] = 7.0

    def scores(pq, pk):
        return (apply_rope(q, rope_angles(pq, head_dim)) * apply_rope(k, rope_angles(pk, head_dim))).sum(-1)

    base = scores(pos_q, pos_k)
    torch.testing.assert_close(scores(pos_q + shift, pos_k + shift), base, atol=1e-4, rtol=1e-4)
    # the axis is really encoded: moving only the query changes the scores
    assert (scores(pos_q + shift, pos_k) - base).abs().max() > 1e-2
    # and the rotation preserves norms
    torch.testing.assert_close(apply_rope(q, rope_angles(pos_q, head_dim)).norm(dim=-1), q.norm(dim=-1))


def test_attention_is_translation_invariant_in_t_h_w():
    cfg = DiTConfig.tiny()
    attn = _randomize(SelfAttention(cfg))
    x = torch.randn(2, 3 * 4 * 5, cfg.dim, generator=torch.Generator().manual_seed(1))
    pos = grid_positions(3, 4, 5)
    out = attn(x, rope_angles(pos, cfg.head_dim))
    shifted = attn(x, rope_angles(pos + torch.tensor([2.0, 5.0, 9.0]), cfg.head_dim))
    torch.testing.assert_close(shifted, out, atol=1e-4, rtol=1e-4)


def test_forward_shapes_and_zero_init():
    model = Re2PixDiT(DiTConfig.tiny())
    x, c_noise, mask, features = _inputs()
    out = model(x, c_noise, mask, features)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # final layer zero-initialised: F starts at 0
    for block in model.blocks:  # every LoRA up-projection (shift/scale/gate) starts at zero
        assert torch.count_nonzero(block.mod_attn.up.weight) == 0 == torch.count_nonzero(block.mod_mlp.up.weight)
    assert torch.count_nonzero(model.t_embedder.linear_2.weight) == 0
    # c_noise given per sample broadcasts over frames
    model = _randomize(model)
    torch.testing.assert_close(
        model(x, c_noise[:, 0], mask, features), model(x, c_noise[:, :1].expand(2, 7), mask, features)
    )


def test_baseline_has_no_feature_branch_and_ignores_features():
    model = _randomize(Re2PixDiT(DiTConfig.tiny(semantic=False)))
    assert model.feature_embedder is None
    assert parameter_breakdown(model)["feature_embedder"] == 0
    x, c_noise, mask, features = _inputs()
    out = model(x, c_noise, mask, None)
    torch.testing.assert_close(model(x, c_noise, mask, features), out, rtol=0, atol=0)
    torch.testing.assert_close(model(x, c_noise, mask, torch.randn_like(features)), out, rtol=0, atol=0)


def test_semantic_model_fuses_features_without_new_tokens():
    model = _randomize(Re2PixDiT(DiTConfig.tiny()))
    x, c_noise, mask, features = _inputs()
    out = model(x, c_noise, mask, features)
    changed = features.clone()
    changed[:, 5] += 1.0  # only a future frame's features
    assert (model(x, c_noise, mask, changed) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs features"):
        model(x, c_noise, mask, None)
    # paper geometry: a 32 x 56 feature grid resized to the 27 x 48 token grid, one embedding per token
    emb = model.embed_features(torch.randn(1, 7, 32, 56, 64), (27, 48))
    assert emb.shape == (1, 7, 27 * 48, model.cfg.dim)
    # fewer channels than the model takes = the same features with the rest zeroed
    trunc = features.clone()
    trunc[..., 16:] = 0
    torch.testing.assert_close(model(x, c_noise, mask, features[..., :16]), model(x, c_noise, mask, trunc))
    # the summed embedding is linear in the features: zero features add nothing to the latent tokens
    zero = model.embed_features(torch.zeros_like(features), (4, 6))
    assert torch.count_nonzero(zero) == 0


def test_context_mask_and_noise_level_condition_the_output():
    model = _randomize(Re2PixDiT(DiTConfig.tiny()))
    x, c_noise, mask, features = _inputs()
    out = model(x, c_noise, mask, features)
    assert (model(x, c_noise, torch.zeros_like(mask), features) - out).abs().max() > 1e-3
    other = c_noise.clone()
    other[:, 6] = 0.9
    assert (model(x, other, mask, features) - out).abs().max() > 1e-3


PAPER_BASELINE_LARGE_PARAMS = 1.5e9  # paper table 1: "Baseline-Large (1.5B)"


def test_baseline_large_builds_at_paper_size_with_its_stated_count():
    with torch.device("meta"):
        large = Re2PixDiT(DiTConfig.paper_large(semantic=False))
    cfg = large.cfg
    # the paper's DiT with twice the blocks (Cosmos-Predict2-2B's 28), every other size unchanged
    assert cfg.num_layers == 28 and (cfg.num_heads, cfg.dim, cfg.adaln_lora_rank) == (16, 2048, 256)
    counts = parameter_breakdown(large)
    assert counts["total"] == 1_545_356_288
    assert abs(counts["total"] - PAPER_BASELINE_LARGE_PARAMS) / PAPER_BASELINE_LARGE_PARAMS < 0.04
    with torch.device("meta"):
        baseline = parameter_breakdown(Re2PixDiT(DiTConfig.paper(semantic=False)))
    per_block = (
        baseline["blocks.attention"]
        + baseline["blocks.qk_norm"]
        + baseline["blocks.mlp"]
        + baseline["blocks.adaln_lora"]
    ) // 14
    assert counts["total"] - baseline["total"] == 14 * per_block  # only blocks were added
    assert counts["total"] > 1.1e9  # more than Re2Pix as a whole (the paper's point of the row)


def test_hidden_block_hook_returns_that_blocks_tokens_and_leaves_the_output_alone():
    model = _randomize(Re2PixDiT(DiTConfig.tiny(num_layers=3)))
    x, c_noise, mask, features = _inputs()
    out = model(x, c_noise, mask, features)
    hooked, hidden = model(x, c_noise, mask, features, hidden_block=2)
    torch.testing.assert_close(hooked, out, rtol=0, atol=0)
    # the same tokens by running the first two blocks by hand
    tokens = model.x_embedder(
        torch.cat([x, mask[:, None, :, None, None].float().expand(2, 1, 7, 8, 12)], 1)
        .reshape(2, 17, 7, 4, 2, 6, 2)
        .permute(0, 2, 3, 5, 1, 4, 6)
        .reshape(2, 7, 24, 68)
    ) + model.embed_features(features, (4, 6))
    emb, base = model.t_embedder(c_noise)
    angles = rope_angles(grid_positions(7, 4, 6), model.cfg.head_dim)
    for block in model.blocks[:2]:
        tokens = block(tokens, emb, base, angles)
    torch.testing.assert_close(hidden, tokens)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="hidden_block"):
            model(x, c_noise, mask, features, hidden_block=bad)
