"""Stores on object storage: a real S3-protocol server (moto, started by the session on 127.0.0.1)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheConfig, run_cache
from pipeline.store.reader import Store

SYNTH = {"num_scenes": 2, "frames_per_scene": 29, "height": 72, "width": 128}
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(out, **kw):
    base = {
        "dataset": "synthetic",
        "source_options": SYNTH,
        "out": str(out),
        "geometry": "tiny",
        "encoder": "tiny",
        "vae": "tiny",
        "pca_frames": 64,
        "stride": 4,
        "unit_clips": 1,
        "channel_chunk": 16,
        "progress": False,
    }
    base.update(kw)
    return CacheConfig(**base)


@pytest.fixture(scope="module")
def local_store(ray_address, tmp_path_factory):
    out = tmp_path_factory.mktemp("s3ref") / "store.zarr"
    run_cache(tiny_config(out))
    return out


def verified(store: Store) -> bool:
    """No bad row (verify's report is a list of problems, or a dict with "bad_rows")."""
    report = store.verify()
    return (report.get("bad_rows") if isinstance(report, dict) else report) == []


def assert_same_rows(a: Store, b: Store):
    assert a.clip_ids == b.clip_ids and a.basis.fingerprint == b.basis.fingerprint
    np.testing.assert_array_equal(a.group["frames/features"][...], b.group["frames/features"][...])
    np.testing.assert_array_equal(a.group["clips/latents"][...], b.group["clips/latents"][...])


def test_cache_into_s3_with_storage_options_equals_a_local_store(local_store, s3_server):
    url = f"s3://{s3_server.bucket()}/store.zarr"
    summary = run_cache(tiny_config(url, storage_options=s3_server.storage_options))
    assert summary["valid_clips"] == 4
    store = Store(url, storage_options=s3_server.storage_options)
    assert_same_rows(store, Store(str(local_store)))
    assert verified(store)
    secret = s3_server.storage_options["secret"]
    assert secret not in json.dumps(store.manifest) and secret not in json.dumps(summary)


def test_store_tools_read_an_s3_store_with_storage_options_alone(local_store, s3_server, capsys):
    """No AWS_* in this process: the endpoint and credentials reach info / verify / check by the flag only."""
    from jobs.store import main as store_main

    url = f"s3://{s3_server.bucket()}/tools.zarr"
    run_cache(tiny_config(url, storage_options=s3_server.storage_options))
    options = ["--storage-options", json.dumps(s3_server.storage_options)]
    assert store_main(["info", url, *options]) == 0
    assert store_main(["verify", url, *options]) == 0
    assert store_main(["check", url, str(local_store), *options]) == 0
    out = capsys.readouterr().out
    assert "compatible: 2 stores" in out and s3_server.storage_options["secret"] not in out


@pytest.mark.slow
def test_killed_job_into_s3_resumes_on_its_first_rerun(local_store, s3_server, ray_address, tmp_path):
    """Credentials and endpoint only in the environment (AWS_*): the job forwards them to its workers.
    SIGKILL after the first marker lands; the first rerun must see every marker (fresh listings)."""
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/killed.zarr"
    args = [
        sys.executable,
        "-m",
        "jobs.cache",
        "--preset",
        "tiny",
        "--source-options",
        json.dumps(SYNTH),
        "--pca",
        str(local_store),
        "--unit-clips",
        "1",
        "--channel-chunk",
        "16",
        "--no-progress",
        "--out",
        url,
    ]
    env = {**os.environ, **s3_server.env, "RAY_ADDRESS": ray_address, "PYTHONPATH": str(ROOT)}
    fs = s3_server.filesystem()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 240
    while not fs.glob(f"{bucket}/killed.zarr/progress/unit-*.json"):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no unit finished in time"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "work units already done" in resumed.stdout
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in resumed.stdout + resumed.stderr
    store = Store(url, storage_options=s3_server.storage_options)
    assert_same_rows(store, Store(str(local_store)))
    assert verified(store)
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already complete, nothing to do" in again.stdout, again.stderr[-2000:]


def test_train_stage1_from_the_s3_store(local_store, s3_server, tmp_path):
    from jobs.train import main as train_main

    url = f"s3://{s3_server.bucket()}/train.zarr"
    run_cache(tiny_config(url, storage_options=s3_server.storage_options, pca=str(local_store)))
    stage1 = {"model": "tiny", "batch_size": 2, "steps": 2, "log_every": 1, "eval_every": 0, "ckpt_every": 2}
    assert train_main(
        [
            "--stage",
            "1",
            "--store",
            url,
            "--storage-options",
            json.dumps(s3_server.storage_options),
            "--run-dir",
            str(tmp_path / "run"),
            "--val-clips",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--workers",
            "0",
            "--stage1",
            json.dumps(stage1),
        ]
    ) in (0, None)
    assert list((tmp_path / "run" / "stage1").rglob("*.safetensors"))
