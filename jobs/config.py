"""One way to configure a job: its typed config dataclass (nested where the job has parts: train ->
stage1 / stage2 -> model), a preset file in jobs/presets/{job}_{preset}.json that states only what
differs from the dataclass defaults, and command-line overrides, built by `parse_config`.

Command line (docs/training.md, "Configuration"):
- every field is a flag: `--batch-size 8`, `--flip` / `--no-flip`; lists and objects as JSON;
- a nested field is a dotted flag: `--stage2.lr 1e-4`, `--stage1.model.num-layers 4`,
  `--stage2.model.size paper` (dashes or underscores);
- a nested part also takes JSON, merged key by key: `--stage1 '{"steps": 200, "model": {"num_layers": 4}}'`.
Later wins: dataclass defaults < preset < JSON of a part < dotted flags. Unknown keys anywhere (preset,
JSON, a checkpoint's saved config) are a ConfigError (pipeline/config.py builds every dataclass).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, dataclass_type, field_types, from_dict, to_dict

PRESETS = Path(__file__).parent / "presets"
# where the demo keeps its stores and runs: the default of every job's paths
DEMO = "runs/demo"
DEMO_STORE, DEMO_VAL_STORE, DEMO_RUNS = f"{DEMO}/store.zarr", f"{DEMO}/val.zarr", f"{DEMO}/train"


def load_preset(job: str, preset: str) -> dict:
    path = PRESETS / f"{job}_{preset}.json"
    if not path.exists():
        names = (p.stem.removeprefix(f"{job}_") for p in PRESETS.glob(f"{job}_*.json"))
        known = sorted(n for n in names if not (PRESETS.parent / f"{job}_{n.split('_')[0]}.py").exists())
        raise ConfigError(f"no preset {preset!r} for {job}; known: {', '.join(known)}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e


def _parse_type(tp):
    if tp in (int, float, str):
        return tp
    return _json if tp in (list, tuple, dict) or dataclasses.is_dataclass(tp) or hasattr(tp, "__origin__") else str


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


def _add_flags(p, cls, defaults: dict, prefix: str = "") -> None:
    """A flag per field of `cls`, and for each nested config one JSON flag plus its own dotted flags; each
    flag's help ends with its default: `defaults`, the preset's resolved values. A field's help is its
    metadata["help"], else the class's HELP table (classes whose fields are plain defaults)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in getattr(cls, "FROM_DATA", ())}
    if getattr(cls, "SIZES", None):
        p.add_argument(
            f"--{prefix}size",
            dest=f"{prefix}size",
            choices=list(cls.SIZES),
            default=None,
            help=f"a named size, the --{prefix}FIELD flags on top (default: none, the values shown below)",
        )
    for name, f in fields.items():
        tp, meta = field_types(cls)[name], f.metadata
        flags = ["--" + prefix + name.replace("_", "-"), *meta.get("aliases", ())]  # e.g. --dinov2 for --encoder
        dest, help_text = prefix + name, meta.get("help") or getattr(cls, "HELP", {}).get(name, "")
        sub = dataclass_type(tp)
        if sub:
            help_text = f"{help_text}; merged key by key, defaults at its --{dest}.FIELD flags below"
        else:
            help_text = f"{help_text} (default: {_show(defaults.get(name))})"
        help_text = help_text.replace("%", "%%")
        if tp is bool:
            p.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        p.add_argument(*flags, dest=dest, type=_parse_type(tp), default=None, help=help_text)
        if sub:
            _add_flags(p.add_argument_group(prefix + name), sub, defaults.get(name) or {}, f"{prefix}{name}.")


def _normalise(argv: list[str]) -> list[str]:
    """`--stage1.model.num_layers` as `--stage1.model.num-layers`: dotted flags take either spelling."""
    out = []
    for a in argv:
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            flag, eq, rest = a.partition("=")
            a = flag.replace("_", "-") + eq + rest
        out.append(a)
    return out


def merge(cls, base: dict, over: dict) -> dict:
    """`over` on top of `base`, key by key inside nested configs (a size name counts as {"size": name})."""
    out = dict(base)
    types_ = field_types(cls)
    from_data = set(over) & set(getattr(cls, "FROM_DATA", ()))
    if from_data:
        raise ConfigError(f"{cls.__name__} takes {sorted(from_data)} from the store, not from settings")
    for key, value in over.items():
        sub = dataclass_type(types_.get(key))
        old = out.get(key)
        if sub and isinstance(value, dict) and isinstance(old, dict | str):
            out[key] = merge(sub, {"size": old} if isinstance(old, str) else old, value)
        else:
            out[key] = value
    return out


def _nested(path: list[str], value) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def parse_config(
    cls, job: str, argv=None, description: str = "", default_preset: str = "tiny", prog: str | None = None
):
    """Build `cls` from its defaults, a preset and the command line (module docstring); returns
    (config, argparse namespace). `prog`: the job's name where it reads another job's presets (pca: cache's).
    `--print-config` prints the resolved config as JSON and exits."""
    argv = _normalise(sys.argv[1:] if argv is None else list(argv))
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=default_preset)
    preset = first.parse_known_args(argv)[0].preset
    values = load_preset(job, preset)
    p = argparse.ArgumentParser(
        prog=f"python -m jobs.{prog or job}",
        usage="%(prog)s [--preset NAME] [--FIELD VALUE | --PART.FIELD VALUE | --PART JSON ...]",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"The defaults shown are preset {preset!r}'s (jobs/presets/{job}_{preset}.json over the built-ins).",
    )
    p.add_argument(
        "--preset", default=default_preset, help=f"presets in jobs/presets/{job}_*.json (default: %(default)s)"
    )
    p.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit (default: off)"
    )
    _add_flags(p, cls, to_dict(from_dict(cls, values, f"preset {preset!r}")))
    args = p.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in ("preset", "print_config") and v is not None}
    for dest in sorted(given, key=lambda d: d.count(".")):  # whole parts (JSON) first, dotted flags after
        values = merge(cls, values, _nested(dest.split("."), given[dest]))
    cfg = from_dict(cls, values, f"the {job} config (preset {args.preset})")
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        raise SystemExit(0)
    return cfg, args
