"""One typed config per job: a dataclass, presets as JSON files in jobs/presets/, overrides from the
command line (`--preset tiny --stride 2 --flip`). Unknown keys in a preset are an error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path

PRESETS = Path(__file__).parent / "presets"


def _unwrap_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _parse_type(tp):
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if tp in (int, float, str):
        return tp
    if origin in (list, tuple) or tp in (list, tuple, dict) or origin is dict:
        return json.loads
    return str


def load_preset(job: str, preset: str) -> dict:
    path = PRESETS / f"{job}_{preset}.json"
    if not path.exists():
        known = sorted(p.stem.split("_", 1)[1] for p in PRESETS.glob(f"{job}_*.json"))
        raise SystemExit(f"no preset {preset!r} for {job}; known: {', '.join(known)}")
    return json.loads(path.read_text())


def parse_config(cls, job: str, argv=None, description: str = "", default_preset: str = "tiny"):
    """Build `cls` from a preset and command-line overrides; returns (config, argparse namespace)."""
    hints = typing.get_type_hints(cls)
    p = argparse.ArgumentParser(
        prog=f"python -m jobs.{job}", description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default=default_preset, help=f"presets in jobs/presets/{job}_*.json")
    for f in dataclasses.fields(cls):
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]  # e.g. --dinov2 for --encoder
        tp = hints[f.name]
        help_text = f.metadata.get("help", "")
        if _unwrap_optional(tp) is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(*flags, dest=f.name, type=_parse_type(tp), default=None, help=help_text)
    args = p.parse_args(argv)
    values = load_preset(job, args.preset)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SystemExit(f"preset {args.preset} for {job} has unknown keys {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return cls(**values), args
