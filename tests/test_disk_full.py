"""A disk that fills mid-way (issue 31, item 7): one line naming the path and its free space, "free space and
rerun the same command", nothing half-written taken for finished, and the rerun (after space was freed)
finishes what was started.

Where the test runs as root, a real small tmpfs is the full disk (every write path meets a real ENOSPC:
zarr's chunk writes, torch's and safetensors' checkpoint writers, tar shards); elsewhere those tests skip
and the in-process ones below inject the errors the writers raise (an OSError with errno 28, torch's
`unexpected pos`, a Ray worker's RayTaskError)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import run
from pipeline.store.format import IncompleteStoreError
from pipeline.store.reader import Store
from tests.store_factory import make_store

ROOT = Path(__file__).resolve().parents[1]
DISK_FULL = "free space and rerun the same command"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (mounting needs root) and a function that grows it, as freeing space would."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode:
        pytest.skip(f"no small tmpfs here ({mount.stderr.decode().strip()}); the injected-error tests cover ENOSPC")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)

    yield disk, grow
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _job(module: str, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def _disk_full_line(proc, path) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: no space left on device writing {path}"), lines[0]
    assert "MiB free there)" in lines[0] and lines[0].endswith(DISK_FULL), lines[0]
    return lines[0]


def test_a_copy_onto_a_full_disk_is_one_line_and_resumes_once_space_is_freed(tmp_path, small_disk):
    disk, grow = small_disk
    make_store(tmp_path / "src.zarr", scenes=4, frames=60)  # 4.6 MB
    dst = disk / "dst.zarr"
    _disk_full_line(_job("jobs.store", "copy", tmp_path / "src.zarr", dst), dst)
    with pytest.raises(IncompleteStoreError):  # never taken for finished
        Store(str(dst))
    grow()
    done = _job("jobs.store", "copy", tmp_path / "src.zarr", dst)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["units_resumed"] > 0
    assert _job("jobs.store", "verify", dst).returncode == 0


def test_an_export_onto_a_full_disk_is_one_line_and_resumes_once_space_is_freed(tmp_path, small_disk):
    disk, grow = small_disk
    make_store(tmp_path / "s.zarr", scenes=4, frames=60)
    out = disk / "wds"
    _disk_full_line(_job("jobs.store", "export-wds", tmp_path / "s.zarr", out, "--shard-size-mb", "0.2"), out)
    assert not (out / "manifest.json").exists()  # never taken for finished
    grow()
    done = _job("jobs.store", "export-wds", tmp_path / "s.zarr", out, "--shard-size-mb", "0.2")
    assert done.returncode == 0 and "resuming the export" in done.stdout, done.stderr
    clean = _job("jobs.store", "export-wds", tmp_path / "s.zarr", tmp_path / "clean", "--shard-size-mb", "0.2")
    assert clean.returncode == 0, clean.stderr
    shards = sorted(p.name for p in (tmp_path / "clean").glob("shard-*.tar"))
    assert shards == sorted(p.name for p in out.glob("shard-*.tar"))
    assert all((out / s).read_bytes() == (tmp_path / "clean" / s).read_bytes() for s in shards)


def test_a_checkpoint_write_on_a_full_disk_is_one_line_naming_the_run_folder(tmp_path, small_disk):
    disk, _ = small_disk
    store = tmp_path / "s.zarr"
    make_store(store, scenes=1, frames=33)
    stage1 = {"model": {"size": "tiny", "dim": 192, "num_heads": 4}, "batch_size": 2, "steps": 2, "ckpt_every": 1}
    args = ["--stage", "1", "--store", store, "--run-dir", disk / "run", "--no-progress", "--threads", "1"]
    proc = _job("jobs.train", *args, "--workers", "0", "--stage1", json.dumps(stage1))
    assert "Traceback" not in proc.stderr and "inline_container" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: no space left on device writing {disk / 'run'}") and DISK_FULL in errors[0]
    assert not list((disk / "run" / "stage1").glob("checkpoints/step-*"))  # nothing half-written kept as done


# ---- injected errors: what each writer raises on a full disk, through the jobs' one-line mapping --------------
def _ran(capsys, fail) -> str:
    assert run(lambda argv: fail()) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_enospc_with_its_file_names_that_file_and_its_free_space(tmp_path, capsys):
    def fail():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "s.zarr" / "zarr.json"))

    line = _ran(capsys, fail)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 's.zarr' / 'zarr.json'} (")
    assert line.endswith(f"MiB free there): {DISK_FULL}")


def test_a_write_without_a_path_names_the_location_the_job_holds(tmp_path, capsys, monkeypatch):
    import torch

    def short_write(*a, **kw):  # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", short_write)

    from pipeline.store.lock import locked

    def fail():
        with locked(str(tmp_path / "run" / "stage1"), "jobs.train --stage stage1"):
            torch.save({}, tmp_path / "run" / "stage1" / "state.pt")

    line = _ran(capsys, fail)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 'run' / 'stage1'} (")
    assert line.endswith(DISK_FULL)


def test_enospc_inside_a_ray_worker_is_one_line(tmp_path, capsys):
    from ray.exceptions import RayTaskError

    cause = OSError(errno.ENOSPC, "No space left on device")
    remote = RayTaskError("WriteStage.__call__", "Traceback ...\nOSError: [Errno 28] No space left on device", cause)

    from pipeline.store.lock import locked

    def fail():
        with locked(str(tmp_path / "s.zarr"), "jobs.cache"):
            raise remote

    line = _ran(capsys, fail)
    assert line.startswith(f"error: no space left on device writing {tmp_path / 's.zarr'} (") and DISK_FULL in line


def test_other_errors_keep_their_traceback():
    with pytest.raises(OSError, match="Permission denied"):
        run(lambda argv: (_ for _ in ()).throw(OSError(errno.EACCES, "Permission denied")))
