"""REPA and VideoREPA baselines: paper-size counts, the features never reach the DiT, the losses are the
papers' (against direct computations), they fall on an overfit batch, and the trainer runs them."""

import json

import pytest
import torch
import torch.nn.functional as F

from jobs.train import main as train_main
from jobs.train import parse, stage_config
from model import diffusion
from model.checkpoint import latest_checkpoint, load_weights, read_meta
from model.loop import read_metrics
from model.repa import (
    AlignConfig,
    AlignedDiT,
    alignment_terms,
    from_model_config,
    parameter_counts,
    repa_loss,
    target_tokens,
    training_loss,
    trd_loss,
)
from model.stage2 import DiTConfig, Re2PixDiT, parameter_breakdown
from model.tasks import AlignTask, Stage2Task
from pipeline.errors import ConfigError
from pipeline.store.geometry import PAPER
from tests.store_factory import make_store

PAPER_ALIGNED_PARAMS = 792e6  # paper table 1: "REPA variants (792M)"


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _batch(b=2, seed=0, channels=64):
    """A tiny-geometry batch: latents [B, 16, 7, 8, 12] (a 4 x 6 token grid), features on an 8 x 14 grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, 7, 8, 12, generator=g), torch.randn(b, 7, 8, 14, channels, generator=g)


@pytest.mark.parametrize("method", ["repa", "videorepa"])
def test_paper_size_counts_next_to_the_papers_792m(method):
    with torch.device("meta"):
        model = AlignedDiT(DiTConfig.paper(semantic=False), AlignConfig.paper(method=method))
        baseline = Re2PixDiT(DiTConfig.paper(semantic=False))
    counts = parameter_counts(model)
    assert counts["dit"] == parameter_breakdown(baseline)["total"] == 781_989_376
    # 3-layer MLP 2048 -> 2048 -> 2048 -> 1152 PCA channels, with biases
    assert counts["projector"] == (2048 * 2048 + 2048) * 2 + 2048 * 1152 + 1152 == 10_753_152
    assert counts["total"] == 792_742_528 == sum(p.numel() for p in model.parameters())
    assert abs(counts["total"] - PAPER_ALIGNED_PARAMS) / PAPER_ALIGNED_PARAMS < 0.002
    assert model.depth == 4  # REPA's block 8 of 28 is block 4 of 14
    assert model.dit.feature_embedder is None


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "paper", "--stage", "repa"], 792_742_528),
        (["--preset", "paper", "--stage", "videorepa"], 792_742_528),
        (["--preset", "paper_large"], 1_545_356_288),  # Baseline-Large: its preset's stage is the Baseline
    ],
)
def test_paper_presets_build_the_table_1_rows(argv, expected):
    cfg = parse(argv)
    sc = stage_config(cfg, "stage2")
    if cfg.stage == "baseline":
        task = Stage2Task(sc.model, PAPER, PAPER.num_pca_channels, semantic=False)
    else:
        task = AlignTask(cfg.stage, sc.model, PAPER, PAPER.num_pca_channels, sc.align)
        assert (task.align.weight, task.align.projector_dim, task.align.depth_for(14)) == (0.5, 2048, 4)
    with torch.device("meta"):
        model = task.build_model()
    assert sum(p.numel() for p in model.parameters()) == expected
    assert (sc.batch_size, sc.steps, sc.lr) == (8, 40000, 0.00041432)  # the Baseline's optimization


def test_alignment_depth_keeps_repas_fraction_and_is_checked():
    assert AlignConfig().depth_for(28) == 8 and AlignConfig().depth_for(14) == 4 and AlignConfig().depth_for(2) == 1
    assert AlignConfig(depth=6).depth_for(14) == 6
    with pytest.raises(ValueError, match="past"):
        AlignConfig(depth=15).depth_for(14)
    with pytest.raises(ValueError, match="method"):
        AlignConfig(method="crepa")
    with pytest.raises(ValueError, match="Baseline DiT"):
        AlignedDiT(DiTConfig.tiny(), AlignConfig())


def test_hidden_tokens_are_the_blocks_output_and_the_projector_maps_them():
    model = _randomize(AlignedDiT(DiTConfig.tiny(semantic=False, num_layers=3), AlignConfig.tiny(depth=2)))
    latents, _ = _batch()
    c_noise = torch.rand(2, 7)
    mask = (torch.arange(7) < 4)[None].expand(2, 7)
    out, projected = model(latents, c_noise, mask, aligned=True)
    torch.testing.assert_close(out, model(latents, c_noise, mask), rtol=0, atol=0)
    _, hidden = model.dit(latents, c_noise, mask, hidden_block=2)
    assert hidden.shape == (2, 7, 4 * 6, 96) and projected.shape == (2, 7, 24, 64)
    torch.testing.assert_close(projected, model.projector(hidden))
    _, last = model.dit(latents, c_noise, mask, hidden_block=3)
    assert (last - hidden).abs().max() > 1e-3  # a later block's tokens are others


@pytest.mark.parametrize("method", ["repa", "videorepa"])
def test_features_enter_only_the_loss_never_the_dit(method):
    model = _randomize(AlignedDiT(DiTConfig.tiny(semantic=False), AlignConfig.tiny(method=method)))
    latents, features = _batch()
    other = torch.randn_like(features)
    runs = []
    for feats in (features, other):
        model.zero_grad()
        loss, logs = training_loss(model, latents, feats, model.align_config, 4, torch.Generator().manual_seed(3))
        loss.backward()
        runs.append((logs, {n: p.grad.clone() for n, p in model.dit.named_parameters() if "final_layer" in n}))
    (logs_a, grads_a), (logs_b, grads_b) = runs
    # the denoiser saw the same input whichever features: the same output, loss and last-layer gradients
    torch.testing.assert_close(logs_a["denoising_loss"], logs_b["denoising_loss"], rtol=0, atol=0)
    for name in grads_a:  # the final layer sits after the aligned block: only the denoising loss reaches it
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0)
    assert (logs_a["align_loss"] - logs_b["align_loss"]).abs().max() > 1e-4  # the target did change
    latents_in = torch.randn(2, 16, 7, 8, 12)
    mask = (torch.arange(7) < 4)[None].expand(2, 7)
    with pytest.raises(ValueError, match="only the alignment loss"):
        model(latents_in, torch.rand(2, 7), mask, features)


def test_repa_loss_is_minus_the_mean_token_cosine():
    g = torch.Generator().manual_seed(0)
    projected, target = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    direct = torch.stack(
        [
            -sum(F.cosine_similarity(projected[i, t, s], target[i, t, s], dim=0) for t in range(3) for s in range(5))
            / 15
            for i in range(2)
        ]
    )
    torch.testing.assert_close(repa_loss(projected, target), direct)
    torch.testing.assert_close(repa_loss(3 * target, target), torch.full((2,), -1.0))


def test_trd_against_a_direct_pair_by_pair_computation():
    g = torch.Generator().manual_seed(1)
    t, s = 3, 4
    projected, target = torch.randn(2, t, s, 6, generator=g), torch.randn(2, t, s, 5, generator=g)
    out = trd_loss(projected, target, spatial_margin=0.2, temporal_margin=0.05)
    for i in range(2):
        h = [F.normalize(projected[i, a, k], dim=0) for a in range(t) for k in range(s)]
        f = [F.normalize(target[i, a, k], dim=0) for a in range(t) for k in range(s)]
        spatial, temporal = [], []
        for p in range(t * s):
            for q in range(t * s):
                same = p // s == q // s
                diff = abs(float(h[p] @ h[q]) - float(f[p] @ f[q])) - (0.2 if same else 0.05)
                (spatial if same else temporal).append(max(diff, 0.0))
        assert out["trd_spatial"][i].item() == pytest.approx(sum(spatial) / len(spatial), abs=1e-5)
        assert out["trd_temporal"][i].item() == pytest.approx(sum(temporal) / len(temporal), abs=1e-5)
        assert out["trd"][i].item() == pytest.approx((sum(spatial) + sum(temporal)) / (t * s) ** 2, abs=1e-5)


def test_trd_distils_relations_not_the_features_themselves():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(1, 3, 4, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    rotated = target @ rotation  # other features, the same relations between tokens
    assert trd_loss(rotated, target, 0.0, 0.0)["trd"].item() < 1e-6
    assert repa_loss(rotated, target).item() > -0.9  # REPA sees the difference
    # differences within the margin cost nothing
    near = F.normalize(target, dim=-1) + 0.01 * torch.randn(1, 3, 4, 8, generator=g)
    assert trd_loss(near, target, 0.1, 0.1)["trd"].item() == 0.0
    assert trd_loss(near, target, 0.0, 0.0)["trd"].item() > 0.0
    # one frame: no temporal pairs
    single = trd_loss(target[:, :1], target[:, :1] + 1, 0.0, 0.0)
    assert single["trd_temporal"].item() == 0.0 and single["trd"].item() == single["trd_spatial"].item()


def test_target_is_the_fusions_resize_of_the_features():
    sem = Re2PixDiT(DiTConfig.tiny(num_pca_channels=64))
    _, features = _batch()
    with torch.no_grad():
        sem.feature_embedder.weight.copy_(torch.eye(96, 64))  # the embedding reads the resized features out
    embedded = sem.embed_features(features, (4, 6))[..., :64]
    torch.testing.assert_close(target_tokens(features, (4, 6)), embedded)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["repa", "videorepa"])
def test_alignment_and_total_loss_fall_on_an_overfit_batch(method):
    torch.manual_seed(0)
    model = AlignedDiT(DiTConfig.tiny(semantic=False), AlignConfig.tiny(method=method))
    latents, features = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.99))
    totals, aligns = [], []
    for _ in range(80):
        # the same noise every step: a fixed batch and fixed draws, as an overfit should be
        loss, logs = training_loss(model, latents, features, model.align_config, 4, torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
        aligns.append(logs["align_loss"].mean().item())
    first, last = sum(aligns[:5]) / 5, sum(aligns[-5:]) / 5
    if method == "repa":  # -cos: from about 0 (random) towards -1
        assert last < first - 0.3, (first, last)
    else:
        assert last < 0.5 * first, (first, last)
    assert sum(totals[-5:]) < 0.7 * sum(totals[:5]), (totals[:5], totals[-5:])
    terms = alignment_terms(*[torch.randn(1, 2, 3, 4)] * 2, model.align_config)
    assert ("trd_spatial" in terms) == (method == "videorepa")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("repa") / "store.zarr"
    make_store(path, scenes=3, frames=33, channel_chunk=16)  # 9 clips: 6 to train, 3 held out
    return str(path)


STAGE2 = {
    "model": {"size": "tiny", "dim": 48, "num_heads": 4, "adaln_lora_rank": 8},
    "batch_size": 2,
    "steps": 3,
    "log_every": 1,
    "ckpt_every": 3,
    "sample_steps": 2,
    "sample_clips": 2,
    "align": {"projector_dim": 32},
}


@pytest.mark.parametrize("method", ["repa", "videorepa"])
def test_trainer_stage_trains_and_evaluates_the_aligned_baseline(store, tmp_path, method):
    args = [
        "--stage",
        method,
        "--store",
        store,
        "--run-dir",
        str(tmp_path),
        "--val-clips",
        "3",
        "--no-progress",
        "--workers",
        "0",
        "--threads",
        "1",
        "--stage2",
        json.dumps(STAGE2),
    ]
    assert train_main(args) == 0
    meta = read_meta(latest_checkpoint(tmp_path / method))
    assert meta["task"] == method and meta["step"] == 3
    assert meta["model_config"]["align"] == {**AlignConfig.tiny(method=method).__dict__, "projector_dim": 32}
    assert not meta["model_config"]["dit"]["semantic"] and not meta["data"]["with_pred"]
    model = from_model_config(meta["model_config"])
    assert meta["parameters"] == parameter_counts(model)["total"]
    model.load_state_dict(load_weights(latest_checkpoint(tmp_path / method), "model"))
    base = Re2PixDiT(model.cfg)  # the checkpoint's DiT alone is a Baseline the sampler and predict can use
    base.load_state_dict({k[len("dit.") :]: v for k, v in model.state_dict().items() if k.startswith("dit.")})
    context = torch.randn(1, 16, 4, 12, 20)  # the tiny store's latent grid
    out = diffusion.sample(base, context, None, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 16, 7, 12, 20) and torch.isfinite(out).all()
    records = read_metrics(tmp_path / method)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 3 and all({"denoising_loss", "align_loss", "align_cos"} <= set(r) for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["denoising_loss"] + 0.5 * r["align_loss"], rel=1e-5)
    evals = [r for r in records if r["kind"] == "eval"]
    assert {"loss", "sample_mse", "copy_last_mse", "align_loss", "align_cos"} <= set(evals[-1])
    assert ("trd_temporal" in evals[-1]) == (method == "videorepa")
    # a rerun with --resume finishes without training again; another alignment in the same dir is refused
    assert train_main([*args, "--resume"]) == 0
    other = {**STAGE2, "align": {"projector_dim": 32, "weight": 1.0}}
    with pytest.raises(ConfigError, match=r"align\.weight 0\.5 \(now 1\.0\).*another run folder"):
        train_main([*args[:-1], json.dumps(other), "--resume"])


def test_alignment_terms_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(4)
    projected = torch.randn(2, 3, 6, 8, generator=g).bfloat16()  # what the projector gives under autocast
    target = torch.randn(2, 3, 6, 8, generator=g)
    align = AlignConfig(method="videorepa", spatial_margin=0.0, temporal_margin=0.0)
    expected = alignment_terms(projected.float(), target, align)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # would run the Gram matmuls in bfloat16
        got = alignment_terms(projected, target, align)
    for key, value in expected.items():
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6)
