"""The demo's closing summary: every model the evaluation scored, copy-last-frame included, side by side."""

import json


def test_summary_prints_re2pix_baseline_and_copy_last_on_every_metric(tmp_path):
    from jobs.demo import METRICS, MODELS, summary

    def metric(mean, std=0.0):
        return {"mean": mean, "std": std, "runs": [mean]}

    models = {
        name: {k: metric(base + i / 100, 0.01 if name != "copy_last" else 0.0) for i, k in enumerate(METRICS)}
        for name, base in (("re2pix", 0.3), ("baseline", 0.6), ("copy_last", 0.5))
    }
    models["baseline"].pop("seg/miou_moving")  # a metric a model lacks shows as "-"
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"clips": 8, "samples": 2, "models": models, "stage1": {"mse": 0.66}}))
    (tmp_path / "predict").mkdir()
    text = summary(tmp_path, results, {"cache train": 12.0}, 600.0)
    assert "finished in 10.0 min" in text and "cache train" in text
    header = next(line for line in text.splitlines() if "re2pix" in line and "copy_last" in line)
    assert header.split() == list(MODELS)
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip().split(" ")[0] in METRICS}
    assert set(rows) == set(METRICS)
    assert "0.3000 +- 0.0100" in rows["latent_mse"] and "0.5000 +- 0.0000" in rows["latent_mse"]
    assert rows["seg/miou_moving"].split()[-4] == "-"  # the Baseline's missing cell, between the other two


def test_summary_shows_scores_vs_the_frames_and_the_vae_ceiling_only_when_measured(tmp_path):
    from jobs.demo import summary

    def results(models: dict, reference_metrics: dict) -> str:
        path = tmp_path / "results.json"
        path.write_text(
            json.dumps({"clips": 2, "samples": 1, "models": models, "reference_metrics": reference_metrics})
        )
        (tmp_path / "predict").mkdir(exist_ok=True)
        return summary(tmp_path, path, {}, 60.0)

    score = {"mean": 21.5, "std": 0.0, "runs": [21.5]}
    both = results(
        {"re2pix": {"psnr": score, "psnr_vs_frames": score}}, {"psnr_vs_frames": 23.25, "ssim_vs_frames": 0.7}
    )
    assert any(line.split()[:1] == ["psnr_vs_frames"] for line in both.splitlines())
    assert "VAE ceiling (ground-truth latents decoded vs the frames): psnr 23.2500, ssim 0.7000" in both
    recon_only = results({"re2pix": {"psnr": score}}, {})  # the source was not readable
    assert "psnr_vs_frames" not in recon_only and "VAE ceiling" not in recon_only
    assert any(line.split()[:1] == ["psnr"] for line in recon_only.splitlines())


def test_summary_puts_stage1s_forecast_beside_copy_last_per_future_frame(tmp_path):
    from jobs.demo import summary

    stage1 = {"mse": 0.6, "t4/mse": 0.41, "t6/mse": 0.77, "copy_last/t4/mse": 0.63, "copy_last/t6/mse": 1.04}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"clips": 2, "samples": 1, "models": {}, "stage1": stage1}))
    (tmp_path / "predict").mkdir()
    line = next(ln for ln in summary(tmp_path, results, {}, 60.0).splitlines() if "stage 1" in ln)
    assert line.endswith("copy-last in brackets: t4 0.410 (0.630), t6 0.770 (1.040)")


def test_the_demo_trains_the_predgs_forecaster_unless_told_otherwise(tmp_path, monkeypatch):
    import jobs.demo as demo
    from model.stage1 import Stage1Config

    ran = []
    monkeypatch.setattr(demo, "step", lambda title, args, timings, log=None: ran.append((title, args)))
    monkeypatch.setattr(demo, "side_by_side", lambda lanes, logs, timings: ran.extend(sum(lanes, [])))
    monkeypatch.setattr(demo, "summary", lambda *a: "")
    for flags, head, loss in (([], "gaussian", "l1_ssim"), (["--forecaster", "regression"], "linear", "smooth_l1")):
        ran.clear()
        demo.main(["--run", str(tmp_path / head), *flags])
        args = dict(ran)["train Stage 1"]
        model = json.loads(args[args.index("--stage1") + 1])["model"]
        assert (model["head"], model["loss"]) == (head, loss)
        Stage1Config(**model)  # fields Stage 1's model knows
