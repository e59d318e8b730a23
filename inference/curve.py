"""A run's curve (the paper's figure 3 for any run): every checkpoint a Stage 2 run kept scored by one
evaluation, each against the Baseline's checkpoint of the same step when its run kept one.

Stage 1 stays fixed. The JSON ("re2pix-curve/1"):
  {"schema", "store", "stage2", "baseline", "samples", "clips", "sampler",
   "points": [{"step", "checkpoints", "models": {name: {metric: {"mean", "std"}}}, "stage1"}], "seconds"}

`score_checkpoints` takes the evaluation as a function (stage2 checkpoint, baseline checkpoint or None)
-> results, so that what is scored at each point is exactly what `jobs.evaluate` scores once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from . import InferenceError
from .evaluation import CURVE_SCHEMA, curve_point, plot_curve, run_checkpoints
from .record import write_json

log = logging.getLogger("re2pix.curve")


def score_checkpoints(
    store: str,
    stage2_run: str,
    baseline_run: str | None,
    samples: int,
    evaluate: Callable[[str, str | None], dict],
    path,
) -> dict:
    """Score every kept Stage 2 checkpoint of `stage2_run` on `store`; write the curve JSON to `path` and
    its plot beside it (.png)."""
    t0 = time.time()
    stage2 = run_checkpoints(stage2_run)
    if not stage2:
        raise InferenceError(f"{stage2_run} holds no checkpoints/step-*: nothing to draw a curve from")
    baseline = run_checkpoints(baseline_run) if baseline_run else {}
    points, results = [], {}
    for step, ckpt in sorted(stage2.items()):
        log.info("curve: step %d (%s)", step, ckpt)
        other = baseline.get(step)
        results = evaluate(str(ckpt), str(other) if other else None)
        points.append(curve_point(step, results))
    curve = {
        "schema": CURVE_SCHEMA,
        "store": store,
        "stage2": stage2_run,
        "baseline": baseline_run,
        "samples": samples,
        "clips": results["clips"],
        "sampler": results["sampler"],
        "points": points,
        "seconds": round(time.time() - t0, 1),
    }
    path = write_json(path, curve)
    curve["json"], curve["png"] = str(path), str(plot_curve(points, path.with_suffix(".png")))
    return curve


def format_curve(curve: dict) -> str:
    """One line per point (each model's latent MSE at that step), then where the curve was written."""
    lines = [
        f"step {p['step']}: "
        + "  ".join(f"{name} latent_mse {m['latent_mse']['mean']:.4g}" for name, m in p["models"].items())
        for p in curve["points"]
    ]
    return "\n".join([*lines, f"wrote {curve['json']} and {curve['png']} in {curve['seconds']} s"])
