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
