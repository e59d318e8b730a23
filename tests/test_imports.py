"""The training side never imports a frozen encoder's stack: no transformers, diffusers, ray or
pipeline.encoders in sys.modules after importing the training entry points and every model module."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("transformers", "diffusers", "ray", "pipeline.encoders")


def test_training_side_imports_no_encoder_stack():
    modules = sorted(p.stem for p in (ROOT / "model").glob("*.py") if p.stem != "__init__")
    assert {"data", "loop", "metrics", "checkpoint", "tasks"} <= set(modules)
    code = (
        "import importlib, json, sys\n"
        f"for name in ['jobs.train', 'jobs.rollout'] + ['model.' + m for m in {modules!r}]:\n"
        "    importlib.import_module(name)\n"
        "import jobs.train, jobs.rollout\n"
        "jobs.train.parse(['--stage', '1'])\n"  # the config path too
        f"bad = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
