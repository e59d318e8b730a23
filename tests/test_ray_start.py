"""Which Ray cluster the cache job uses (issue: a stopped `ray start` cluster's leftover address
crashed the job), and that an interrupted job leaves no Ray process behind.

Each test gives Ray its own temp folder (RAY_TMPDIR), so the address file there is the test's own."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SYNTH = {"num_scenes": 2, "frames_per_scene": 29, "height": 72, "width": 128}
pytestmark = pytest.mark.slow


def ray_processes(tmpdir: str) -> list[str]:
    """Processes of a Ray cluster whose session lives under `tmpdir`."""
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("RAY_TMPDIR") == tmpdir and p.pid != os.getpid():
                found.append(f"{p.pid} {p.info['name']}")
        except psutil.Error:
            pass
    return found


@pytest.fixture
def ray_tmpdir():
    d = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    yield d
    deadline = time.time() + 20
    while ray_processes(d) and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes(d), "Ray processes left behind"


def cache_args(out, *extra):
    return [
        sys.executable,
        "-m",
        "jobs.cache",
        "--preset",
        "tiny",
        "--source-options",
        json.dumps(SYNTH),
        "--unit-clips",
        "1",
        "--pca-frames",
        "32",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def test_a_stopped_clusters_address_does_not_stop_the_job_and_sigterm_stops_it_cleanly(ray_tmpdir, tmp_path):
    os.makedirs(f"{ray_tmpdir}/ray")
    Path(f"{ray_tmpdir}/ray/ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing listens
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmpdir, PYTHONPATH=str(ROOT))
    out = tmp_path / "store.zarr"
    proc = subprocess.Popen(
        cache_args(out), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not list((out / "progress").glob("unit-*.json")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the driver only, as a scheduler does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-3000:]
    assert "ray: using a private local Ray cluster" in err
    assert "terminated: rerun the same command to resume" in err
    assert "Traceback" not in err
    deadline = time.time() + 20
    while ray_processes(ray_tmpdir) and time.time() < deadline:
        time.sleep(0.5)
    assert not ray_processes(ray_tmpdir)

    resumed = subprocess.run(cache_args(out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "work units already done" in resumed.stdout
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["valid_clips"] == 4


def test_a_running_local_cluster_is_found_and_named(ray_tmpdir, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_TMPDIR", ray_tmpdir)
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    )
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmpdir, PYTHONPATH=str(ROOT))
        run = subprocess.run(
            cache_args(tmp_path / "store.zarr"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"ray: using the running local Ray cluster at {cluster.address}" in run.stderr
    finally:
        cluster.shutdown()
