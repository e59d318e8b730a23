"""The experiment's design and report (the library behind `python -m jobs.experiment`, whose docstring says
what it runs): its settings, Stage 2 arms and Stage 1 forecasters, the inference-time rows, the tables with
the paper's directions checked on them, the convergence speed-up, the copy-last ordering on two disjoint
halves of the val clips, the forecaster table, report.md, experiment.json and the PNG plots.
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
# Stage 1 forecasters, each trained from the same store with the same budget: (name, --stage1 settings over
# the preset's). The first is the Stage 1 every Stage 2 arm trains with (its rollout is the store's
# pred_features): PredGS, the lowest feature MSE of the 7 December run and the demo's forecaster.
FORECASTERS = [
    ("predgs", {"model": {"head": "gaussian", "loss": "l1_ssim"}}),  # PredGS: Gaussian head, L1 + SSIM
    ("regression", {"model": {"head": "linear", "loss": "smooth_l1"}}),  # the masked feature transformer
    ("regression_l1_ssim", {"model": {"head": "linear", "loss": "l1_ssim"}}),  # PDR's loss on the linear head
    ("diffusion", {"diffusion": True}),
]
GAP_FROM = "regression"  # the forecaster whose Re2Pix gap to the truth the best one should close half of
TRUTH = "truth_features"  # seed 0's Re2Pix reading the ground-truth future features: a perfect forecaster
HALVES = ("half_a", "half_b")  # the main evaluation again on each half of the val scenes


@dataclass
class Settings:
    preset: str = "tiny"
    vae: str = "demo"
    dinov2: str = "demo"
    train_scenes: int = 8
    val_scenes: int = 12  # the copy-last ordering is also reported on each half of them (6 scenes each)
    frames_per_scene: int = 49  # train scenes: 7 clips each
    val_frames_per_scene: int = 25  # one clip a val scene: the evaluated clips are 12 scenes, not one
    stage1_steps: int | None = None  # None: the train preset's
    steps: int | None = None  # Stage 2 arms; None: the train preset's
    batch_size: int | None = None
    lr: float | None = None
    ckpt_every: int | None = None  # the convergence curve's spacing; None: a tenth of the steps
    seeds: int = 2
    eval_clips: int = 12  # every evaluation decodes each clip samples x models times: the run's main cost
    samples: int = 2  # sampling runs per clip of every evaluation (x 2 seeds: 4 per row)
    curve_samples: int = 1  # per checkpoint of the convergence curves (10 checkpoints x 2 models x 2 seeds)
    sample_steps: int = 20  # the demo's Heun steps (10 scored 0.046 worse latent MSE there: docs/demo_tuning.md)
    channels: tuple = (8, 16, 32, 0)  # table 5; 0: all the model reads
    # guidance settings fixed before the run, each compared with no guidance on its own
    guidance_w: float = 0.4  # table 8's fixed w
    guidance_cs: tuple = (8, 16, 32)  # table 8
    guidance_c: int = 16  # table 9's fixed c (the paper: 128 of 1152)
    guidance_ws: tuple = (0.2, 0.8)  # table 9 (w 0.4 at c 16 is table 8's row)
    head_epochs: int = 20

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            train_scenes=2,
            val_scenes=2,
            frames_per_scene=25,
            val_frames_per_scene=25,
            stage1_steps=4,
            steps=4,
            batch_size=2,
            ckpt_every=2,
            eval_clips=2,
            samples=1,
            curve_samples=1,
            sample_steps=2,
            channels=(8, 0),
            guidance_cs=(8,),
            guidance_c=8,
            guidance_ws=(0.8,),
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


def pooled(results: dict, row: str, seeds: int, evaluation: str | None = None) -> dict:
    """{metric: {"mean", "std", "n"}} over every sampling run of every seed (std ddof 1; 0 for one value);
    `evaluation`: read the row from that evaluation instead of the row's own."""
    runs: dict[str, list] = {}
    for seed in range(seeds):
        for k, v in model_metrics(results[seed, evaluation or row], row).items():
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
    """The step at which Re2Pix first reaches the Baseline's final value (means over seeds per step), linearly
    interpolated between the two checkpoints around it; reached by the first checkpoint, the ratio is a lower
    bound ("at_least")."""
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
    curve = [(step, v) for step in steps if (v := mean_at(step, "re2pix")) is not None]
    for k, (step, v) in enumerate(curve):
        if better(metric, v, final):
            if k == 0:
                reached, at_least = float(step), True
            else:  # the crossing between the previous checkpoint (not there yet) and this one
                (s0, v0), at_least = curve[k - 1], False
                reached = s0 + (step - s0) * (final - v0) / (v - v0)
            ratio = steps[-1] / reached  # the paper's direction: Re2Pix gets there before the Baseline's last step
            verdict = "reproduced" if ratio > 1 else "not reproduced"
            return {
                "metric": metric,
                "baseline_final": final,
                "reached_at": reached,
                "ratio": ratio,
                "at_least": at_least,
                "verdict": verdict,
            }
    return {
        "metric": metric,
        "baseline_final": final,
        "reached_at": None,
        "ratio": None,
        "note": "not reached",
        "verdict": "not reproduced",
    }


def ordering(rows: dict, metric: str) -> list[str]:
    """The rows that have the metric, best first."""
    have = [r for r in rows if metric in rows[r]]
    return sorted(have, key=lambda r: rows[r][metric]["mean"] * (-1 if METRICS[metric][1] else 1))


def halves_table(s: Settings, results: dict) -> dict:
    """Re2Pix, the Baseline and copy-last-frame on each half of the val scenes, and per metric whether their
    order is the same on both halves or flips."""
    rows = {
        f"{row} ({half})": pooled(results, row, s.seeds, evaluation=half)
        for half in HALVES
        for row in ("re2pix", "baseline", "copy_last")
    }
    checks = []
    for m in METRICS:
        orders = [
            [r.split(" (")[0] for r in ordering({k: v for k, v in rows.items() if half in k}, m)] for half in HALVES
        ]
        same = orders[0] == orders[1]
        checks.append(
            {
                "claim": f"the order on {METRICS[m][0]} is the same on both halves ({' > '.join(orders[0])} / "
                f"{' > '.join(orders[1])})",
                "verdict": "holds" if same else "flips",
            }
        )
    return {
        "name": "halves",
        "title": "The copy-last ordering on two disjoint halves of the val scenes",
        "rows": rows,
        "checks": checks,
    }


def forecaster_table(forecasts: dict, truth: dict | None = None) -> dict:
    """Copy-last and every Stage 1 forecaster (`forecasts`: name -> jobs.evaluate's results with that Stage 1
    and seed 0's Re2Pix): per future frame its feature MSE, cosine and sharpness against the truth, the
    segmentation head's mIoU on its features of the annotated frame, and Re2Pix's future-latent MSE when
    conditioned on it (copy-last: Re2Pix is not sampled with it, "-"); `truth`: seed 0's Re2Pix conditioned
    on the ground-truth future features (jobs.evaluate --features truth), the row a perfect forecaster would
    reach. Its checks: the best forecaster (lowest feature MSE at the last future frame) against copy-last,
    and how much of Re2Pix's gap between the regression forecaster (GAP_FROM; else the first) and the truth it
    closes."""
    rows = {}
    for name, res in [("copy_last", next(iter(forecasts.values())))] + list(forecasts.items()):
        prefix = "copy_last/" if name == "copy_last" else ""
        s1 = res["stage1"]
        frames = sorted({k.split("/")[-2] for k in s1 if k.startswith(prefix + "t") and k.endswith("/mse")})
        row = {f"{t}/{m}": s1.get(f"{prefix}{t}/{m}") for t in frames for m in ("mse", "cos", "sharpness")}
        row["seg/miou_all"] = s1.get(prefix + "seg/miou_all")
        row.update(re2pix_latent_mse({} if prefix else res, frames))  # copy-last: Re2Pix is not sampled on it
        rows[name] = row
    if truth is not None:
        rows[TRUTH] = re2pix_latent_mse(truth, frames)
    table = {"name": "forecasters", "title": "Stage 1 forecasters", "rows": rows}
    gap_from = GAP_FROM if GAP_FROM in forecasts else next(iter(forecasts))
    table.update(forecaster_checks(rows, f"{frames[-1]}/mse", first=gap_from))
    return table


def re2pix_latent_mse(res: dict, frames: list[str]) -> dict:
    """{latent_mse/t..., latent_mse: the mean over sampling runs} of the evaluation's Re2Pix (None: not there)."""
    re2pix = res.get("models", {}).get("re2pix", {})
    return {key: (re2pix.get(key) or {}).get("mean") for key in [f"latent_mse/{t}" for t in frames] + ["latent_mse"]}


def forecaster_checks(rows: dict, last: str, first: str) -> dict:
    """{"best", "checks"}: the forecaster with the lowest feature MSE at the last future frame (`last`), its
    MSE over copy-last's (goal <= 0.85), and the share of Re2Pix's latent-MSE gap between the `first`
    forecaster and the ground-truth features that conditioning on it closes (goal >= 0.5)."""
    trained = {n: r for n, r in rows.items() if n not in ("copy_last", TRUTH) and r.get(last) is not None}
    if not trained:
        return {"best": None, "checks": []}
    best = min(trained, key=lambda n: trained[n][last])
    ratio = trained[best][last] / rows["copy_last"][last] if rows["copy_last"].get(last) else None
    checks = [
        {
            "claim": f"the best forecaster ({best}) has at most 0.85x copy-last's feature MSE at {last.split('/')[0]}",
            "value": ratio,
            "verdict": "not measured" if ratio is None else "met" if ratio <= 0.85 else "NOT met",
        }
    ]
    lat = {n: (rows.get(n) or {}).get("latent_mse") for n in (first, best, TRUTH)}
    closed, why = None, {}
    if None not in lat.values():
        if lat[first] > lat[TRUTH]:
            closed = (lat[first] - lat[best]) / (lat[first] - lat[TRUTH])
        else:
            why = {"why": f"{first} is not behind the truth"}
    checks.append(
        {
            "claim": f"Re2Pix conditioned on {best} closes at least half of its latent-MSE gap between {first} "
            "and the ground-truth features",
            "value": closed,
            "verdict": "not measured" if closed is None else "met" if closed >= 0.5 else "NOT met",
            **why,
        }
    )
    return {"best": best, "checks": checks}


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
        checks = [
            check(f"guidance {k[len('guidance_') :]} improves {METRICS[m][0]}", rows, m, k, "guidance_off")
            for k in keys
            for m in ("psnr", "seg/miou_all")
        ]
        out.append({"name": name, "title": title, "rows": rows, "checks": checks})
    out.append(halves_table(s, results))
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
    forecasts: dict,
    truth: dict | None = None,
    store: Path,
    val: Path,
    timings: dict,
    train_preset_stage2: dict,
) -> Path:
    """report.md, experiment.json and the PNG plots in `run`: every table (tables()) from the evaluations
    (`results`: (seed, row) -> jobs.evaluate's results), the convergence curves (one curve.json per seed) and
    the forecasters' evaluations (`forecasts`: forecaster_table); `store` / `val` are the stores the arms
    trained and were scored on, `timings` the wall time per step."""
    tabs = tables(s, results, curves)
    forecasters = forecaster_table(forecasts, truth)
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
        "forecasters": forecasters,
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
            lines.append(
                f"- speed-up on {METRICS[sp['metric']][0]} (the paper: 7x for FID, 14x for mIoU): {speedup_text(sp)}: "
                f"**{sp['verdict']}**"
            )
        lines += ["", f"![{t['name']}]({t['name']}.png)", ""]
    lines += forecaster_lines(forecasters, s)
    lines += ["## Convergence", "", "![convergence](convergence.png)", "", "## Wall time per step", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("plots: " + ", ".join(str(p) for p in plots))
    return path


def speedup_text(sp: dict) -> str:
    if not sp["ratio"]:
        return sp.get("note", "")
    if sp["at_least"]:
        return f"at least {sp['ratio']:.2g}x (reached by the first checkpoint, step {sp['reached_at']:.0f})"
    return f"{sp['ratio']:.2g}x (reached at step {sp['reached_at']:.0f}, interpolated between checkpoints)"


def forecaster_lines(table: dict, s: Settings) -> list[str]:
    """report.md's forecaster table: one row per forecaster, per future frame MSE / cosine / sharpness."""
    rows = table["rows"]
    frames = sorted({k.split("/")[0] for r in rows.values() for k in r if k.startswith("t")})
    num = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    head = [f"{t} MSE / cos / sharpness" for t in frames] + ["mIoU (annotated frame)"]
    head += [f"Re2Pix latent MSE {t}" for t in frames] + ["Re2Pix latent MSE"]
    lines = [f"## {table['title']}", ""]
    lines += [
        f"Each trained from the same store with the same Stage 1 budget; scored on the first {s.eval_clips} val "
        f"clips; Re2Pix is seed 0's, trained once on the rollouts of `{FORECASTERS[0][0]}`, its sampling "
        f"({s.samples} run(s)) conditioned on each forecaster's rollout. Sharpness: the forecast's mean squared "
        "spatial gradient over the truth's (1: as sharp as the truth).",
        "",
        "| forecaster | " + " | ".join(head) + " |",
        "|---" * (len(head) + 1) + "|",
    ]
    for name, r in rows.items():
        cells = [" / ".join(num(r.get(f"{t}/{m}")) for m in ("mse", "cos", "sharpness")) for t in frames]
        cells += [num(r.get("seg/miou_all"))] + [num(r.get(f"latent_mse/{t}")) for t in frames]
        label = "ground-truth features (Re2Pix's upper bound)" if name == TRUTH else name
        lines.append(f"| {label} | " + " | ".join(cells + [num(r.get("latent_mse"))]) + " |")
    lines += ["", f"Best forecaster (lowest feature MSE at the last future frame): **{table.get('best')}**", ""]
    for c in table.get("checks", []):
        value = "" if c["value"] is None else f" ({c['value']:.3g})"
        lines.append(f"- {c['claim']}: **{c['verdict']}**{value}" + (f" ({c['why']})" if c.get("why") else ""))
    return lines + [""]


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
