"""The cache job on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster, 127.0.0.1 only),
each node declaring 2 logical GPUs: GPU placement without GPUs (--device cpu), stores in S3 written
from both nodes, a worker node lost mid-job. Every store must equal a one-node run, row for row."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheConfig, run_cache
from pipeline.store.reader import Store

ROOT = Path(__file__).resolve().parents[1]
SYNTH = {"num_scenes": 4, "frames_per_scene": 29, "height": 72, "width": 128}  # 8 clips
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(ray_address, tmp_path_factory):
    """The one-node run: the session's cluster, the PCA basis fitted here."""
    out = tmp_path_factory.mktemp("onenode") / "store.zarr"
    run_cache(
        CacheConfig(
            dataset="synthetic",
            source_options=SYNTH,
            out=str(out),
            geometry="tiny",
            encoder="tiny",
            vae="tiny",
            pca_frames=64,
            stride=4,
            unit_clips=1,
            channel_chunk=16,
            progress=False,
            vae_threads=1,
        )
    )
    return Store(str(out))


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    tmpdir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmpdir  # this cluster's address file and sessions are the test's own
    node = {"num_cpus": 2, "num_gpus": 2, "node_ip_address": "127.0.0.1", "object_store_memory": 200 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.worker = c.add_node(**node)
    c.wait_for_nodes()
    try:
        yield c
    finally:
        c.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous


def job(cluster, out, *extra, env=None):
    args = [
        sys.executable,
        "-m",
        "jobs.cache",
        "--preset",
        "tiny",
        "--source-options",
        json.dumps(SYNTH),
        "--pca-frames",
        "64",
        "--unit-clips",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]
    return args, {**os.environ, **(env or {}), "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(ROOT)}


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def only_our_lines(stderr: str) -> list[str]:
    """The stderr lines of a job without --verbose that are not the job's own: Ray's C++ log lines, Ray
    Data's logger, aiohttp's "Unclosed client session" from an s3fs session left open."""
    from pipeline.ray_cluster import RAY_LOG_LINE

    ours = ("ray: using ", "index ", "pca sample", "cache:", "resuming ", "note: ")
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(ours)] + [
        line for line in stderr.splitlines() if RAY_LOG_LINE.match(line) or "Unclosed" in line
    ]


def verified(store: Store) -> bool:
    """No bad row (verify's report is a list of problems, or a dict with "bad_rows")."""
    report = store.verify()
    return (report.get("bad_rows") if isinstance(report, dict) else report) == []


def assert_same_rows(a: Store, b: Store):
    assert a.clip_ids == b.clip_ids and a.basis.fingerprint == b.basis.fingerprint
    np.testing.assert_array_equal(a.group["frames/features"][...], b.group["frames/features"][...])
    np.testing.assert_array_equal(a.group["clips/latents"][...], b.group["clips/latents"][...])


def test_every_logical_gpu_gets_an_encoder_actor_that_encodes(cluster, reference, tmp_path):
    """--verbose shows Ray's own warnings: none may say an actor uses more memory than it declared."""
    args, env = job(cluster, tmp_path / "gpus.zarr", "--pca", reference.location, "--verbose")
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"ray: using the Ray cluster at {cluster.address}: 2 node(s), 4 CPUs, 4 GPUs" in run.stderr
    assert "memory per worker" not in run.stderr and "consider setting `memory=" not in run.stderr
    summary = summary_of(run.stdout)
    assert summary["actors"]["encode"] >= 4, summary
    assert all(a["clips"] >= 1 and a["busy_s"] > 0 for a in summary["per_actor"]["encode"]), summary
    assert sum(a["clips"] for a in summary["per_actor"]["encode"]) == 8
    assert_same_rows(Store(str(tmp_path / "gpus.zarr")), reference)


def test_two_nodes_into_s3_fit_the_same_basis_and_rows_and_survive_a_lost_node(cluster, reference, s3_server):
    bucket = s3_server.bucket()
    env = {**s3_server.env}  # credentials and endpoint only in the environment: the job forwards them
    url = f"s3://{bucket}/two.zarr"
    args, env = job(cluster, url, env=env)
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert only_our_lines(run.stderr) == [], run.stderr[-3000:]
    store = Store(url, storage_options=s3_server.storage_options)
    assert_same_rows(store, reference)  # the PCA fingerprint too: moments merged in unit order
    assert verified(store)

    # lose the worker node once the first unit is on S3: Ray's retries finish the job, or a rerun does
    url = f"s3://{bucket}/lost.zarr"
    args, env = job(cluster, url, "--pca", reference.location, env=env)
    fs = s3_server.filesystem()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not fs.glob(f"{bucket}/lost.zarr/progress/unit-*.json"):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.2)
    cluster.remove_node(cluster.worker)
    _, err = proc.communicate(timeout=400)
    if proc.returncode != 0:
        rerun = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    store = Store(url, storage_options=s3_server.storage_options)
    assert_same_rows(store, reference)
    assert verified(store)
