"""Mixing stores by weight (`--store a.zarr:0.7,b.zarr:0.3`) and resuming at another world size: the
epoch's global order is a function of the seed and the epoch only, split over ranks afterwards, and the
saved position is global (model/data/mixing.py, order.py)."""

import collections
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

from jobs.train import main as train_main
from model.checkpoint import latest_checkpoint, load_state, read_meta
from model.data import apportion, open_stream, parse_store_list
from model.data.stream import worker_context
from pipeline.errors import ConfigError
from pipeline.store.format import StoreError
from pipeline.store.reader import Store
from pipeline.store.wds import export_webdataset
from tests.store_factory import CountingSource, make_store


class OtherScenes(CountingSource):
    def scenes(self):
        return [f"other-{i:02d}" for i in range(self._n)]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    make_store(root / "a.zarr", scenes=1, frames=49, variants=("orig", "hflip"), channel_chunk=16)  # 7 clips
    # 3 clips, same basis, scenes named apart (a WebDataset sample tells its store only by its clip id)
    make_store(root / "b.zarr", frames=33, seed=1, channel_chunk=16, source=OtherScenes(1, 33))
    return root


def _paths(stores):
    return [str(stores / "a.zarr"), str(stores / "b.zarr")]


def test_a_store_list_gives_locations_and_optional_weights():
    assert parse_store_list("a.zarr, b.zarr") == (["a.zarr", "b.zarr"], None)
    assert parse_store_list("a.zarr:0.5,s3://bucket/b.zarr:0.3,http://127.0.0.1:9000/c.zarr:0.2") == (
        ["a.zarr", "s3://bucket/b.zarr", "http://127.0.0.1:9000/c.zarr"],
        [0.5, 0.3, 0.2],
    )
    # a URL's scheme or host:port is not a weight
    assert parse_store_list("s3://bucket/b.zarr,http://127.0.0.1:9000") == (
        ["s3://bucket/b.zarr", "http://127.0.0.1:9000"],
        None,
    )
    with pytest.raises(StoreError, match="every store a mixing weight or none"):
        parse_store_list("a.zarr:0.5,b.zarr")
    for bad in ("a.zarr:0", "a.zarr:-1", "a.zarr:nan"):
        with pytest.raises(StoreError, match="positive number"):
            parse_store_list(bad)
    assert apportion([0.5, 0.3, 0.2], 11).tolist() == [6, 3, 2]  # largest remainders, sums to n


def test_weighted_epochs_follow_the_weights_deterministically_with_equal_rank_shares(stores):
    stream = open_stream(_paths(stores), batch_size=2, seed=3, weights=[0.2, 0.8])
    assert stream.num_clips == 10 and stream.batches_per_epoch == 5  # an epoch: as many clips as both hold
    orders = [stream.epoch_order(e)[0] for e in range(4)]
    for order in orders:  # a.zarr is clips 0-6, b.zarr 7-9: 2 and 8 of each epoch's 10
        assert (order < 7).sum() == 2 and (order >= 7).sum() == 8
    # a down-weighted store shows every clip before any repeats: epochs 0-3 draw a's first permutation
    a_draws = np.concatenate([o[o < 7] for o in orders])
    assert sorted(a_draws[:7].tolist()) == list(range(7))
    # an up-weighted one repeats in whole permutations: epochs 0-2 are 24 draws = 8 of b's 3 clips each
    b_draws = collections.Counter(np.concatenate([o[o >= 7] for o in orders[:3]]).tolist())
    assert b_draws == {7: 8, 8: 8, 9: 8}
    # a function of the seed and the epoch: another stream draws the same, another seed not
    again = open_stream(_paths(stores), batch_size=5, seed=3, weights=[0.2, 0.8])
    assert all(np.array_equal(again.epoch_order(e)[0], orders[e]) for e in range(4))
    other = open_stream(_paths(stores), batch_size=2, seed=4, weights=[0.2, 0.8])
    assert not all(np.array_equal(other.epoch_order(e)[0], orders[e]) for e in range(4))
    assert not np.array_equal(orders[0], orders[1])
    # two ranks: equal batch counts, and together exactly the epoch's order
    ranks = [open_stream(_paths(stores), batch_size=2, seed=3, weights=[0.2, 0.8], rank=r, world=2) for r in (0, 1)]
    plans = [r.epoch_plan(1)[0] for r in ranks]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 2 and len(plans[0]) == len(plans[1]) == 4
    assert sorted(np.concatenate(plans).tolist()) == sorted(orders[1][:8].tolist())


def test_a_weighted_stream_resumes_exactly_with_workers(stores):
    stream = open_stream(_paths(stores), batch_size=3, seed=5, weights=[0.5, 0.5])
    straight, states = [], []
    for batch in stream.batches(workers=0):
        straight.append(batch)
        states.append(stream.state_dict())
        if len(straight) == 7:
            break
    state = states[3]  # after batch 1 of epoch 1 (3 batches an epoch)
    assert (state["epoch"], state["batch"], state["clips_done"]) == (1, 1, 3)
    resumed = open_stream(_paths(stores), batch_size=3, seed=5, weights=[0.5, 0.5])
    resumed.load_state_dict(state)
    for expected, got in zip(straight[4:], resumed.batches(workers=2)):
        assert (got["epoch"], got["batch"]) == (expected["epoch"], expected["batch"])
        assert got["clip"].tolist() == expected["clip"].tolist()
        assert got["variant"].tolist() == expected["variant"].tolist()
        torch.testing.assert_close(got["features"], expected["features"], rtol=0, atol=0)


def test_a_resume_under_another_batch_layout_continues_the_epochs_order(stores):
    # 10 clips: a run with batches of 2 stops after 3 of them (6 clips done); one with batches of 4 goes on
    # with the epoch's last 4 clips (one batch), then epoch 1: every clip of epoch 0 once
    before = open_stream(_paths(stores), batch_size=2, seed=1)
    order = before.epoch_order(0)[0]
    seen = [c for _, b in zip(range(3), before.batches()) for c in b["clip"].tolist()]
    after = open_stream(_paths(stores), batch_size=4, seed=1)
    after.load_state_dict(before.state_dict())
    assert after.clips_done() == 6 and after.epoch_batches(0) == 1 and after.batches_per_epoch == 2
    batches = after.batches(workers=2)  # the resumed position travels to the DataLoader workers
    rest = next(batches)
    assert (rest["epoch"], rest["batch"]) == (0, 0)
    assert seen + rest["clip"].tolist() == order.tolist()
    assert after.state_dict()["epoch"] == 1 and after.state_dict()["clips_done"] == 0
    assert next(batches)["clip"].tolist() == after.epoch_order(1)[0][:4].tolist()


def test_weighted_webdataset_sources_draw_shards_by_weight(stores, tmp_path):
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    for name, out in zip(("a.zarr", "b.zarr"), sources):
        export_webdataset(Store(str(stores / name)), out, shard_size_mb=0.001, progress=False)

    def share_of_b(weights):
        stream = open_stream(sources, batch_size=4, seed=0, shuffle_buffer=2, weights=weights)
        ids = [i for _, b in zip(range(50), stream.batches()) for i in b["clip_id"]]
        return sum(i.startswith("other") for i in ids) / len(ids)

    # 14 samples in a (7 clips, 2 variants), 3 in b: b's share is about 3/17 plain, 9/10 weighted 1:9
    assert share_of_b(None) < 0.35
    assert share_of_b([1.0, 9.0]) > 0.75


def test_training_mixes_weighted_stores_and_records_the_weights(stores, tmp_path):
    a, b = _paths(stores)
    stage1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 2, "steps": 2}
    stage1 |= {"ckpt_every": 2, "log_every": 1, "eval_every": 0}
    args = ["--stage", "1", "--run-dir", str(tmp_path), "--val-clips", "1", "--no-progress", "--workers", "0"]
    args += ["--threads", "1", "--stage1", json.dumps(stage1)]
    with pytest.raises(ConfigError, match="--val-store takes no mixing weights"):
        train_main([*args, "--store", f"{a}:1,{b}:3", "--val-store", f"{b}:1"])
    train_main([*args, "--store", f"{a}:1,{b}:3"])
    meta = read_meta(latest_checkpoint(tmp_path / "stage1"))
    assert meta["data"]["weights"] == [1.0, 3.0] and meta["config"]["store_weights"] == [1.0, 3.0]
    assert meta["config"]["store"] == [a, b]


def test_the_paper_multi_preset_is_the_paper_run_for_120k_iterations_over_three_stores_weighted_alike():
    from dataclasses import asdict

    from jobs.train import parse, stage_config

    multi, paper = parse(["--preset", "paper_multi"]), parse(["--preset", "paper"])
    for which in ("stage1", "stage2"):
        assert asdict(stage_config(multi, which)) == dict(asdict(stage_config(paper, which)), steps=120_000)
    sources, weights = parse_store_list(multi.store)
    assert [s.split("/")[1] for s in sources] == ["cityscapes", "nuscenes", "covla"] and weights == [1.0] * 3
    stage2 = stage_config(multi, "stage2")  # the paper's: batch 8, lr 0.6 x 2^-10.5, linear warmup and decay
    assert (stage2.batch_size, stage2.lr, stage2.schedule) == (8, 0.00041432, "linear")


# ---- resume at another world size: real gloo processes ----------------------------------------------


def _rank_worker(rank, world, paths, out_dir, phase, per_rank, stop_after, weights):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous-{phase}", rank=rank, world_size=world)
    stream = open_stream(paths, batch_size=per_rank, seed=9, weights=weights)
    if phase == "after":
        stream.load_state_dict(json.loads((out_dir / "state.json").read_text()))
    seen = []
    for batch in stream.batches():
        if batch["epoch"] != 0:
            break
        seen += list(zip(batch["clip"].tolist(), batch["variant"].tolist()))
        dist.all_reduce(torch.ones(1))  # a collective per batch, as DDP runs one: unequal counts would hang
        if phase == "before" and stream.position == (0, stop_after):
            break
    if phase == "before" and rank == 0:  # as the training loop saves: rank 0's state
        (out_dir / "state.json").write_text(json.dumps(stream.state_dict()))
    (out_dir / f"{phase}-rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


def _ranks(world, *args):
    worker_context()  # the ranks start from the fork server with torch and the readers already imported
    torch.multiprocessing.start_processes(_rank_worker, args=(world, *args), nprocs=world, start_method="forkserver")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("worlds", "per_rank", "stop_after", "weights"),
    [
        # clips per global batch 2 -> 3 (the trainer keeps them the same: the torchrun test below), stopped
        # after 4 clips, off the new layout's batch boundary
        ((2, 1), (1, 3), 2, None),
        ((1, 2), (2, 2), 1, [0.3, 0.7]),  # global batch 2 -> 4, stopped after 2 clips; weighted
    ],
)
def test_a_run_stopped_at_w_ranks_resumes_at_another_w_seeing_the_epoch_once(
    stores, tmp_path, worlds, per_rank, stop_after, weights
):
    paths = _paths(stores)
    for phase, world, b in zip(("before", "after"), worlds, per_rank):
        _ranks(world, paths, tmp_path, phase, b, stop_after if phase == "before" else 0, weights)
    seen = {
        phase: [json.loads((tmp_path / f"{phase}-rank{r}.json").read_text()) for r in range(world)]
        for phase, world in zip(("before", "after"), worlds)
    }
    assert len({len(s) for s in seen["after"]}) == 1, "every rank gets the same number of batches"
    got = sorted(tuple(c) for phase in seen.values() for rank in phase for c in rank)
    # the uninterrupted epoch, read by one process
    whole = open_stream(paths, batch_size=2, seed=9, weights=weights, rank=0, world=1)
    order, variants, _ = whole.epoch_order(0)
    assert got == sorted(zip(order.tolist(), variants.tolist()))
    if weights is None:
        assert sorted(c for c, _ in got) == list(range(10))  # every clip of the epoch exactly once


@pytest.mark.slow
def test_training_stopped_under_torchrun_at_2_ranks_resumes_on_1(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    store = tmp_path / "store.zarr"
    make_store(store, scenes=3, frames=33, channel_chunk=16)  # 9 clips, 3 held out: 6 train
    stage1 = {"model": {"size": "tiny", "dim": 48, "num_heads": 4}, "batch_size": 4, "grad_accum": 2}
    stage1 |= {"steps": 2, "ckpt_every": 2, "log_every": 1, "eval_every": 0}
    args = ["--stage", "1", "--store", str(store), "--run-dir", str(tmp_path / "run"), "--val-clips", "3"]
    args += ["--no-progress", "--workers", "0", "--threads", "1", "--stage1", json.dumps(stage1)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jobs.train"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    out = subprocess.run(cmd + args, cwd=root, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run" / "stage1"
    # 2 steps x 2 micro-batches of 2 clips (1 per rank) = 8 clips: epoch 0 (6 clips), then 2 of epoch 1
    state = load_state(latest_checkpoint(run))["data"]
    assert (state["world"], state["epoch"], state["clips_done"]) == (2, 1, 2)
    train_main(args[:-1] + [json.dumps({**stage1, "steps": 4}), "--resume"])  # one process, 2 clips a micro-batch
    ckpt = latest_checkpoint(run)
    state = load_state(ckpt)["data"]
    assert (state["world"], state["batch_size"], state["epoch"], state["clips_done"]) == (1, 2, 2, 4)
    assert read_meta(ckpt)["data"]["world"] == 1
