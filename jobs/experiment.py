"""The paper's ablations at CPU scale in one run (`make experiment`, `python -m jobs.experiment [--quick]`).

On the built-in synthetic driving set (tiny models, the demo encoders): cache a train and a val store
-> write the val clips' class maps (the source's ground truth) and train a DPT segmentation head on
the train store's features (the mIoU of every table) -> train Stage 1 once and roll it out into the
train store -> train every Stage 2 arm from that store with the same budget (steps, batch, lr, seed)
-> evaluate each arm on the val store -> report.md, experiment.json and PNG plots in --run.
Each step is the same job a user runs by hand (jobs.cache, jobs.train_dpt, jobs.train, jobs.rollout,
jobs.evaluate), started as a subprocess.

Tables (the paper's numbering; each has copy-last-frame as a row):
- convergence (figure 3): Re2Pix and the Baseline scored at every kept checkpoint (jobs.evaluate
  --every-checkpoint); the speed-up is the Baseline's final step over the first step at which Re2Pix
  reaches the Baseline's final value ("not reached" when it never does);
- table 3: nested dropout on / off (stage setting nested_dropout);
- table 4: ground-truth-only / predicted-only / 90-10 mixed supervision (stage setting pred_p 0, 1, 0.1);
- table 5: PCA channels Stage 2 reads at inference (jobs.evaluate --channels), 8 ... all;
- tables 8, 9: representation guidance (eq. 10), c at a fixed w and w at a fixed c
  (jobs.evaluate --guidance-channels c --guidance-weight w).
Values are mean ± std over sampling runs (the paper's appendix 6.1), pooled over seeds with --seeds N
(Stage 2 arms trained with seeds 0..N-1; Stage 1 and the head are trained once). Every table says
whether the paper's direction showed up here: "reproduced" or "not reproduced".

The full run (2 seeds) took 29 minutes on 2 CPU cores here: the trainings and evaluations run two at a
time, one torch thread each; --quick (under 3 minutes) runs every arm with a handful of steps on one clip:
a smoke test of the harness, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from jobs.cli import HelpFormatter, replace_run_folder, side_by_side
from jobs.cli import run as run_main
from jobs.cli import step as run_step
from pipeline.errors import Re2pixError

ANNOTATED_FRAME = 16  # the clip frame whose class map scores mIoU (evaluate's default, Cityscapes' frame 19)
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


class ExperimentError(Re2pixError):
    """A step of the experiment failed, or its run folder cannot be used."""


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


class Experiment:
    def __init__(self, run: Path, s: Settings):
        self.run, self.s, self.timings = run, s, {}
        self.store, self.val = run / "store.zarr", run / "val.zarr"
        self.labels, self.head = run / "labels", run / "heads" / "seg.safetensors"
        self.stage1 = run / "stage1" / "stage1"

    def step(self, title: str, args: list[str]) -> None:
        run_step(title, args, self.timings)

    def cache(self) -> None:
        s = self.s
        for split, out, n, frames, extra in (
            ("train", self.store, s.train_scenes, s.frames_per_scene, []),
            ("val", self.val, s.val_scenes, s.val_frames_per_scene, ["--pca", str(self.store)]),
        ):
            scenes = json.dumps({"num_scenes": n, "frames_per_scene": frames})
            self.step(
                f"cache {split}",
                ["jobs.cache", "--preset", s.preset, "--split", split, "--out", str(out), "--vae", s.vae]
                + ["--dinov2", s.dinov2, "--source-options", scenes, *extra],
            )

    def write_labels(self, annotated_frame: int = ANNOTATED_FRAME) -> None:
        """{clip_id}.png: the class map the synthetic source renders for each val clip's annotated frame."""
        from PIL import Image

        from pipeline.sources.reopen import reopen_source
        from pipeline.store.reader import Store

        store = Store(str(self.val))
        source, why = reopen_source(store.manifest)
        if source is None:
            raise ExperimentError(f"{self.val}: cannot reopen its source for the class maps: {why}")
        self.labels.mkdir(parents=True, exist_ok=True)
        for i in range(min(len(store), self.s.eval_clips)):
            meta = store.clip_meta(i)
            ref = next(f for f in source.frames(meta["scene"]) if f.index == meta["start"] + annotated_frame)
            Image.fromarray(source.read_targets(meta["scene"], ref)["classes"]).save(
                self.labels / f"{meta['clip_id']}.png"
            )

    def budget(self, which: str) -> dict:
        """The stage settings every arm shares: steps, batch, lr (the preset's unless given) and checkpoints."""
        s = self.s
        steps = s.stage1_steps if which == "stage1" else s.steps
        out = {k: v for k, v in (("steps", steps), ("batch_size", s.batch_size), ("lr", s.lr)) if v is not None}
        if which == "stage2":  # every checkpoint kept for the curve; the trainer's own sampled check kept small
            every = s.ckpt_every or max(1, (s.steps or preset_stage2(s.preset).get("steps", 100)) // 4)
            out.update(ckpt_every=every, keep_checkpoints=0, eval_every=0, sample_clips=1)
            out.update(sample_steps=s.sample_steps)
        return out

    def lanes(self, steps: list[tuple[str, list[str]]]) -> None:
        """Run independent steps in two lanes at once (one torch thread each: both cores busy), in the order
        given, dealt to the lanes in turn."""
        lanes = [steps[0::2], steps[1::2]]
        side_by_side([lane for lane in lanes if lane], self.run / "logs", self.timings)

    def train(self, stage: str, run_dir: Path, settings: dict, seed: int) -> tuple[str, list[str]]:
        """The step that trains one stage (one torch thread)."""
        key = "stage1" if stage == "1" else "stage2"
        return (
            f"train {run_dir.relative_to(self.run)}",
            ["jobs.train", "--preset", self.s.preset, "--stage", stage, "--store", str(self.store)]
            + ["--val-store", str(self.val), "--run-dir", str(run_dir), "--seed", str(seed), "--threads", "1"]
            + [f"--{key}", json.dumps(settings)],
        )

    def eval_path(self, seed: int, name: str) -> Path:
        return self.run / f"seed{seed}" / "eval" / f"{name}.json"

    def evaluate(self, name: str, seed: int, stage2: Path, extra: list[str], baseline: Path | None = None):
        """The step of jobs.evaluate of one Stage 2 checkpoint (and the Baseline when given) on the val store,
        its results to eval_path(seed, name)."""
        out = self.eval_path(seed, name)
        return f"evaluate seed {seed} {name}", self.evaluate_args(seed, stage2, baseline) + ["--out", str(out), *extra]

    def curve(self, seed: int, stage2: Path, baseline: Path) -> tuple[str, list[str]]:
        """jobs.evaluate --every-checkpoint: Re2Pix and the Baseline at every kept checkpoint (curve.json)."""
        path = self.eval_path(seed, "curve")
        args = self.evaluate_args(seed, stage2, baseline) + ["--every-checkpoint", "--curve", str(path)]
        return f"evaluate seed {seed} every checkpoint", args

    def evaluate_args(self, seed: int, stage2: Path, baseline: Path | None) -> list[str]:
        s = self.s
        return (
            ["jobs.evaluate", "--preset", s.preset, "--store", str(self.val), "--stage1", str(self.stage1)]
            + ["--stage2", str(stage2), "--baseline", str(baseline) if baseline else "", "--seed", str(seed)]
            + ["--samples", str(s.samples), "--max-clips", str(s.eval_clips), "--sample-steps", str(s.sample_steps)]
            + ["--seg-head", str(self.head), "--labels", str(self.labels), "--annotated-frame", str(ANNOTATED_FRAME)]
            + ["--no-progress", "--threads", "1"]
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.experiment", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", default="runs/experiment", help="everything goes under this folder (replaced)")
    p.add_argument("--quick", action="store_true", help="a few minutes: every arm, a handful of steps, one clip")
    p.add_argument("--seeds", type=int, default=None, help="train every Stage 2 arm with seeds 0..N-1 (default 2)")
    p.add_argument("--steps", type=int, default=None, help="Stage 2 steps of every arm (default: the train preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="Stage 2 batch size (default: the train preset's)")
    p.add_argument("--lr", type=float, default=None, help="Stage 2 learning rate (default: the train preset's)")
    p.add_argument("--ckpt-every", type=int, default=None, help="steps between the convergence curve's points")
    p.add_argument("--samples", type=int, default=None, help="sampling runs per clip")
    p.add_argument("--eval-clips", type=int, default=None, help="val clips evaluated (default: the settings')")
    args = p.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    for name in ("seeds", "steps", "batch_size", "lr", "ckpt_every", "samples", "eval_clips"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    run = Path(args.run)
    replace_run_folder(run, "experiment")
    t0 = time.time()
    ex = Experiment(run, s)
    ex.cache()
    ex.write_labels()
    head = ["jobs.train_dpt", "--preset", s.preset, "--store", str(ex.store), "--tasks", "segmentation"]
    head += ["--labels", "source", "--epochs", str(s.head_epochs), "--out", str(run / "heads"), "--threads", "1"]
    rollout = ["jobs.rollout", "--preset", s.preset, "--checkpoint", str(ex.stage1), "--store", str(ex.store)]
    side_by_side(
        [[ex.train("1", run / "stage1", ex.budget("stage1"), 0), ("rollout", rollout)], [("train head", head)]],
        run / "logs",
        ex.timings,
    )
    evaluations = {}  # (seed, row) -> the evaluation (name) whose results hold the row
    steps, curve_steps = [], []
    for seed in range(s.seeds):
        arms = run / f"seed{seed}"
        ex.lanes(
            [
                ex.train(stage, arms / arm, {**ex.budget("stage2"), **extra}, seed)
                for arm, (stage, extra) in ARMS.items()
            ]
        )
        re2pix, base = arms / "re2pix" / "stage2", arms / "baseline" / "baseline"
        steps.append(ex.evaluate("re2pix", seed, re2pix, [], baseline=base))
        evaluations.update({(seed, row): "re2pix" for row in ("re2pix", "baseline", "copy_last")})
        for arm in ("no_nested", "gt_only", "pred_only"):
            steps.append(ex.evaluate(arm, seed, arms / arm / "stage2", []))
            evaluations[seed, arm] = arm
        for name, flags in inference_rows(s).items():
            if flags:
                steps.append(ex.evaluate(name, seed, re2pix, flags))
                evaluations[seed, name] = name
        curve_steps.append(ex.curve(seed, re2pix, base))
    ex.lanes(curve_steps + steps)  # the curves first: the longest evaluations
    loaded = {(seed, name): json.loads(ex.eval_path(seed, name).read_text()) for (seed, _), name in evaluations.items()}
    results = {(seed, row): loaded[seed, name] for (seed, row), name in evaluations.items()}
    curves = [json.loads(ex.eval_path(seed, "curve").read_text()) for seed in range(s.seeds)]
    report = build_report(ex, results, curves, time.time() - t0)
    print(f"\nwrote {report} ({(time.time() - t0) / 60:.1f} min)")
    return 0


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
    or copy-last-frame (results `models` when evaluate reports it there, else its latent MSE from the store)."""
    models = results["models"]
    name = row if row in ("baseline", "copy_last") else "re2pix"
    if name == "copy_last" and "copy_last" not in models:
        return {"latent_mse": [copy_last_latent_mse(results["store"], results["clip_ids"])]}
    return {k: v["runs"] for k, v in models.get(name, {}).items() if k in METRICS}


def copy_last_latent_mse(store_path: str, clip_ids: list[str]) -> float:
    """The latent MSE of copying the last context latent into every future latent, over the evaluated clips."""
    from pipeline.store.reader import Store

    store = Store(store_path)
    m = store.geometry.context_latents
    errs = []
    for i in range(len(clip_ids)):
        z = store.read_clip(i, channels=1).latents.astype(np.float64)  # [16, 7, h, w]
        errs.append(((z[:, m:] - z[:, m - 1 : m]) ** 2).mean())
    return float(np.mean(errs))


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


def build_report(ex: Experiment, results: dict, curves: list, seconds: float) -> Path:
    s = ex.s
    tabs = tables(s, results, curves)
    ceiling = results[0, "re2pix"].get("reference_metrics", {}).get("seg/miou_all")
    plots = [plot_curve(curves, ex.run / "convergence.png")] + [
        plot_table(t, ex.run / f"{t['name']}.png") for t in tabs
    ]
    data = {
        "schema": "re2pix-experiment/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": round(seconds, 1),
        "settings": {**asdict(s), "train_preset_stage2": preset_stage2(s.preset)},
        "miou_ceiling": ceiling,
        "timings": {k: round(v, 1) for k, v in ex.timings.items()},
        "tables": tabs,
        "curves": [str(ex.run / f"seed{i}" / "eval" / "curve.json") for i in range(len(curves))],
        "evaluations": sorted(
            {f"seed{seed}/eval/{row}.json" for seed, row in results if row not in ("baseline", "copy_last")}
        ),
    }
    (ex.run / "experiment.json").write_text(json.dumps(data, indent=1, allow_nan=False))
    lines = [
        "# re2pix experiment: the paper's ablations at CPU scale",
        "",
        f"- date: {data['date']}; machine: {data['machine']}; wall time {seconds / 60:.1f} min",
        f"- settings: {json.dumps(data['settings'])}",
        f"- every Stage 2 arm trained from {ex.store} with the same budget; scored on {ex.val}; "
        f"mean ± std over {s.samples} sampling run(s) x {s.eval_clips} clip(s) per run, pooled over {s.seeds} seed(s)",
        "- copy-last-frame: evaluate's `copy_last` model when it reports one, else its latent MSE from the store",
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
    lines += [f"- {k}: {v:.0f} s" for k, v in ex.timings.items()]
    path = ex.run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("plots: " + ", ".join(str(p) for p in plots))
    return path


def preset_stage2(preset: str) -> dict:
    from jobs.config import load_preset

    return load_preset("train", preset).get("stage2", {})


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


def plot_curve(curves: list, path: Path) -> Path:
    """Latent MSE, PSNR and mIoU against the training step, Re2Pix and the Baseline (mean over seeds,
    error bars the sampling runs' std averaged over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("latent_mse", "psnr", "seg/miou_all")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, m in zip(axes, metrics):
        for model in ("re2pix", "baseline"):
            by_step: dict[int, list] = {}
            for c in curves:
                for p in c["points"]:
                    v = p["models"].get(model, {}).get(m)
                    if v and v["mean"] is not None:
                        by_step.setdefault(p["step"], []).append((v["mean"], v["std"] or 0.0))
            steps = sorted(by_step)
            ax.errorbar(
                steps,
                [np.mean([a for a, _ in by_step[k]]) for k in steps],
                yerr=[np.mean([b for _, b in by_step[k]]) for k in steps],
                marker="o",
                capsize=3,
                label=model,
            )
        ax.set_title(METRICS[m][0], fontsize=9)
        ax.set_xlabel("training step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(run_main(main))
