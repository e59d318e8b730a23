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
