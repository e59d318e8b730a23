"""The DataLoader workers' reused batch sets are sized against /dev/shm's free space: fewer prefetched
batches where it is short, one line saying what to set where not even one per worker fits."""

import json
import math

import pytest

import model.data.buffers
from jobs.cli import run
from jobs.train import main as train_main
from model.data import open_stream
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("shm") / "store.zarr"
    make_store(path, scenes=2, frames=33, channel_chunk=16)
    return str(path)


def _set_bytes(stream) -> int:
    return 2 * sum(math.prod(shape) for shape in stream._batch_shapes(stream.batch_size).values())


def test_the_sets_shrink_to_fit_a_small_dev_shm(store, monkeypatch):
    stream = open_stream([store], batch_size=2, seed=0)
    workers, room = 2, _set_bytes(stream)
    monkeypatch.setattr(model.data.buffers, "shm_free", lambda: room * workers * 3 + room // 2)  # 3 sets each, not 4
    batches = stream.batches(workers=workers, prefetch_factor=2, reuse=True)
    assert len(next(batches)["clip"]) == 2
    assert len(stream._buffers.in_use) == workers * 3  # prefetch 1 + the one being built + the one in the step
    batches.close()

    monkeypatch.setattr(model.data.buffers, "shm_free", lambda: room * 100)  # room enough: as asked
    batches = stream.batches(workers=workers, prefetch_factor=2, reuse=True)
    next(batches)
    assert len(stream._buffers.in_use) == workers * 4
    batches.close()


def test_a_dev_shm_too_small_for_the_workers_is_one_line_naming_what_to_set(store, tmp_path, monkeypatch, capsys):
    stream = open_stream([store], batch_size=2, seed=0, window=5, latents=False)  # what Stage 1 reads
    monkeypatch.setattr(model.data.buffers, "shm_free", lambda: _set_bytes(stream) * 4)  # 2 workers need 6 sets
    stage1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 2}
    args = ["--stage", "1", "--store", store, "--run-dir", str(tmp_path), "--val-clips", "2", "--no-progress"]
    code = run(train_main, [*args, "--workers", "2", "--threads", "1", "--stage1", json.dumps(stage1)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: /dev/shm has") and "set --workers 1 or fewer" in err[0]
    assert "--batch-size" in err[0]
