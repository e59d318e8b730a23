"""Clip streams (model/data/): DDP and worker splits, equal batch counts, resume positions, channel prefixes, flip
variants, pred_features, refusal of incompatible stores, WebDataset exports."""

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from model.data import make_loader, open_stream, split_by_scene
from model.data.stream import worker_context
from model.runtime import to_device
from pipeline.store.format import DamagedStoreError, IncompatibleStoresError, StoreError
from pipeline.store.reader import Store
from pipeline.store.wds import export_webdataset
from tests.store_factory import ENCODERS, chunk_path, make_store


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # 7 clips (one scene, windows at 0, 4, ..., 24), each cached plain and flipped
    make_store(root / "a.zarr", scenes=1, frames=49, variants=("orig", "hflip"), channel_chunk=16)
    make_store(root / "b.zarr", scenes=1, frames=33, seed=1, channel_chunk=16)  # 3 clips, same basis
    make_store(root / "pca.zarr", scenes=1, frames=25, basis_seed=1)  # another PCA basis
    other = {**ENCODERS, "dinov2": {**ENCODERS["dinov2"], "sha256": "c" * 64}}
    make_store(root / "enc.zarr", scenes=1, frames=25, encoders=other)  # other DINOv2 weights
    return root


def _epoch(stream, epoch, workers=0):
    stream.set_position(epoch, 0)
    out = []
    for batch in make_loader(stream, workers=workers):
        if batch["epoch"] != epoch:
            break
        out.append(batch)
    return out


def _ddp_worker(rank, root, out_dir, remainder):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    stream = open_stream([f"{root}/a.zarr", f"{root}/b.zarr"], batch_size=2, seed=3, remainder=remainder)
    record = {"batches_per_epoch": stream.batches_per_epoch, "epochs": []}
    loader = iter(make_loader(stream, workers=2))
    for _ in range(3):  # three epochs, with a collective per batch as DDP does
        clips = []
        for _ in range(stream.batches_per_epoch):
            batch = next(loader)
            clips.append(batch["clip"].tolist())
            dist.all_reduce(torch.ones(1))
        record["epochs"].append(clips)
    dist.barrier()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_two_ddp_ranks_see_disjoint_clips_and_equal_batch_counts(stores, tmp_path, remainder):
    # 10 clips over 2 ranks x batches of 2: uneven (10 = 2 * 2 * 2 + 2)
    worker_context()  # the ranks start from the fork server with torch and the readers already imported
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(str(stores), tmp_path, remainder), nprocs=2, start_method="forkserver"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches_per_epoch"] == ranks[1]["batches_per_epoch"] == (2 if remainder == "drop" else 3)
    dropped = []
    for epoch in range(3):
        mine = [[c for batch in r["epochs"][epoch] for c in batch] for r in ranks]
        assert all(len(m) == 2 * ranks[0]["batches_per_epoch"] for m in mine)
        if remainder == "drop":
            assert not set(mine[0]) & set(mine[1]), "ranks must not share clips within an epoch"
            assert len(set(mine[0]) | set(mine[1])) == 8
            dropped.append(set(range(10)) - set(mine[0]) - set(mine[1]))
        else:  # every clip is seen; the 2 padding clips repeat the start of the epoch's order
            assert set(mine[0]) | set(mine[1]) == set(range(10))
            assert len(mine[0]) + len(mine[1]) == 12
    if remainder == "drop":
        assert len({frozenset(d) for d in dropped}) > 1, "the dropped remainder must change between epochs"


def test_order_is_the_same_with_any_number_of_workers_and_resumes_exactly(stores):
    stream = open_stream(str(stores / "a.zarr"), batch_size=2, seed=7)
    assert stream.batches_per_epoch == 3  # 7 clips: one dropped per epoch
    straight = [b for e in range(3) for b in _epoch(stream, e, workers=0)]
    with_workers = [b for e in range(3) for b in _epoch(stream, e, workers=2)]
    assert [b["clip"].tolist() for b in straight] == [b["clip"].tolist() for b in with_workers]
    for a, b in zip(straight, with_workers):
        torch.testing.assert_close(a["features"], b["features"], rtol=0, atol=0)
        assert a["variant"].tolist() == b["variant"].tolist()
    # resume in the middle of epoch 1: the next batches are the ones the straight run saw
    stream.load_state_dict({"epoch": 1, "batch": 2, "batches_per_epoch": 3})
    resumed = iter(make_loader(stream, workers=2))
    for expected in straight[5:9]:
        got = next(resumed)
        assert (got["epoch"], got["batch"]) == (expected["epoch"], expected["batch"])
        assert got["clip"].tolist() == expected["clip"].tolist()
        torch.testing.assert_close(got["latents"], expected["latents"], rtol=0, atol=0)
    assert stream.advance(1, 2) == (2, 0) and stream.advance(1, 0) == (1, 1)
    # each epoch is another permutation
    assert (
        straight[0]["clip"].tolist() + straight[1]["clip"].tolist()
        != straight[3]["clip"].tolist() + straight[4]["clip"].tolist()
    )


def test_batches_hold_the_stored_arrays_of_the_chosen_flip_variant_and_channel_prefix(stores):
    store = Store(str(stores / "a.zarr"))
    assert store.num_variants == 2
    stream = open_stream(str(stores / "a.zarr"), batch_size=7, channels=16, seed=0, remainder="pad")
    variants = set()
    for epoch in range(4):
        (batch,) = _epoch(stream, epoch)
        assert batch["features"].shape == (7, 7, 8, 14, 16) and batch["features"].dtype == torch.float16
        assert to_device(batch, torch.device("cpu"))["features"].dtype == torch.float32  # cast on the device
        assert batch["latents"].shape == (7, 16, 7, 12, 20)
        for j, (i, v) in enumerate(zip(batch["clip"].tolist(), batch["variant"].tolist())):
            variants.add(v)
            np.testing.assert_array_equal(batch["features"][j].numpy(), store.read_features(i, variant=v)[..., :16])
            np.testing.assert_array_equal(batch["latents"][j].numpy(), store.read_latents(i, variant=v))
            assert batch["clip_id"][j] == store.clip_meta(i, v)["clip_id"]
    assert variants == {0, 1}
    with pytest.raises(ValueError, match="holds 64"):
        open_stream(str(stores / "a.zarr"), batch_size=1, channels=65)


def test_incompatible_stores_are_refused_naming_the_field(stores):
    with pytest.raises(IncompatibleStoresError, match="pca.fingerprint"):
        open_stream([str(stores / "a.zarr"), str(stores / "pca.zarr")], batch_size=1)
    with pytest.raises(IncompatibleStoresError, match=r"encoders\.dinov2\.sha256"):
        open_stream([str(stores / "a.zarr"), str(stores / "enc.zarr")], batch_size=1)


def test_missing_rollouts_are_a_clear_error_when_required(stores):
    with pytest.raises(StoreError, match="pred_features.*rollout"):
        open_stream(str(stores / "a.zarr"), batch_size=1, with_pred=True)


def test_held_out_split_keeps_whole_scenes(tmp_path):
    make_store(tmp_path / "s.zarr", scenes=3, frames=33)  # 3 clips per scene
    store = Store(str(tmp_path / "s.zarr"))
    train, held = split_by_scene(store, 4)
    assert len(held) == 6 and len(train) == 3  # two whole scenes reach 4 clips
    scenes = [store.clip_meta(i)["scene"] for i in range(len(store))]
    assert not {scenes[i] for i in train} & {scenes[i] for i in held}
    assert len(split_by_scene(store, 100)[1]) == 0  # would leave nothing to train on


def test_webdataset_export_streams_equal_counts_per_rank_and_reseeds(stores, tmp_path):
    store = Store(str(stores / "a.zarr"))
    export_webdataset(store, str(tmp_path / "wds"), channels=32, shard_size_mb=0.05, progress=False)
    streams = [
        open_stream(str(tmp_path / "wds"), batch_size=2, channels=16, rank=r, world=2, seed=1, shuffle_buffer=4)
        for r in range(2)
    ]
    assert streams[0].kind == "webdataset" and streams[0].batches_per_epoch == 3  # 14 samples // (2 ranks x 2)
    for s in streams:
        batches = _epoch(s, 0)
        assert len(batches) == 3  # resampled: every rank gets exactly an epoch's batches
        assert batches[0]["features"].shape == (2, 7, 8, 14, 16)
        for b in batches:
            for j, cid in enumerate(b["clip_id"]):
                i = store.clip_ids.index(cid.removesuffix("-hflip"))
                v = 1 if cid.endswith("-hflip") else 0
                assert b["variant"][j] == v
                np.testing.assert_array_equal(b["features"][j].numpy(), store.read_features(i, 16, v))
    # a resume reseeds from the position: reproducible
    s = streams[0]
    s.set_position(4, 1)
    first = next(iter(s))
    s.set_position(4, 1)
    again = next(iter(s))
    assert (first["epoch"], first["batch"]) == (4, 1) and first["clip_id"] == again["clip_id"]
    # evaluation: every sample once over the ranks
    seen = []
    for r in range(2):
        ev = open_stream(str(tmp_path / "wds"), batch_size=3, rank=r, world=2, loop=False, remainder="keep")
        seen += [cid for b in ev for cid in b["clip_id"]]
    assert sorted(seen) == sorted(store.clip_meta(i, v)["clip_id"] for i in range(len(store)) for v in range(2))
    with pytest.raises(ValueError, match="holds 32"):
        open_stream(str(tmp_path / "wds"), batch_size=1, channels=64)


def _damage_clip(stores, tmp_path, bad_clip: int) -> str:
    """A copy of a.zarr whose clip `bad_clip` lost its latents' chunks (every variant's row) from disk."""
    damaged = tmp_path / "a.zarr"
    shutil.copytree(stores / "a.zarr", damaged)
    store = Store(str(damaged))
    for variant in range(store.num_variants):
        chunk_path(damaged, "clips/latents", store.row(bad_clip, variant)).unlink()
    return str(damaged)


def test_a_damaged_clip_stops_the_stream_or_is_skipped_and_counted(stores, tmp_path):
    damaged = _damage_clip(stores, tmp_path, bad_clip=3)
    with pytest.raises(DamagedStoreError, match=r"clips/latents\[\d+\] is damaged"):
        for _ in open_stream(damaged, batch_size=7, remainder="pad"):
            pass
    for workers in (0, 1):  # read here, and in a worker process
        stream = open_stream(damaged, batch_size=2, seed=7, on_bad_clip="skip")
        batches = stream.batches(workers=workers)
        seen = [next(batches) for _ in range(3 * stream.batches_per_epoch)]  # three epochs
        batches.close()
        assert all(len(b["clip"]) == 2 for b in seen), "a skipped clip's slot is filled: batches keep their size"
        assert 3 not in {c for b in seen for c in b["clip"].tolist()}
        # clip 3 is in 2 of every epoch's 3 batches of 2 (7 clips, one dropped) at least once over 3 epochs
        assert stream.skipped == sum(b["skipped"] for b in seen) >= 1
        assert stream.state_dict()["skipped"] == stream.skipped and stream.position == (3, 0)
    evaluation = open_stream(damaged, batch_size=3, shuffle=False, remainder="keep", loop=False, on_bad_clip="skip")
    clips = [c for b in evaluation for c in b["clip"].tolist()]
    assert clips == [0, 1, 2, 4, 5, 6] and evaluation.skipped == 1  # evaluation leaves it out


def test_a_deleted_chunk_file_reaches_the_stream_as_a_damaged_store_error(tmp_path):
    make_store(tmp_path / "s.zarr", scenes=1, frames=33)
    row = Store(str(tmp_path / "s.zarr")).row(1)
    chunk = chunk_path(tmp_path / "s.zarr", "clips/latents", row)
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(DamagedStoreError):
        for _ in open_stream(str(tmp_path / "s.zarr"), batch_size=3, shuffle=False, remainder="keep", loop=False):
            pass
    skipping = open_stream(
        str(tmp_path / "s.zarr"), batch_size=3, shuffle=False, remainder="keep", loop=False, on_bad_clip="skip"
    )
    assert [c for b in skipping for c in b["clip"].tolist()] == [0, 2] and skipping.skipped == 1


def test_stage1_reads_only_its_window_of_frames_and_no_latents(stores):
    store = Store(str(stores / "a.zarr"))
    stream = open_stream(str(stores / "a.zarr"), batch_size=2, channels=16, seed=5, window=5, latents=False)
    straight = _epoch(stream, 0, workers=0) + _epoch(stream, 1, workers=0)
    with_workers = _epoch(stream, 0, workers=2) + _epoch(stream, 1, workers=2)
    starts = set()
    for a, b in zip(straight, with_workers, strict=True):
        assert "latents" not in a and a["features"].shape == (2, 5, 8, 14, 16)
        assert a["window_start"].tolist() == b["window_start"].tolist()  # drawn by the plan, not the worker
        torch.testing.assert_close(a["features"], b["features"], rtol=0, atol=0)
        for j, (i, v, t) in enumerate(zip(a["clip"].tolist(), a["variant"].tolist(), a["window_start"].tolist())):
            starts.add(t)
            np.testing.assert_array_equal(a["features"][j].numpy(), store.read_features(i, 16, v)[t : t + 5])
    assert starts <= {0, 1, 2} and len(starts) > 1  # the three 5-frame windows of a 7-frame clip


def test_reused_batch_tensors_hold_the_same_batches_as_fresh_ones(stores):
    stream = open_stream(str(stores / "a.zarr"), batch_size=2, seed=7)
    fresh = [{k: v.clone() for k, v in b.items() if torch.is_tensor(v)} for b in itertools.islice(stream.batches(), 9)]
    for workers in (0, 2):
        stream.set_position(0, 0)
        reused = stream.batches(workers=workers, prefetch_factor=1, reuse=True)
        first = next(reused)
        for expected in fresh[1:]:
            got = next(reused)
            if workers == 0:
                assert got["features"].data_ptr() == first["features"].data_ptr()  # decoded into the same tensor
            assert "buffer_set" not in got
            for k, v in expected.items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=0)
        reused.close()


def test_a_damaged_webdataset_shard_stops_the_stream_or_its_rest_is_skipped(stores, tmp_path, monkeypatch):
    import pipeline.store.wds as wds

    store = Store(str(stores / "a.zarr"))
    export_webdataset(store, str(tmp_path / "wds"), channels=16, shard_size_mb=0.05, progress=False)
    real, bad = wds.iter_shard, wds.shard_urls(str(tmp_path / "wds"))[1]

    def iter_shard(url, storage_options=None, *args):
        if url == bad:  # what the reader raises for a truncated or corrupt member
            raise DamagedStoreError(url, "tar member", 0, "truncated")
        yield from real(url, storage_options, *args)

    monkeypatch.setattr(wds, "iter_shard", iter_shard)
    options = {"batch_size": 2, "loop": False, "remainder": "keep"}
    with pytest.raises(DamagedStoreError, match="truncated"):
        list(open_stream(str(tmp_path / "wds"), **options))
    skipping = open_stream(str(tmp_path / "wds"), on_bad_clip="skip", **options)
    seen = [cid for b in skipping for cid in b["clip_id"]]
    per_shard = [len(list(real(u))) for u in wds.shard_urls(str(tmp_path / "wds"))]
    assert skipping.skipped == 1 and len(seen) == sum(per_shard) - per_shard[1] and len(per_shard) > 2


@pytest.mark.parametrize("reads", [{}, {"window": 5, "latents": False}])
def test_channel_blocked_batches_hold_the_same_features_once_on_the_device(stores, reads):
    """channel_blocks (the training loop's stream): a's features sit in chunks of 16 channels, each read
    straight into its place of [B, F, nb, H, W, 16]; to_device lays them side by side. Same clips, same
    numbers as the row layout, with 0 and 2 workers, reused sets, resumed mid-epoch; a prefix of whole
    chunks stays blocked, any other is read in rows."""
    rows = open_stream(str(stores / "a.zarr"), batch_size=2, channels=48, seed=7, **reads)
    blocked = open_stream(str(stores / "a.zarr"), batch_size=2, channels=48, seed=7, channel_blocks=True, **reads)
    assert (rows.block, blocked.block) == (None, 16)
    expected = [to_device(b, torch.device("cpu")) for b in itertools.islice(rows.batches(), 8)]
    for workers in (0, 2):
        blocked.set_position(0, 0)
        batches = blocked.batches(workers=workers, prefetch_factor=1, reuse=True)
        for want in expected:
            got = next(batches)
            assert got["features"].shape == (2, 5 if reads else 7, 8, 14, 3, 16)
            got = to_device(got, torch.device("cpu"))
            assert got["features"].dtype == torch.float32 and got["features"].is_contiguous()
            assert got["clip"].tolist() == want["clip"].tolist()
            for k in ("features", "latents", "window_start"):
                if k in want:
                    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        batches.close()
    blocked.load_state_dict({"epoch": 1, "batch": 1, "batches_per_epoch": 3})
    resumed = next(iter(blocked))
    assert resumed["clip"].tolist() == expected[4]["clip"].tolist()  # 3 batches an epoch: (1, 1) is the 5th
    assert open_stream(str(stores / "a.zarr"), batch_size=2, channels=40, channel_blocks=True).block is None
    assert open_stream(str(stores / "b.zarr"), batch_size=2, channel_blocks=True).block == 16


def test_channel_blocks_fall_back_to_rows_where_a_store_is_not_read_directly(stores, tmp_path):
    make_store(tmp_path / "z.zarr", scenes=1, frames=33, seed=1, channel_chunk=16, compression="zstd:1")
    assert open_stream(str(tmp_path / "z.zarr"), batch_size=2, channel_blocks=True).block is None
    mixed = open_stream([str(stores / "b.zarr"), str(tmp_path / "z.zarr")], batch_size=2, channel_blocks=True)
    assert mixed.block is None  # one layout per batch: rows, since the compressed store cannot give blocks
    batch = next(iter(mixed))
    assert batch["features"].shape == (2, 7, 8, 14, 64)
