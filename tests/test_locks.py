"""One writer per store and one trainer per run folder (issue 31, item 4): a second writer is refused with
one line naming the holder, a lock whose holder is gone is taken over with a note, a store being written
says so instead of "stopped early", and locks go with the job that held them, on success and on errors."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store.format import IncompleteStoreError
from pipeline.store.lock import LOCK_FILE, Lock, LockedError, locked
from pipeline.store.reader import Store
from tests.store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def holder():
    """Start another process that takes a folder's lock (as a job named `job`) and keeps it until the test ends."""
    procs = []

    def start(folder, job="jobs.cache"):
        code = (
            "import sys, time\n"
            "from pipeline.store.lock import Lock\n"
            f"Lock({str(folder)!r}, {job!r}).acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _job(module: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def _one_error_line(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_a_second_copy_into_a_store_being_written_is_refused_naming_the_holder(tmp_path, holder):
    make_store(tmp_path / "src.zarr")
    dst = tmp_path / "dst.zarr"
    other = holder(dst, "jobs.store copy")
    line = _one_error_line(_job("jobs.store", "copy", tmp_path / "src.zarr", dst))
    assert f"jobs.store copy (PID {other.pid} on {socket.gethostname()} since " in line
    assert "wait for it to end" in line
    assert sorted(p.name for p in dst.iterdir()) == [LOCK_FILE]  # nothing of the second copy's was written


def test_a_second_export_into_the_same_folder_is_refused(tmp_path, holder):
    make_store(tmp_path / "s.zarr")
    other = holder(tmp_path / "wds", "jobs.store export-wds")
    line = _one_error_line(_job("jobs.store", "export-wds", tmp_path / "s.zarr", tmp_path / "wds"))
    assert f"PID {other.pid}" in line and "jobs.store export-wds" in line


def test_a_second_cache_job_on_one_out_is_refused_before_ray_starts(tmp_path, holder, monkeypatch):
    from pipeline.cache import run_cache
    from tests.test_cache import tiny_config

    out = tmp_path / "store.zarr"
    other = holder(out, "jobs.cache")

    def no_ray(*a, **kw):
        raise AssertionError("Ray started although another cache job holds the store")

    monkeypatch.setattr("pipeline.ray_cluster.start_ray", no_ray)
    with pytest.raises(LockedError, match=f"jobs.cache \\(PID {other.pid} on "):
        run_cache(tiny_config(out))


def test_a_second_trainer_on_one_run_folder_is_refused(tmp_path, holder):
    from jobs.train import main as train_main

    store = tmp_path / "s.zarr"
    make_store(store, scenes=1, frames=33)
    other = holder(tmp_path / "run" / "stage1", "jobs.train --stage stage1")
    stage1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 1}
    args = ["--stage", "1", "--store", str(store), "--run-dir", str(tmp_path / "run"), "--no-progress"]
    with pytest.raises(LockedError, match=f"PID {other.pid}"):
        train_main([*args, "--threads", "1", "--workers", "0", "--stage1", json.dumps(stage1)])
    assert sorted(p.name for p in (tmp_path / "run" / "stage1").iterdir()) == [LOCK_FILE]  # no metrics, no checkpoint


def test_a_store_being_written_says_so_instead_of_stopped_early(tmp_path, holder):
    make_store(tmp_path / "s.zarr", finalize=False)
    with pytest.raises(IncompleteStoreError, match="stopped early"):  # nobody writes it: a rerun resumes it
        Store(str(tmp_path / "s.zarr"))
    other = holder(tmp_path / "s.zarr", "jobs.cache")
    with pytest.raises(IncompleteStoreError) as e:
        Store(str(tmp_path / "s.zarr"))
    assert f"being written by jobs.cache (PID {other.pid} on {socket.gethostname()} since" in str(e.value)
    assert "stopped early" not in str(e.value) and "rerun" not in str(e.value)


def test_a_lock_whose_holder_died_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = {"job": "jobs.cache", "host": socket.gethostname(), "pid": dead.pid, "started": time.time() - 5}
    old["since"], old["token"] = "2026-01-01T00:00:00+00:00", "old"
    (tmp_path / LOCK_FILE).write_text(json.dumps(old))
    with locked(str(tmp_path), "jobs.store copy"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and f"jobs.cache (PID {dead.pid} on " in err[0]
    assert "no longer runs" in err[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    # the lock names this very PID, but from before this process started: the PID was reused
    old = {"job": "jobs.cache", "host": socket.gethostname(), "pid": os.getpid(), "started": 1000.0, "token": "old"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(old))
    with locked(str(tmp_path), "jobs.cache"):
        pass


def test_a_lock_held_on_another_host_is_refused_with_how_to_clear_it(tmp_path):
    other = {"job": "jobs.cache", "host": "node-7", "pid": 4242, "started": time.time(), "since": "2026-12-07T06:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dict(other, token="x")))
    with pytest.raises(LockedError) as e:
        Lock(str(tmp_path), "jobs.store copy").acquire()
    msg = str(e.value)
    assert "jobs.cache (PID 4242 on node-7 since 2026-12-07T06:00)" in msg
    assert f"delete {tmp_path / LOCK_FILE}" in msg and "\n" not in msg
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-7"  # never removed from here


def test_a_lock_is_released_on_errors_and_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(ValueError), locked(str(tmp_path / "new.zarr"), "jobs.cache"):
        assert (tmp_path / "new.zarr" / LOCK_FILE).exists()
        raise ValueError("the job failed")
    assert not (tmp_path / "new.zarr").exists()
    with locked(str(tmp_path / "new.zarr"), "jobs.cache"):
        pass  # and a later job takes it at once


def test_an_object_store_lock_refuses_a_second_writer(s3_server):
    s3_server.create_bucket("locks")
    url, options = "s3://locks/s.zarr", s3_server.storage_options
    with locked(url, "jobs.store copy", options):
        with pytest.raises(LockedError, match=f"jobs.store copy \\(PID {os.getpid()} on "):
            Lock(url, "jobs.cache", options).acquire()
    with locked(url, "jobs.cache", options):  # released: free again
        pass


def test_a_file_where_the_folder_should_be_is_refused_and_kept(tmp_path):
    from pipeline.errors import Re2pixError

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Re2pixError, match="notes.txt is a file, not a folder"):
        Lock(str(tmp_path / "notes.txt"), "jobs.store export-wds").acquire()
    assert (tmp_path / "notes.txt").read_text() == "mine"
