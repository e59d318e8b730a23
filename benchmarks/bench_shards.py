"""`python -m benchmarks.bench shards`: the same Stage 1 training run from WebDataset shards on local disk and
in an S3 bucket (a moto S3-protocol server on 127.0.0.1), wall-clock seconds of each and their ratio (goal <=
1.5x).

The export is of a small random store at the tiny geometry; each run is `python -m jobs.train` in its own
process (start-up included, alike for both), the tiny preset's DataLoader worker, no evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5  # S3 shards at most 1.5x the local shards' time


@contextlib.contextmanager
def moto_server():
    """A moto S3 server on a free local port for the block; yields its fsspec storage options."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the moto S3 server did not start (pip install 'moto[server]')") from None
                time.sleep(0.2)
        endpoint = f"http://127.0.0.1:{port}"
        yield {
            "key": "bench",
            "secret": "bench-secret",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def train_seconds(source: str, storage_options: dict, run_dir: Path, steps: int) -> float:
    """Wall-clock seconds of one Stage 1 training run from `source`, in its own process."""
    stage1 = {
        "model": "tiny",
        "batch_size": 2,
        "steps": steps,
        "log_every": steps,
        "eval_every": 0,
        "ckpt_every": steps,
    }
    command = [sys.executable, "-m", "jobs.train", "--preset", "tiny", "--stage", "1", "--store", source]
    command += ["--run-dir", str(run_dir), "--no-progress", "--stage1", json.dumps(stage1)]
    if storage_options:
        command += ["--storage-options", json.dumps(storage_options)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"training from {source} failed: {done.stderr.strip().splitlines()[-1:]}")
    return seconds


def bench_shards(args) -> dict:
    import boto3
    import s3fs

    from benchmarks.bench_loader import write_paper_store
    from pipeline.store.geometry import TINY
    from pipeline.store.reader import Store
    from pipeline.store.wds import export_webdataset

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        work = Path(tmp)
        write_paper_store(work / "store.zarr", args.clips, "none", geometry=TINY)
        shards = export_webdataset(Store(str(work / "store.zarr")), str(work / "wds"), progress=False)
        with moto_server() as options:
            boto3.client(
                "s3", aws_access_key_id="bench", aws_secret_access_key="bench-secret", **options["client_kwargs"]
            ).create_bucket(Bucket="bench")
            fs = s3fs.S3FileSystem(**options)
            fs.put(str(work / "wds"), "bench/wds", recursive=True)
            local = train_seconds(str(work / "wds"), {}, work / "run-local", args.steps)
            remote = train_seconds("s3://bench/wds", options, work / "run-s3", args.steps)
    ratio = remote / local
    print(
        f"S3 shards vs local shards, same training run (Stage 1, tiny preset, {args.steps} steps of batch 2, "
        f"a {args.clips}-clip export in {len(shards)} shards, moto S3 server on 127.0.0.1):\n"
        f"  local {local:.1f} s, S3 {remote:.1f} s: {ratio:.2f}x (goal <= {GOAL}x: "
        f"{'met' if ratio <= GOAL else 'NOT met'})"
    )
    return {"local_s": local, "s3_s": remote, "ratio": ratio, "clips": args.clips, "steps": args.steps}


def add_arguments(p, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}clips", type=int, default=16, help="clips in the exported store")
    p.add_argument(f"--{prefix}steps", type=int, default=40, help="Stage 1 training steps of each run")


def main(argv=None) -> int:
    """`python -m benchmarks.bench_shards ...` is `python -m benchmarks.bench shards ...`."""
    import sys

    from benchmarks.bench import main as bench

    return bench(["shards", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
