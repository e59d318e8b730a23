"""The paper's ablations at CPU scale in one run (`make experiment`, `python -m jobs.experiment [--quick]`).

On the built-in synthetic driving set (tiny models, the demo encoders): cache a train and a val store
-> write the val clips' class maps (the source's ground truth) and train a DPT segmentation head on
the train store's features (the mIoU of every table) -> train every Stage 1 forecaster with the same budget
and roll the first (PredGS) out into the train store -> train every Stage 2 arm from that store with the
same budget (steps, batch, lr, seed; the lr constant after its warmup, as the paper's figure 3) -> evaluate
each arm on the val store -> report.md, experiment.json and PNG plots in --run.
Each step is the same job a user runs by hand (jobs.cache, jobs.train_dpt, jobs.train, jobs.rollout,
jobs.evaluate), started as a subprocess. The settings, tables, report and plots are inference/experiment_report.py.

Tables (the paper's numbering; each has copy-last-frame as a row):
- convergence (figure 3): Re2Pix and the Baseline scored at every kept checkpoint, one every tenth of the
  steps (jobs.evaluate --every-checkpoint); the speed-up is the Baseline's final step over the step at which
  Re2Pix reaches the Baseline's final value, interpolated between the checkpoints around it ("at least" when
  the first checkpoint already reaches it, "not reached" when none does);
- table 3: nested dropout on / off (stage setting nested_dropout);
- table 4: ground-truth-only / predicted-only / 90-10 mixed supervision (stage setting pred_p 0, 1, 0.1);
- table 5: PCA channels Stage 2 reads at inference (jobs.evaluate --channels), 8 ... all;
- tables 8, 9: representation guidance (eq. 10) at settings fixed in advance, w 0.4 at c 8 / 16 / 32 and c 16
  at w 0.2 / 0.8 (jobs.evaluate --guidance-channels c --guidance-weight w), each compared with no guidance;
- halves: Re2Pix, the Baseline and copy-last-frame on each half of the val scenes (jobs.evaluate
  --val-scenes), and whether their order flips between the halves;
- forecasters: copy-last and each Stage 1 of inference/experiment_report.py's FORECASTERS (PredGS, regression
  with SmoothL1, regression with L1 + SSIM, the diffusion Stage 1), per future frame their feature MSE,
  cosine and sharpness, the head's mIoU on their features, and seed 0's Re2Pix conditioned on each
  (jobs.evaluate --stage1 ... --no-decode), and on the ground-truth future features (--features truth: a perfect
  forecaster); the best forecaster's MSE against copy-last's and the share of Re2Pix's gap between regression and
  the truth it closes are checked.
Values are mean ± std over sampling runs (the paper's appendix 6.1), pooled over seeds with --seeds N
(Stage 2 arms trained with seeds 0..N-1; Stage 1 and the head are trained once). Every table says
whether the paper's direction showed up here: "reproduced" or "not reproduced".

The trainings and evaluations run two at a time, one torch thread each (2 CPU cores). Decoding is most of an
evaluation's time on a CPU: the decodes every evaluation repeats (the VAE reconstruction, copy-last) are kept
in --run/decoded (jobs.evaluate --decode-cache), the rows take 2 sampling runs per seed and the curves 1.
--quick runs every arm with a handful of steps on two clips: a smoke test of the harness, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from inference.experiment_report import ARMS, FORECASTERS, HALVES, TRUTH, Settings, build_report, inference_rows
from jobs.cli import HelpFormatter, Shared, replace_run_folder, side_by_side
from jobs.cli import run as run_main
from jobs.cli import step as run_step
from pipeline.errors import Re2pixError

ANNOTATED_FRAME = 16  # the clip frame whose class map scores mIoU (evaluate's default, Cityscapes' frame 19)


class ExperimentError(Re2pixError):
    """A step of the experiment failed, or its run folder cannot be used."""


class Experiment:
    def __init__(self, run: Path, s: Settings):
        self.run, self.s, self.timings = run, s, {}
        self.store, self.val = run / "store.zarr", run / "val.zarr"
        self.labels, self.head = run / "labels", run / "heads" / "seg.safetensors"
        self.stage1 = self.forecaster(FORECASTERS[0][0])  # the Stage 1 every Stage 2 arm trains with

    def forecaster(self, name: str) -> Path:
        """The checkpoint folder of one Stage 1 forecaster."""
        return self.run / "forecasters" / name / "stage1"

    def forecaster_evaluation(self, name: str) -> str:
        """The evaluation holding seed 0's Re2Pix conditioned on forecaster `name`: the first forecaster is the
        Stage 1 of every evaluation, so seed 0's main one ("re2pix") serves; the others get their own."""
        return "re2pix" if name == FORECASTERS[0][0] else f"forecaster_{name}"

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

    def write_halves(self) -> dict[str, Path]:
        """Two disjoint halves of the evaluated val clips, split by scene, as jobs.evaluate --val-scenes reads
        them (the record a training run writes of its held-out scenes): {half: path}."""
        from pipeline.store.reader import Store
        from pipeline.store.tables import held_out_record

        store = Store(str(self.val))
        clips = list(range(min(len(store), self.s.eval_clips)))
        scenes = sorted({store.clip_meta(i)["scene"] for i in clips})
        if len(scenes) < 2:
            raise ExperimentError(f"{self.val}: the evaluated clips come from {len(scenes)} scene(s); halves need 2")
        paths = {}
        for half, mine in zip(HALVES, (scenes[: len(scenes) // 2], scenes[len(scenes) // 2 :])):
            record = held_out_record(store, [i for i in clips if store.clip_meta(i)["scene"] in mine])
            paths[half] = self.run / "halves" / f"{half}.json"
            paths[half].parent.mkdir(exist_ok=True)
            paths[half].write_text(json.dumps(record, indent=1))
        return paths

    def budget(self, which: str) -> dict:
        """The stage settings every arm shares: steps, batch, lr (the preset's unless given), checkpoints, and
        for Stage 2 the lr constant after the preset's warmup (figure 3's protocol)."""
        s = self.s
        steps = s.stage1_steps if which == "stage1" else s.steps
        out = {k: v for k, v in (("steps", steps), ("batch_size", s.batch_size), ("lr", s.lr)) if v is not None}
        if which == "stage2":  # every checkpoint kept for the curve; the trainer's own sampled check kept small
            every = s.ckpt_every or max(1, (s.steps or preset_stage2(s.preset).get("steps", 100)) // 10)
            out.update(schedule="constant", ckpt_every=every, keep_checkpoints=0, eval_every=0, sample_clips=1)
            out.update(sample_steps=s.sample_steps)
        return out

    def lanes(self, steps: list[tuple[str, list[str]]]) -> None:
        """Run independent steps two at a time (one torch thread each: both cores busy), started in the order
        given, each lane taking the next step when its last one ends."""
        side_by_side(Shared(steps, 2), self.run / "logs", self.timings)

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

    def evaluate(self, name: str, seed: int, stage2: Path, extra: list[str], baseline: Path | None = None, stage1=None):
        """The step of jobs.evaluate of one Stage 2 checkpoint (and the Baseline when given; with Stage 1
        `stage1`, else the first forecaster's) on the val store, its results to eval_path(seed, name)."""
        out = self.eval_path(seed, name)
        args = self.evaluate_args(seed, stage2, baseline, stage1)
        return f"evaluate seed {seed} {name}", args + ["--out", str(out), *extra]

    def curve(self, seed: int, stage2: Path, baseline: Path) -> tuple[str, list[str]]:
        """jobs.evaluate --every-checkpoint: Re2Pix and the Baseline at every kept checkpoint (curve.json)."""
        path = self.eval_path(seed, "curve")
        args = self.evaluate_args(seed, stage2, baseline, samples=self.s.curve_samples)
        args += ["--every-checkpoint", "--curve", str(path)]
        return f"evaluate seed {seed} every checkpoint", args

    def evaluate_args(self, seed: int, stage2: Path, baseline: Path | None, stage1=None, samples=None) -> list[str]:
        """The reconstruction and copy-last decodes, the same in every evaluation, are kept in run/decoded."""
        s = self.s
        return (
            ["jobs.evaluate", "--preset", s.preset, "--store", str(self.val), "--stage1", str(stage1 or self.stage1)]
            + ["--stage2", str(stage2), "--baseline", str(baseline) if baseline else "", "--seed", str(seed)]
            + ["--samples", str(samples or s.samples), "--max-clips", str(s.eval_clips)]
            + ["--sample-steps", str(s.sample_steps), "--decode-cache", str(self.run / "decoded")]
            + ["--seg-head", str(self.head), "--labels", str(self.labels), "--annotated-frame", str(ANNOTATED_FRAME)]
            + ["--no-progress", "--threads", "1"]
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.experiment", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", default="runs/experiment", help="everything goes under this folder (replaced)")
    p.add_argument("--quick", action="store_true", help="a few minutes: every arm, a handful of steps, two clips")
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
    halves = ex.write_halves()
    head = ["jobs.train_dpt", "--preset", s.preset, "--store", str(ex.store), "--tasks", "segmentation"]
    head += ["--labels", "source", "--epochs", str(s.head_epochs), "--out", str(run / "heads"), "--threads", "1"]
    rollout = ["jobs.rollout", "--preset", s.preset, "--checkpoint", str(ex.stage1), "--store", str(ex.store)]
    stage1 = [
        ex.train("1", ex.forecaster(name).parent, {**ex.budget("stage1"), **extra}, 0) for name, extra in FORECASTERS
    ]
    # the first forecaster and its rollout beside the head, the others dealt to the two lanes in turn
    lanes = [[stage1[0], ("rollout", rollout), *stage1[2::2]], [("train head", head), *stage1[1::2]]]
    side_by_side(lanes, run / "logs", ex.timings)
    evaluations = {}  # (seed, row) -> the evaluation (name) whose results hold the row
    steps, curve_steps = [], []
    ex.lanes(  # every seed's arms in one queue: 10 trainings keep both lanes busy to the end
        [
            ex.train(stage, run / f"seed{seed}" / arm, {**ex.budget("stage2"), **extra}, seed)
            for seed in range(s.seeds)
            for arm, (stage, extra) in ARMS.items()
        ]
    )
    for seed in range(s.seeds):
        arms = run / f"seed{seed}"
        re2pix, base = arms / "re2pix" / "stage2", arms / "baseline" / "baseline"
        steps.append(ex.evaluate("re2pix", seed, re2pix, [], baseline=base))
        evaluations.update({(seed, row): "re2pix" for row in ("re2pix", "baseline", "copy_last")})
        for half, path in halves.items():
            steps.append(ex.evaluate(half, seed, re2pix, ["--val-scenes", str(path)], baseline=base))
            evaluations[seed, half] = half
        for arm in ("no_nested", "gt_only", "pred_only"):
            steps.append(ex.evaluate(arm, seed, arms / arm / "stage2", []))
            evaluations[seed, arm] = arm
        for name, flags in inference_rows(s).items():
            if flags:
                steps.append(ex.evaluate(name, seed, re2pix, flags))
                evaluations[seed, name] = name
        curve_steps.append(ex.curve(seed, re2pix, base))
    # seed 0's Re2Pix conditioned on each other forecaster (the first's is seed 0's own evaluation), and on
    # the ground-truth future features: what a perfect forecaster would give it
    seed0 = run / "seed0" / "re2pix" / "stage2"
    for name, _ in FORECASTERS[1:]:
        steps.append(ex.evaluate(ex.forecaster_evaluation(name), 0, seed0, ["--no-decode"], stage1=ex.forecaster(name)))
    steps.append(ex.evaluate(TRUTH, 0, seed0, ["--no-decode", "--features", "truth"]))
    ex.lanes(curve_steps + steps)  # the curves first: the longest evaluations
    loaded = {(seed, name): json.loads(ex.eval_path(seed, name).read_text()) for (seed, _), name in evaluations.items()}
    results = {(seed, row): loaded[seed, name] for (seed, row), name in evaluations.items()}
    curves = [json.loads(ex.eval_path(seed, "curve").read_text()) for seed in range(s.seeds)]
    forecasts = {
        name: json.loads(ex.eval_path(0, ex.forecaster_evaluation(name)).read_text()) for name, _ in FORECASTERS
    }
    report = build_report(
        run,
        s,
        results,
        curves,
        time.time() - t0,
        forecasts=forecasts,
        truth=json.loads(ex.eval_path(0, TRUTH).read_text()),
        store=ex.store,
        val=ex.val,
        timings=ex.timings,
        train_preset_stage2=preset_stage2(s.preset),
    )
    print(f"\nwrote {report} ({(time.time() - t0) / 60:.1f} min)")
    return 0


def preset_stage2(preset: str) -> dict:
    from jobs.config import load_preset

    return load_preset("train", preset).get("stage2", {})


if __name__ == "__main__":
    sys.exit(run_main(main))
