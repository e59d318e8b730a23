"""The experiment's design and report (the library behind `python -m jobs.experiment`, whose docstring says
what it runs): its settings and Stage 2 arms, the inference-time rows, the tables with the paper's
directions checked on them, the convergence speed-up, report.md, experiment.json and the PNG plots.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# metric -> (label, True when higher is better); miou_moving is left out: its classes are Cityscapes trainIds
METRICS = {
    "latent_mse": ("latent MSE", False),
    "psnr": ("PSNR", True),
    "ssim": ("SSIM", True),
    "seg/miou_all": ("mIoU", True),
}
# Stage 2 training arms: (jobs.train --stage, stage settings beyond the shared budget)
ARMS = {
    "re2pix": ("2", {}),  # the paper's recipe: nested dropout on, 90/10 mixed supervision
    "baseline": ("baseline", {}),
    "no_nested": ("2", {"nested_dropout": False}),
    "gt_only": ("2", {"pred_p": 0.0}),
    "pred_only": ("2", {"pred_p": 1.0}),
}


@dataclass
class Settings:
    preset: str = "tiny"
    vae: str = "demo"
    dinov2: str = "demo"
    train_scenes: int = 8
    val_scenes: int = 4
    frames_per_scene: int = 49  # train scenes: 7 clips each
    val_frames_per_scene: int = 25  # one clip a val scene: the evaluated clips are 4 scenes, not one
    stage1_steps: int | None = None  # None: the train preset's
    steps: int | None = None  # Stage 2 arms; None: the train preset's
    batch_size: int | None = None
    lr: float | None = None
    ckpt_every: int | None = None  # the convergence curve's spacing; None: a quarter of the steps
    seeds: int = 2  # the full run: about 30 min here with 2 seeds
    eval_clips: int = 4  # every evaluation decodes each clip 1 + samples x models times: the run's main cost
    samples: int = 3
    sample_steps: int = 20  # the demo's Heun steps (10 scored 0.046 worse latent MSE there: docs/demo_tuning.md)
    channels: tuple = (8, 16, 32, 0)  # table 5; 0: all the model reads
    guidance_w: float = 0.4  # table 8's fixed w
    guidance_cs: tuple = (8, 16, 32)  # table 8
    guidance_c: int = 16  # table 9's fixed c (the paper: 128 of 1152)
    guidance_ws: tuple = (0.2, 0.4, 0.8)  # table 9
    head_epochs: int = 20

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            train_scenes=2,
            val_scenes=1,
            frames_per_scene=25,
            val_frames_per_scene=25,
            stage1_steps=4,
            steps=4,
            batch_size=2,
            ckpt_every=2,
            eval_clips=1,
            samples=1,
            sample_steps=2,
            channels=(8, 0),
            guidance_cs=(8,),
            guidance_c=8,
            guidance_ws=(0.4,),
            head_epochs=1,
            seeds=1,
        )


def inference_rows(s: Settings) -> dict[str, list[str]]:
    """Evaluations of the Re2Pix arm with inference-time settings: name -> jobs.evaluate flags ([]: the
    plain evaluation, already run)."""
    rows = {}
    for c in s.channels:
        rows[f"channels_{c or 'all'}"] = ["--channels", str(c)] if c else []
    rows["guidance_off"] = []
    for c, w in [(c, s.guidance_w) for c in s.guidance_cs] + [(s.guidance_c, w) for w in s.guidance_ws]:
        rows[f"guidance_c{c}_w{w:g}"] = ["--guidance-channels", str(c), "--guidance-weight", str(w)]
    return rows


# --------------------------------------------------------------------------- the report


def model_metrics(results: dict, row: str) -> dict:
    """{metric: [value per sampling run]} of one row in one evaluation: the arm's Re2Pix, the Baseline,
    or copy-last-frame (evaluate reports it as the model `copy_last`)."""
    name = row if row in ("baseline", "copy_last") else "re2pix"
    return {k: v["runs"] for k, v in results["models"].get(name, {}).items() if k in METRICS}


def pooled(results: dict, row: str, seeds: int) -> dict:
    """{metric: {"mean", "std", "n"}} over every sampling run of every seed (std ddof 1; 0 for one value)."""
    runs: dict[str, list] = {}
    for seed in range(seeds):
        for k, v in model_metrics(results[seed, row], row).items():
            runs.setdefault(k, []).extend(x for x in v if x is not None)
    out = {}
    for k, v in runs.items():
        a = np.asarray(v, np.float64)
        if len(a):
            out[k] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}
    return out


def better(metric: str, a: float, b: float, strict: bool = False) -> bool:
    """a is better than b (strict) or at least as good."""
    if strict and a == b:
        return False
    return a >= b if METRICS[metric][1] else a <= b


def check(claim: str, rows: dict, metric: str, a: str, b: str) -> dict:
    """One of the paper's directions: row a better than row b on the metric (a tie is not)."""
    va, vb = rows.get(a, {}).get(metric), rows.get(b, {}).get(metric)
    if va is None or vb is None:
        return {"claim": claim, "verdict": "not measured", "why": f"no {metric} for {a if va is None else b}"}
    ok = better(metric, va["mean"], vb["mean"], strict=True)
    noise = abs(va["mean"] - vb["mean"]) < max(va["std"], vb["std"])
    return {
        "claim": claim,
        "verdict": "reproduced" if ok else "not reproduced",
        "values": [va["mean"], vb["mean"]],
        "within_one_std": noise,
    }


def speedup(points: list[list[dict]], metric: str) -> dict:
    """Steps at which Re2Pix first reaches the Baseline's final value (means over seeds per step)."""
    steps = sorted({p["step"] for pts in points for p in pts})

    def mean_at(step, model):
        vals = [
            p["models"][model][metric]["mean"]
            for pts in points
            for p in pts
            if p["step"] == step and model in p["models"] and metric in p["models"][model]
        ]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    final = mean_at(steps[-1], "baseline") if steps else None
    if final is None:
        return {
            "metric": metric,
            "ratio": None,
            "note": "no Baseline value at the last step",
            "verdict": "not measured",
        }
    for step in steps:
        v = mean_at(step, "re2pix")
        if v is not None and better(metric, v, final):
            ratio = steps[-1] / step  # the paper's direction: Re2Pix gets there before the Baseline's last step
            verdict = "reproduced" if ratio > 1 else "not reproduced"
            return {"metric": metric, "baseline_final": final, "reached_at": step, "ratio": ratio, "verdict": verdict}
    return {
        "metric": metric,
        "baseline_final": final,
        "reached_at": None,
        "ratio": None,
        "note": "not reached",
        "verdict": "not reproduced",
    }


def tables(s: Settings, results: dict, curves: list) -> list[dict]:
    """Every table: its rows (pooled metrics) and the paper's directions checked on them."""
    seeds = s.seeds
    rows_of = lambda names: {n: pooled(results, n, seeds) for n in names + ["copy_last"]}  # noqa: E731
    inf = inference_rows(s)
    main = rows_of(["re2pix", "baseline"])
    pts = [c["points"] for c in curves]
    out = [
        {
            "name": "main",
            "title": "Re2Pix vs the Baseline (paper table 1) and the convergence speed-up (figure 3)",
            "rows": main,
            "checks": [
                check(f"Re2Pix beats the Baseline on {METRICS[m][0]}", main, m, "re2pix", "baseline") for m in METRICS
            ]
            + [check("Re2Pix beats copy-last-frame on latent MSE", main, "latent_mse", "re2pix", "copy_last")],
            "speedup": [speedup(pts, m) for m in ("latent_mse", "psnr", "seg/miou_all")],
        }
    ]
    t3 = rows_of(["re2pix", "no_nested"])
    out.append(
        {
            "name": "table3",
            "title": "Nested dropout on (re2pix) / off (no_nested) (paper table 3)",
            "rows": t3,
            "checks": [check(f"nested dropout helps {METRICS[m][0]}", t3, m, "re2pix", "no_nested") for m in METRICS],
        }
    )
    t4 = rows_of(["gt_only", "pred_only", "re2pix"])
    out.append(
        {
            "name": "table4",
            "title": "Supervision: ground truth only / predicted only / 90-10 mixed (re2pix) (paper table 4)",
            "rows": t4,
            "checks": [
                check(
                    "predicted-only beats ground-truth-only on PSNR (generation)", t4, "psnr", "pred_only", "gt_only"
                ),
                check("ground-truth-only beats predicted-only on mIoU", t4, "seg/miou_all", "gt_only", "pred_only"),
                check("mixed beats ground-truth-only on PSNR", t4, "psnr", "re2pix", "gt_only"),
                check("mixed beats predicted-only on mIoU", t4, "seg/miou_all", "re2pix", "pred_only"),
            ],
        }
    )
    names = [n for n in inf if n.startswith("channels_")]
    t5 = {n: pooled(results, "re2pix" if not inf[n] else n, seeds) for n in names}
    t5["copy_last"] = main["copy_last"]
    out.append(
        {
            "name": "table5",
            "title": "PCA channels Stage 2 reads at inference (paper table 5)",
            "rows": t5,
            "checks": [
                check(f"all channels beat {names[0].split('_')[1]} on {METRICS[m][0]}", t5, m, names[-1], names[0])
                for m in ("psnr", "seg/miou_all")
            ],
        }
    )
    guided = (
        (
            "table8",
            f"Representation guidance: c at w = {s.guidance_w:g} (paper table 8)",
            [(c, s.guidance_w) for c in s.guidance_cs],
        ),
        (
            "table9",
            f"Representation guidance: w at c = {s.guidance_c} (paper table 9)",
            [(s.guidance_c, w) for w in s.guidance_ws],
        ),
    )
    for name, title, settings in guided:
        keys = [f"guidance_c{c}_w{w:g}" for c, w in settings]
        rows = {k: pooled(results, "re2pix" if not inf[k] else k, seeds) for k in ["guidance_off", *keys]}
        rows["copy_last"] = main["copy_last"]
        checks = []
        for m in ("psnr", "seg/miou_all"):
            sign = 1 if METRICS[m][1] else -1
            best = max(keys, key=lambda k, m=m: sign * rows[k].get(m, {}).get("mean", -sign * np.inf))
            checks.append(
                check(f"some guided setting ({best}) improves {METRICS[m][0]}", rows, m, best, "guidance_off")
            )
        out.append({"name": name, "title": title, "rows": rows, "checks": checks})
    return out


def fmt(v: dict | None) -> str:
    return "-" if not v else f"{v['mean']:.4g} ± {v['std']:.2g}"


def build_report(
    run: Path,
    s: Settings,
    results: dict,
    curves: list,
    seconds: float,
    *,
    store: Path,
    val: Path,
    timings: dict,
    train_preset_stage2: dict,
) -> Path:
    """report.md, experiment.json and the PNG plots in `run`: every table (tables()) from the evaluations
    (`results`: (seed, row) -> jobs.evaluate's results) and the convergence curves (one curve.json per seed);
    `store` / `val` are the stores the arms trained and were scored on, `timings` the wall time per step."""
    tabs = tables(s, results, curves)
    ceiling = results[0, "re2pix"].get("reference_metrics", {}).get("seg/miou_all")
    plots = [plot_convergence(curves, run / "convergence.png")] + [
        plot_table(t, run / f"{t['name']}.png") for t in tabs
    ]
    data = {
        "schema": "re2pix-experiment/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": round(seconds, 1),
        "settings": {**asdict(s), "train_preset_stage2": train_preset_stage2},
        "miou_ceiling": ceiling,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "tables": tabs,
        "curves": [str(run / f"seed{i}" / "eval" / "curve.json") for i in range(len(curves))],
        "evaluations": sorted(
            {f"seed{seed}/eval/{row}.json" for seed, row in results if row not in ("baseline", "copy_last")}
        ),
    }
    (run / "experiment.json").write_text(json.dumps(data, indent=1, allow_nan=False))
    lines = [
        "# re2pix experiment: the paper's ablations at CPU scale",
        "",
        f"- date: {data['date']}; machine: {data['machine']}; wall time {seconds / 60:.1f} min",
        f"- settings: {json.dumps(data['settings'])}",
        f"- every Stage 2 arm trained from {store} with the same budget; scored on {val}; "
        f"mean ± std over {s.samples} sampling run(s) x {s.eval_clips} clip(s) per run, pooled over {s.seeds} seed(s)",
        "- copy-last-frame: evaluate's `copy_last` model",
        "- all numbers, per seed and per sampling run: experiment.json and seed*/eval/*.json beside this report",
        f"- mIoU ceiling (the head on the VAE reconstruction of the ground truth, seed 0): {ceiling:.4g}"
        if ceiling is not None
        else "- mIoU ceiling: not measured",
        "",
    ]
    for t in tabs:
        lines += [f"## {t['title']}", "", "| row | " + " | ".join(METRICS[m][0] for m in METRICS) + " |"]
        lines.append("|---" * (len(METRICS) + 1) + "|")
        lines += [f"| {row} | " + " | ".join(fmt(v.get(m)) for m in METRICS) + " |" for row, v in t["rows"].items()]
        lines.append("")
        for c in t["checks"]:
            noise = " (the difference is within one std)" if c.get("within_one_std") else ""
            lines.append(f"- {c['claim']}: **{c['verdict']}**{noise}" + (f" ({c['why']})" if c.get("why") else ""))
        for sp in t.get("speedup", []):
            got = f"{sp['ratio']:.2g}x (reached at step {sp['reached_at']})" if sp["ratio"] else sp.get("note", "")
            lines.append(
                f"- speed-up on {METRICS[sp['metric']][0]} (the paper: 7x for FID, 14x for mIoU): {got}: "
                f"**{sp['verdict']}**"
            )
        lines += ["", f"![{t['name']}]({t['name']}.png)", ""]
    lines += ["## Convergence", "", "![convergence](convergence.png)", "", "## Wall time per step", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("plots: " + ", ".join(str(p) for p in plots))
    return path


def machine() -> str:
    import os

    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def plot_table(table: dict, path: Path) -> Path:
    """One panel per metric: a point per row, the std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table["rows"]
    metrics = [m for m in METRICS if any(m in v for v in rows.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        names = [n for n in rows if m in rows[n]]
        means, stds = [rows[n][m]["mean"] for n in names], [rows[n][m]["std"] for n in names]
        ax.errorbar(range(len(names)), means, yerr=stds, fmt="o", capsize=4)  # the axis fits the values
        ax.set_xticks(range(len(names)), names)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(METRICS[m][0] + (" (higher is better)" if METRICS[m][1] else " (lower is better)"), fontsize=8)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    fig.suptitle(table["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_convergence(curves: list, path: Path) -> Path:
    """Latent MSE, PSNR and mIoU against the training step, Re2Pix and the Baseline (mean over seeds, error
    bars the sampling runs' std averaged over seeds), drawn by inference/evaluation.py's plot_curve."""
    from inference.evaluation import plot_curve

    metrics = ("latent_mse", "psnr", "seg/miou_all")
    by_step: dict[int, dict] = {}
    for c in curves:
        for p in c["points"]:
            for model in ("re2pix", "baseline"):
                for m in metrics:
                    v = p["models"].get(model, {}).get(m)
                    if v and v["mean"] is not None:
                        by_step.setdefault(p["step"], {}).setdefault(model, {}).setdefault(m, []).append(
                            (v["mean"], v["std"] or 0.0)
                        )
    points = [
        {
            "step": step,
            "models": {
                model: {
                    m: {"mean": float(np.mean([a for a, _ in vs])), "std": float(np.mean([b for _, b in vs]))}
                    for m, vs in ms.items()
                }
                for model, ms in models.items()
            },
        }
        for step, models in sorted(by_step.items())
    ]
    return plot_curve(points, path)
