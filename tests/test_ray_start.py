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


def cluster_processes(tmpdir: str) -> list[psutil.Process]:
    """Processes of a Ray cluster whose session lives under `tmpdir`."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("RAY_TMPDIR") == tmpdir and p.pid != os.getpid():
                found.append(p)
        except psutil.Error:
            pass
    return found


def ray_processes(tmpdir: str) -> list[str]:
    named = []
    for p in cluster_processes(tmpdir):
        try:
            named.append(f"{p.pid} {p.name()}")
        except psutil.Error:  # gone meanwhile
            pass
    return named


def stop_cluster(tmpdir: str) -> None:
    """Stop the Ray cluster whose session lives under `tmpdir`, and nothing else."""
    procs = cluster_processes(tmpdir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    for p in psutil.wait_procs(procs, timeout=10)[1]:
        try:
            p.kill()
        except psutil.Error:
            pass


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


def ray_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=180)


def test_the_readmes_ray_start_cluster_with_its_token_is_joined_given_or_found(ray_tmpdir, tmp_path):
    """The README's recipe: `ray start --head --port P --num-gpus 4` with Ray's default authentication
    (a token on the machine, as any earlier private cluster leaves one), then the cache job with and
    without RAY_ADDRESS: both join, place an encoder actor on every logical GPU and finish. A wrong token
    and an address where nothing answers are one line each."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the cluster on loopback (this machine's rule for tests);
    # nothing else differs from the README's command
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmpdir, PYTHONPATH=str(ROOT), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    assert ray_cli(["get-auth-token", "--generate"], env).returncode == 0
    assert (home / ".ray" / "auth_token").exists()
    port = free_port()
    # 4 logical CPUs as 4 GPUs: on a 2-core machine the pool's actors then all find room (as the cluster tests' nodes)
    started = ray_cli(["start", "--head", "--port", str(port), "--num-gpus", "4", "--num-cpus", "4"], env)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        assert "Token authentication is enabled" in started.stdout + started.stderr
        gcs = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
        assert gcs and all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in gcs), gcs
        address = f"127.0.0.1:{port}"
        for name, extra in (("given", {"RAY_ADDRESS": address}), ("found", {})):
            out = tmp_path / f"{name}.zarr"
            run = subprocess.run(  # 8 clips: enough units for an encoder actor on every logical GPU
                [*cache_args(out), "--device", "cpu", "--source-options", json.dumps({**SYNTH, "num_scenes": 4})],
                cwd=ROOT, env={**env, **extra}, capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            assert run.returncode == 0, run.stderr[-3000:]
            where = "the Ray cluster at" if name == "given" else "the running local Ray cluster at"
            line = next(x for x in run.stderr.splitlines() if x.startswith("ray: using "))
            assert line.startswith(f"ray: using {where} {address}") and line.endswith(": 1 node(s), 4 CPUs, 4 GPUs")
            assert json.loads(run.stdout.strip().splitlines()[-1])["actors"]["encode"] >= 4
        wrong = subprocess.run(
            [*cache_args(tmp_path / "wrong.zarr")],
            cwd=ROOT, env={**env, "RAY_ADDRESS": address, "RAY_AUTH_TOKEN": "0" * 64},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr, wrong.stderr[-3000:]
        assert f"error: ray: cannot join the Ray cluster at {address}: it refused this job's authentication token" in (
            wrong.stderr
        )
        assert not (tmp_path / "wrong.zarr").exists()
    finally:
        stop_cluster(ray_tmpdir)  # not `ray stop`: it stops every Ray process on the machine, the session's own too
    nobody = f"127.0.0.1:{free_port()}"
    gone = subprocess.run(
        cache_args(tmp_path / "none.zarr"), cwd=ROOT, env={**env, "RAY_ADDRESS": nobody},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = [x for x in gone.stderr.strip().splitlines() if not x.startswith("note: ")]  # random-weight notice
    assert gone.returncode == 1 and lines == [
        f"error: ray: cannot join the Ray cluster at {nobody}: nothing answers there (is it running? "
        f"`ray status --address {nobody}`); --ray-address local starts a private one on this machine"
    ], gone.stderr
