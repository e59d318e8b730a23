"""What each part of the code base may import, checked in a fresh interpreter per case.

The trainer (`model/`, jobs.train, jobs.rollout and the stage loader they share) never imports a
frozen encoder's stack; inference (and its jobs) loads it lazily, only inside the functions that
encode or decode; importing the encoder and store packages does not even import torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = sorted(f"model.{p.stem}" for p in (ROOT / "model").glob("*.py") if p.stem != "__init__")
INFERENCE = sorted(f"inference.{p.stem}" for p in (ROOT / "inference").glob("*.py") if p.stem != "__init__")
TRAINER_FORBIDDEN = ("transformers", "diffusers", "ray", "pipeline.encoders")
LAZY_FORBIDDEN = ("transformers", "diffusers", "ray")

CASES = [
    pytest.param(MODEL, "", TRAINER_FORBIDDEN, id="model"),
    pytest.param(
        ["jobs.train"],
        "import jobs.train; jobs.train.parse(['--stage', '1'])",  # the config path too
        TRAINER_FORBIDDEN,
        id="jobs.train",
    ),
    pytest.param(["jobs.rollout", "inference.rollout", "inference.stages"], "", TRAINER_FORBIDDEN, id="jobs.rollout"),
    pytest.param(INFERENCE, "", LAZY_FORBIDDEN, id="inference"),
    pytest.param(["jobs.predict", "jobs.evaluate"], "", LAZY_FORBIDDEN, id="jobs.predict+evaluate"),
    pytest.param(
        ["pipeline.encoders", "pipeline.store"],
        "",
        ("transformers", "diffusers", "torch"),
        id="pipeline.encoders+store",
    ),
    # the cache job's driver: Ray, torch and the stages are imported where used; nothing of jobs/
    pytest.param(["pipeline.cache"], "", ("ray", "torch", "transformers", "diffusers", "jobs"), id="pipeline.cache"),
]


@pytest.mark.parametrize("modules, then, forbidden", CASES)
def test_imports_stay_light(modules, then, forbidden):
    assert modules  # the globs found the packages
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"{then}\n"
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {forbidden!r}))\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
