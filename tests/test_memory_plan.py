"""Fit before you run: the memory estimate (model/memory.py), the plan that splits the paper's global batch
over the ranks of a device's memory, `jobs.train --dry-run`, and the DiT's activation checkpointing."""

import json
from dataclasses import replace

import pytest
import torch

from jobs.train import main as train_main
from jobs.train import parse
from jobs.train import run as train_run
from model import diffusion
from model.loop import _weights_config
from model.memory import DIT_BLOCK, GiB, dit_footprint, fit, stage1_footprint
from model.stage1 import MaskedFeatureTransformer, Stage1Config
from model.stage2 import DiTConfig, Re2PixDiT
from pipeline.config import ConfigError
from pipeline.store.geometry import PAPER, Geometry
from tests.store_factory import make_store


@pytest.mark.parametrize("world", [1, 8])
def test_the_paper_preset_fits_one_80gb_card_and_eight(world, capsys):
    plans = train_run(parse(["--preset", "paper", "--stage", "all", "--dry-run", "--world-size", str(world),
                             "--gpu-memory-gb", "80", "--store", "no/such/store.zarr"]))  # fmt: skip
    assert set(plans) == {"stage1", "stage2", "baseline"}
    for stage, batch in (("stage1", 64), ("stage2", 8), ("baseline", 8)):
        plan = plans[stage]
        assert plan.fits and plan.estimate <= 0.9 * 80 * GiB
        assert plan.world * plan.micro_batch * plan.grad_accum == batch  # the paper's global batch, kept
    assert plans["stage2"].footprint.parameters == 781_989_376 + 1152 * 2048
    out = capsys.readouterr().out
    assert f"plan for {world} rank" in out and "fits" in out and "MB/s of store reads" in out


def test_a_smaller_card_turns_activation_checkpointing_on_and_a_too_small_one_is_refused():
    fp = dit_footprint(DiTConfig(), PAPER, ema=True, bf16=True, pred_features=True)
    roomy, tight, tiny = (fit(fp, 8, 1, gb * GiB) for gb in (80, 32, 12))
    assert not roomy.checkpointing and roomy.fits
    assert tight.checkpointing and tight.fits and tight.micro_batch * tight.grad_accum == 8
    assert not tiny.fits
    # an accumulation the user gives is kept, and the plan says it does not fit
    forced = fit(fp, 8, 1, 80 * GiB, grad_accum=1, checkpointing=False)
    assert (forced.micro_batch, forced.fits) == (8, False)
    with pytest.raises(ValueError, match="not a multiple of 3 ranks"):
        fit(fp, 8, 3, 80 * GiB)


def test_training_stops_in_one_line_when_the_plan_does_not_fit(tmp_path):
    store = tmp_path / "store.zarr"
    make_store(store, scenes=2, frames=33)
    stage1 = json.dumps({"model": {"size": "tiny"}, "batch_size": 2, "steps": 1})
    args = ["--stage", "1", "--store", str(store), "--run-dir", str(tmp_path / "run"), "--no-progress",
            "--stage1", stage1, "--gpu-memory-gb", "0.001"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"stage1: .* GiB usable .*\(--gpu-memory-gb\)"):
        train_main(args)
    assert not (tmp_path / "run" / "stage1").exists() or not any((tmp_path / "run" / "stage1").iterdir())


def _saved_bytes(model, fn) -> int:
    """Bytes autograd keeps for the backward pass, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


GRID = Geometry(vae_input_hw=(128, 256), dino_input_hw=(112, 224), feature_dim=64, num_pca_channels=32)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_dit_activation_estimate_matches_what_autograd_keeps(checkpointing):
    cfg = DiTConfig(num_layers=3, num_heads=2, dim=128, adaln_lora_rank=16, num_pca_channels=32)
    model = Re2PixDiT(replace(cfg, gradient_checkpointing=checkpointing)).train()
    h, w = GRID.latent_hw
    latents, feats = torch.randn(1, 16, 7, h, w), torch.randn(1, 7, *GRID.feature_hw, 32)
    kept = _saved_bytes(model, lambda: diffusion.training_loss(model, latents, feats, 4, torch.Generator())[0])
    fp = dit_footprint(cfg, GRID, ema=False, bf16=False)
    # checkpointed, autograd keeps the block inputs; the estimate adds the one block the backward recomputes
    recomputed = DIT_BLOCK["fp32"] * 7 * (h // 2) * (w // 2) * cfg.dim
    estimate = fp.activations_checkpointed - recomputed if checkpointing else fp.activations
    assert estimate == pytest.approx(kept, rel=0.2)


def test_the_stage1_activation_estimate_matches_what_autograd_keeps():
    cfg = Stage1Config(num_pca_channels=32, feature_hw=(12, 20), dim=96, num_layers=3, num_heads=4)
    model = MaskedFeatureTransformer(cfg).train()
    window = torch.randn(1, 5, 12, 20, 32)
    kept = _saved_bytes(model, lambda: model(window))
    assert stage1_footprint(cfg, ema=False, bf16=False).activations == pytest.approx(kept, rel=0.2)


def test_dit_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = DiTConfig(num_layers=2, num_heads=2, dim=48, adaln_lora_rank=8, num_pca_channels=16)
    grads = []
    for on in (False, True):
        torch.manual_seed(0)
        model = Re2PixDiT(replace(cfg, gradient_checkpointing=on)).train()
        with torch.no_grad():  # zero-initialised modulations would hide the blocks from the gradients
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.manual_seed(1)
        loss = diffusion.training_loss(model, torch.randn(2, 16, 7, 8, 16), torch.randn(2, 7, 4, 8, 16), 4,
                                       torch.Generator().manual_seed(2))[0]  # fmt: skip
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_resume_may_change_activation_checkpointing_but_not_the_weights():
    a = {"dit": {"dim": 96, "gradient_checkpointing": False}, "align": {"method": "repa"}}
    b = {"dit": {"dim": 96, "gradient_checkpointing": True}, "align": {"method": "repa"}}
    assert _weights_config(a) == _weights_config(b)
    assert _weights_config(a) != _weights_config({**b, "dit": {"dim": 48}})
