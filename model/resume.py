"""--resume's check: a resumed stage keeps the settings its checkpoint was trained with, so a setting that
changed since (a new --lr, say) is refused by name rather than silently ignored; RESUME_MAY_CHANGE lists
what may differ."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from pipeline.config import ConfigError

from .checkpoint import find_resumable, has_checkpoints, read_meta

log = logging.getLogger("re2pix.train")


# what a resumed stage may change: how long it trains, how it logs, checkpoints and is evaluated
RESUME_MAY_CHANGE = {
    "steps",
    "progress",
    "log_every",
    "eval_every",
    "ckpt_every",
    "keep_checkpoints",
    "strict_resume",
    "compile",
    "tensorboard",
    "sample_steps",
    "sample_solver",
    "sample_clips",
    "val_store",
    "store",  # moved or copied: the feature-space check (model/checkpoint.py) refuses another space by name
}


def _flat(d: dict, prefix: str = "") -> dict:
    """{"model.dim": 96, ...}: a nested dict's leaves by dotted name."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resume(run_dir: Path, loop_cfg, runtime) -> None:
    """--resume (which `make train` always passes): say where the stage continues from, and refuse settings
    that differ from those its checkpoint was trained with; a resumed stage keeps its own, so a changed
    --lr would otherwise be silently ignored."""
    ckpt = find_resumable(run_dir)[0] if has_checkpoints(run_dir) else None
    if ckpt is None:
        return
    meta = read_meta(ckpt)
    loop = {k: v for k, v in dataclasses.asdict(loop_cfg).items() if k != "extra"}
    now = _flat(json.loads(json.dumps({"loop": loop, "config": loop_cfg.extra})))  # tuples as JSON lists
    was = _flat({"loop": meta.get("loop", {}), "config": meta.get("config", {})})
    names = {k: k.removeprefix("loop.").removeprefix("config.").removeprefix("stage_config.") for k in now}
    changed = {
        names[k]: (was[k], now[k])
        for k in sorted(now.keys() & was.keys())
        if was[k] != now[k] and names[k].rsplit(".", 1)[-1] not in RESUME_MAY_CHANGE
    }
    if changed:
        listed = ", ".join(f"{name} {a} (now {b})" for name, (a, b) in changed.items())
        raise ConfigError(
            f"{run_dir} was trained with {listed}; resuming keeps a run's own settings. Rerun with its "
            "settings to resume, or start afresh in another run folder: --run-dir DIR (make train RUN=DIR)"
        )
    if runtime.is_main and meta.get("step", 0) >= loop_cfg.steps:
        log.info(
            "%s: already trained to step %d (%s), reporting its result; a larger --steps trains on, "
            "another --run-dir (make train RUN=DIR) starts afresh",
            run_dir.name,
            meta["step"],
            ckpt,
        )
