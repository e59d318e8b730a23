"""jobs/experiment.py (inference/experiment_report.py): the quick variant end to end (every arm lands in the
report with numbers), the inference-time channel cut it relies on (paper table 5), and its refusal to replace
a foreign folder."""

import json
import re

import pytest
import torch

from inference.dpt import MOVING_CLASSES, miou
from inference.experiment_report import ARMS, FORECASTERS, METRICS, TRUTH, forecaster_table, speedup
from inference.sampling import Sampler
from jobs.experiment import main
from model.diffusion import truncate_features
from model.stage2 import DiTConfig, Re2PixDiT
from pipeline.errors import Re2pixError


def test_sampler_channels_reads_only_the_first_pca_channels():
    torch.manual_seed(0)
    dit = Re2PixDiT(DiTConfig.tiny()).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    ctx, feats = torch.randn(1, 16, 4, 4, 6, generator=g), torch.randn(1, 7, 4, 6, 64, generator=g)
    noise = torch.randn(1, 16, 3, 4, 6, generator=g)
    cut = Sampler(steps=3, channels=8)(dit, ctx, feats, noise)
    assert torch.equal(cut, Sampler(steps=3)(dit, ctx, truncate_features(feats, 8), noise))
    assert (cut - Sampler(steps=3)(dit, ctx, feats, noise)).abs().max() > 1e-3
    assert torch.equal(Sampler(steps=3, channels=64)(dit, ctx, feats, noise), Sampler(steps=3)(dit, ctx, feats, noise))


@pytest.mark.parametrize("job", ["evaluate", "predict"])
def test_sampler_walks_the_noise_range_the_command_line_gives(job):
    from jobs.config import parse_config
    from jobs.evaluate import EvaluateConfig
    from jobs.predict import PredictConfig
    from model.diffusion import sample

    cls = {"evaluate": EvaluateConfig, "predict": PredictConfig}[job]
    cfg, _ = parse_config(cls, job, ["--sample-steps", "3", "--sigma-max", "20", "--sigma-min", "0.2"])
    sampler = Sampler.of(cfg)
    torch.manual_seed(0)
    dit = Re2PixDiT(DiTConfig.tiny()).eval()
    g = torch.Generator().manual_seed(0)
    ctx, feats = torch.randn(1, 16, 4, 4, 6, generator=g), torch.randn(1, 7, 4, 6, 64, generator=g)
    noise = torch.randn(1, 16, 3, 4, 6, generator=g)
    want = sample(dit, ctx, feats, num_steps=3, sigma_max=20.0, sigma_min=0.2, num_future=3, initial_noise=noise)
    assert torch.equal(sampler(dit, ctx, feats, noise), want)
    assert not torch.equal(Sampler(steps=3)(dit, ctx, feats, noise), want)  # the default range is another one


def _point(step, re2pix, baseline):
    return {"step": step, "models": {"re2pix": {"psnr": {"mean": re2pix}}, "baseline": {"psnr": {"mean": baseline}}}}


def test_speedup_is_the_final_step_over_the_interpolated_step_re2pix_reaches_the_baselines_final_value():
    # reached between steps 10 (11.0) and 20 (13.0): at 15, the value 12.0 of the Baseline's last step (40)
    points = [[_point(10, 11.0, 9.0), _point(20, 13.0, 10.0), _point(40, 14.0, 12.0)]]
    assert speedup(points, "psnr") == {
        "metric": "psnr",
        "baseline_final": 12.0,
        "reached_at": 15.0,
        "ratio": 40 / 15,
        "at_least": False,
        "verdict": "reproduced",
    }
    worse = [[_point(10, 5.0, 9.0), _point(20, 6.0, 12.0)]]
    assert speedup(worse, "psnr") == {
        "metric": "psnr",
        "baseline_final": 12.0,
        "reached_at": None,
        "ratio": None,
        "note": "not reached",
        "verdict": "not reproduced",
    }
    late = [[_point(10, 5.0, 9.0), _point(20, 12.0, 12.0)]]  # reached only at the last step: no speed-up
    assert speedup(late, "psnr")["ratio"] == 1.0 and speedup(late, "psnr")["verdict"] == "not reproduced"
    # reached by the first checkpoint: the grid bounds the ratio from below, and says so
    first = speedup([[_point(10, 12.5, 9.0), _point(40, 14.0, 12.0)]], "psnr")
    assert first["ratio"] == 4.0 and first["at_least"] and first["reached_at"] == 10.0


def test_halves_verdict_says_whether_the_copy_last_ordering_flips():
    from inference.experiment_report import Settings, halves_table

    def evaluation(re2pix, copy_last):
        models = {"re2pix": re2pix, "baseline": 0.7, "copy_last": copy_last}
        return {"models": {k: {"latent_mse": {"runs": [v]}} for k, v in models.items()}}

    same = {(0, "half_a"): evaluation(0.5, 0.6), (0, "half_b"): evaluation(0.4, 0.55)}
    flipped = {(0, "half_a"): evaluation(0.5, 0.6), (0, "half_b"): evaluation(0.6, 0.5)}
    s = Settings(seeds=1)
    verdict = lambda results: halves_table(s, results)["checks"][0]  # noqa: E731  latent MSE
    assert verdict(same)["verdict"] == "holds" and "re2pix > copy_last > baseline" in verdict(same)["claim"]
    assert verdict(flipped)["verdict"] == "flips"
    assert halves_table(s, flipped)["rows"]["copy_last (half_b)"]["latent_mse"]["mean"] == 0.5


@pytest.mark.parametrize("job", ["experiment", "demo"])
def test_a_folder_it_did_not_write_is_refused(tmp_path, job):
    import importlib

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(Re2pixError, match=f"not written by jobs.{job}"):
        importlib.import_module(f"jobs.{job}").main(["--run", str(tmp_path)])
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_quick_experiment_reports_every_arm_with_numbers(tmp_path):
    run = tmp_path / "exp"
    assert main(["--quick", "--run", str(run)]) == 0
    data = json.loads((run / "experiment.json").read_text())
    tables = {t["name"]: t for t in data["tables"]}
    assert set(tables) == {"main", "table3", "table4", "table5", "table8", "table9", "halves"}
    rows = {row for t in tables.values() for row in t["rows"]}
    assert {a for a in ARMS} <= rows and {"channels_8", "channels_all", "guidance_off", "guidance_c8_w0.4"} <= rows
    assert {f"{r} ({h})" for r in ("re2pix", "baseline", "copy_last") for h in ("half_a", "half_b")} <= rows
    for t in tables.values():
        copy = "copy_last" if t["name"] != "halves" else "copy_last (half_a)"
        assert copy in t["rows"] and t["rows"][copy]["latent_mse"]["mean"] > 0
        for row, metrics in t["rows"].items():
            if not row.startswith("copy_last"):  # every trained arm has every metric, mIoU included
                assert set(metrics) == set(METRICS), (t["name"], row)
                assert all(m["n"] == 1 and m["mean"] == m["mean"] for m in metrics.values())
        verdicts = ("holds", "flips") if t["name"] == "halves" else ("reproduced", "not reproduced")
        assert t["checks"] and all(c["verdict"] in verdicts for c in t["checks"])
        assert (run / f"{t['name']}.png").read_bytes()[:4] == b"\x89PNG"
    # every guidance setting fixed in advance has its own verdict against no guidance
    guided = [c["claim"] for name in ("table8", "table9") for c in tables[name]["checks"]]
    assert {"guidance c8_w0.4 improves PSNR", "guidance c8_w0.8 improves mIoU"} <= set(guided)
    assert (run / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert [s["metric"] for s in tables["main"]["speedup"]] == ["latent_mse", "psnr", "seg/miou_all"]
    # the forecaster table: copy-last and every forecaster, per future frame, Re2Pix conditioned on each
    forecasters = data["forecasters"]["rows"]
    assert list(forecasters) == ["copy_last"] + [name for name, _ in FORECASTERS] + [TRUTH]
    assert all(forecasters[TRUTH][f"latent_mse/{t}"] > 0 for t in ("t4", "t5", "t6"))  # Re2Pix on the truth
    assert data["forecasters"]["best"] in dict(FORECASTERS)
    assert [c["verdict"] in ("met", "NOT met", "not measured") for c in data["forecasters"]["checks"]] == [True] * 2
    forecasters.pop(TRUTH)
    for name, r in forecasters.items():
        for t in ("t4", "t5", "t6"):
            assert r[f"{t}/mse"] > 0 and r[f"{t}/sharpness"] > 0 and -1 <= r[f"{t}/cos"] <= 1, (name, t)
            assert (r[f"latent_mse/{t}"] is None) == (name == "copy_last")
        assert 0 <= r["seg/miou_all"] <= 1, name
    report, forecaster_section = (run / "report.md").read_text().split("## Stage 1 forecasters")
    for t in tables.values():
        assert t["title"] in report and f"({t['name']}.png)" in report
    # every table row carries a number, and every check its verdict
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    assert len(table_rows) == sum(len(t["rows"]) for t in tables.values())
    assert all(re.search(r"\d\.?\d* ± ", line) for line in table_rows)
    assert report.count("**reproduced**") + report.count("**not reproduced**") >= len(tables) - 1
    assert report.count("**holds**") + report.count("**flips**") == len(METRICS)
    lines = forecaster_section.splitlines()
    assert sum(line.startswith(f"| {name} |") for line in lines for name in forecasters) == len(forecasters)
    assert sum(line.startswith("| ground-truth features") for line in lines) == 1
    assert "Best forecaster" in forecaster_section
    assert "## Wall time per step" in forecaster_section and data["seconds"] > 0


def test_forecaster_checks_name_the_best_and_the_share_of_the_gap_to_the_truth_it_closes():
    def evaluation(t6_mse, latent_mse, copy_t6=1.0):
        stage1 = {f"t{t}/{m}": 0.5 for t in (4, 5) for m in ("mse", "cos", "sharpness")}
        stage1 |= {"t6/mse": t6_mse, "t6/cos": 0.8, "t6/sharpness": 0.9, "copy_last/t6/mse": copy_t6}
        re2pix = {"latent_mse": {"mean": latent_mse}} | {f"latent_mse/t{t}": {"mean": latent_mse} for t in (4, 5, 6)}
        return {"stage1": stage1, "models": {"re2pix": re2pix}}

    # regression 0.50 -> truth 0.40; predgs at 0.44 closes 60 % of it and is 0.7x copy-last at frame 6
    forecasts = {
        "regression": evaluation(0.8, 0.50),
        "predgs": evaluation(0.7, 0.44),
        "diffusion": evaluation(0.9, 0.7),
    }
    table = forecaster_table(forecasts, truth=evaluation(0.0, 0.40))
    assert table["best"] == "predgs" and table["rows"][TRUTH]["latent_mse"] == 0.40
    (ratio, closed) = table["checks"]
    assert ratio["value"] == pytest.approx(0.7) and ratio["verdict"] == "met"
    assert closed["value"] == pytest.approx(0.6) and closed["verdict"] == "met"
    # a best forecaster that is 0.9x copy-last and closes a fifth of the gap misses both goals
    forecasts.update(regression=evaluation(0.95, 0.50), predgs=evaluation(0.9, 0.48))
    ratio, closed = forecaster_table(forecasts, truth=evaluation(0.0, 0.40))["checks"]
    assert ratio["verdict"] == closed["verdict"] == "NOT met" and closed["value"] == pytest.approx(0.2)
    # the gap is measured from the regression forecaster wherever it sits in the table (PredGS comes first)
    forecasts = {"predgs": evaluation(0.7, 0.44), "regression": evaluation(0.8, 0.50)}
    _, closed = forecaster_table(forecasts, truth=evaluation(0.0, 0.40))["checks"]
    assert closed["value"] == pytest.approx(0.6) and "between regression and" in closed["claim"]
    # without the truth's evaluation the gap is not measured, and says so
    assert forecaster_table(forecasts)["checks"][1]["verdict"] == "not measured"


def test_shared_lanes_take_every_step_once_each_when_their_last_one_ends():
    # the experiment's queue: a lane that ends early takes the next step instead of idling
    import threading
    import time

    from jobs.cli import Shared

    queue = Shared([(f"step {i}", [str(0.05 if i == 0 else 0.001)]) for i in range(12)], n=2)
    taken = {0: [], 1: []}

    def lane(i):
        for title, (seconds,) in queue:
            taken[i].append(title)
            time.sleep(float(seconds))

    threads = [threading.Thread(target=lane, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken[0] + taken[1], key=lambda t: int(t.split()[1])) == [f"step {i}" for i in range(12)]
    long_lane = 0 if "step 0" in taken[0] else 1
    assert len(taken[1 - long_lane]) >= 9  # the other lane took the short steps while step 0 ran


def test_miou_leaves_out_classes_beyond_the_heads():
    # the synthetic head has 10 classes; Cityscapes' moving trainIds (11-18) have no IoU there
    confusion = torch.tensor([[4, 1, 0], [1, 2, 0], [0, 0, 0]])
    assert miou(confusion, MOVING_CLASSES) != miou(confusion, MOVING_CLASSES)  # nan: none of them exist
    assert miou(confusion, [0, 1, 12]) == pytest.approx((4 / 6 + 2 / 4) / 2)


def test_copy_last_row_reads_evaluates_copy_last_model():
    from inference.experiment_report import model_metrics

    reported = {"models": {"copy_last": {"psnr": {"mean": 20.0, "runs": [20.0]}}}}
    assert model_metrics(reported, "copy_last") == {"psnr": [20.0]}
