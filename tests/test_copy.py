"""`jobs.store copy`: between local folders, a real S3-protocol server, an hf:// stand-in and an http source;
channel prefixes that stay compatible with their original; lossy re-encoding; resume after a kill."""

from __future__ import annotations

import functools
import http.server
import json
import os
import threading

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from jobs.store import main as store_main
from pipeline.store.copy import copy_store
from pipeline.store.format import IncompatibleStoresError, StoreError
from pipeline.store.reader import Store, open_stores
from pipeline.store.writer import StoreWriter
from tests.store_factory import make_store


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "s.zarr"
    make_store(path, scenes=2, frames=33, channel_chunk=16, fail_clips=(1,))
    return str(path)


def _same_clips(a: Store, b: Store, channels: int):
    assert a.clip_ids == b.clip_ids
    for i in range(len(a)):
        np.testing.assert_array_equal(a.read_features(i, channels), b.read_features(i, channels))
        np.testing.assert_array_equal(a.read_latents(i), b.read_latents(i))


def test_a_lossless_copy_reads_equal_and_verifies(source, tmp_path):
    summary = copy_store(source, str(tmp_path / "c.zarr"), progress=False)
    src, dst = Store(source), Store(str(tmp_path / "c.zarr"))
    _same_clips(src, dst, src.num_channels)
    assert dst.failures() == src.failures() and len(dst) == len(src) == summary["clip_rows"]
    assert dst.pca_fingerprint == src.pca_fingerprint and "prefix_of" not in dst.manifest["pca"]
    assert dst.manifest["copied_from"]["store"] == "file://" + source
    assert dst.verify()["ok"]


def test_a_channel_prefix_copy_is_smaller_and_reads_with_its_original(source, tmp_path):
    out = str(tmp_path / "p.zarr")
    copy_store(source, out, channels=16, progress=False)
    src, dst = Store(source), Store(out)
    assert dst.num_channels == 16 and dst.basis.num_components == 16
    np.testing.assert_array_equal(dst.basis.components, src.basis.components[:16])
    assert dst.manifest["pca"]["prefix_of"] == {"fingerprint": src.pca_fingerprint, "num_components": 64}
    assert dst.pca_fingerprint != src.pca_fingerprint and dst.verify()["ok"]
    _same_clips(src, dst, 16)
    stores = open_stores([source, out])  # the compatibility check knows a prefix of the same basis
    assert [s.num_channels for s in stores] == [64, 16]
    with pytest.raises(StoreError, match="channels must be in 1..16"):
        stores[1].read_features(0, 32)
    # a prefix of a prefix still names the original basis
    copy_store(out, str(tmp_path / "pp.zarr"), channels=8, progress=False)
    pp = Store(str(tmp_path / "pp.zarr"))
    assert pp.manifest["pca"]["prefix_of"]["fingerprint"] == src.pca_fingerprint
    open_stores([out, str(tmp_path / "pp.zarr"), source])
    size = lambda p: sum(f.stat().st_size for f in (tmp_path / p).rglob("*") if f.is_file())  # noqa: E731
    assert size("pp.zarr") < size("p.zarr")


def test_a_store_of_another_basis_or_a_forged_prefix_is_refused(source, tmp_path):
    make_store(tmp_path / "other.zarr", scenes=1, frames=25, basis_seed=3)
    with pytest.raises(IncompatibleStoresError, match="pca.fingerprint"):
        open_stores([source, str(tmp_path / "other.zarr")])
    # a store that claims to be a prefix of the source's basis, but holds another basis
    copy_store(str(tmp_path / "other.zarr"), str(tmp_path / "forged.zarr"), channels=16, progress=False)
    w = StoreWriter(str(tmp_path / "forged.zarr"))
    pca = dict(w.manifest["pca"], prefix_of={"fingerprint": Store(source).pca_fingerprint, "num_components": 64})
    w.group.attrs["pca"] = pca
    with pytest.raises(IncompatibleStoresError, match="pca.prefix_of"):
        open_stores([source, str(tmp_path / "forged.zarr")])


def test_a_killed_copy_resumes_and_ends_identical(source, tmp_path, monkeypatch):
    whole = str(tmp_path / "whole.zarr")
    copy_store(source, whole, rows_per_unit=4, progress=False)
    out = str(tmp_path / "killed.zarr")
    calls = {"n": 0}
    real = StoreWriter.write_features

    def dying(self, row, f):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt  # killed mid-unit: units 0 and 1 are marked, unit 2 is half written
        return real(self, row, f)

    monkeypatch.setattr(StoreWriter, "write_features", dying)
    with pytest.raises(KeyboardInterrupt):
        copy_store(source, out, rows_per_unit=4, progress=False)
    monkeypatch.setattr(StoreWriter, "write_features", real)
    with pytest.raises(StoreError, match="never finished"):
        Store(out)
    with pytest.raises(StoreError, match="made otherwise"):  # other settings do not resume it
        copy_store(source, out, channels=8, rows_per_unit=4, progress=False)
    summary = copy_store(source, out, rows_per_unit=4, progress=False)
    assert summary["units_resumed"] == 2
    _same_clips(Store(whole), Store(out), 64)
    with pytest.raises(StoreError, match="already a finished store"):
        copy_store(source, out, progress=False)


def _with_rollouts(path, predicted: int, finish: bool = True) -> str:
    """A store whose clips/pred_features predict the first `predicted` channels (the rest zero), as the rollout
    job writes them; its checkpoint fingerprint."""
    make_store(path, scenes=2, frames=33, variants=("orig", "hflip"), channel_chunk=16)
    writer, store, fingerprint = StoreWriter(str(path)), Store(str(path)), "ab" * 32
    arr = writer.create_pred_features(fingerprint)
    arr.attrs["channels"] = predicted
    rng = np.random.default_rng(0)
    for i in range(len(store)):
        for v in range(store.num_variants):
            p = np.zeros(arr.shape[1:], np.float16)
            p[..., :predicted] = rng.standard_normal((*p.shape[:-1], predicted))
            writer.write_pred_features(store.row(i, v), p)
    if finish:
        writer.finish_pred_features()
    return fingerprint


def test_rollouts_travel_with_a_copy_cut_to_its_channels_lossless_and_verified(tmp_path, monkeypatch):
    src = str(tmp_path / "r.zarr")
    fingerprint = _with_rollouts(tmp_path / "r.zarr", predicted=32)
    a = Store(src)
    rows = len(a) * a.num_variants
    for channels, held in ((16, 16), (None, 32)):  # a 16-channel prefix; all 64, of which 32 predicted
        out = str(tmp_path / f"c{channels}.zarr")
        summary = copy_store(src, out, channels=channels, compression="zstd+trim7", rows_per_unit=4, progress=False)
        b = Store(out)
        assert summary["pred_features"] == fingerprint and b.has_pred_features
        assert b.pred_features_fingerprint == fingerprint and b.group["clips/pred_features"].attrs["channels"] == held
        for i in range(len(a)):  # equal: rollouts stay lossless under a lossy spec
            for v in range(a.num_variants):
                np.testing.assert_array_equal(
                    b.read_pred_features(i, None, v), a.read_pred_features(i, b.num_channels, v)
                )
        report = b.verify()
        assert report["ok"] and report["checked"]["clips/pred_features"] == rows and report["rows_without_digest"] == 0
    # a copy killed among its rollout chunks resumes them
    out, calls, real = str(tmp_path / "killed.zarr"), {"n": 0}, StoreWriter.write_pred_features

    def dying(self, row, p):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # chunk 0 (4 rows) is marked, chunk 1 half written
        return real(self, row, p)

    monkeypatch.setattr(StoreWriter, "write_pred_features", dying)
    with pytest.raises(KeyboardInterrupt):
        copy_store(src, out, channels=16, rows_per_unit=4, progress=False)
    monkeypatch.setattr(StoreWriter, "write_pred_features", real)
    summary = copy_store(src, out, channels=16, rows_per_unit=4, progress=False)
    chunks = -(-rows // 4)
    assert summary["units_resumed"] == summary["units"] - chunks + 1  # every other unit, and rollout chunk 0
    b = Store(out)
    assert b.verify()["ok"]
    for i in range(len(a)):
        for v in range(a.num_variants):
            np.testing.assert_array_equal(b.read_pred_features(i, None, v), a.read_pred_features(i, 16, v))
    # unfinished rollouts stay behind
    _with_rollouts(tmp_path / "u.zarr", predicted=8, finish=False)
    copy_store(str(tmp_path / "u.zarr"), str(tmp_path / "uc.zarr"), progress=False)
    assert "pred_features" not in Store(str(tmp_path / "uc.zarr")).group["clips"]


@pytest.mark.parametrize("spec, tol", [("zstd+trim7", 2**-7), ("blosc-zstd+int8", None)])
def test_lossy_copies_are_recorded_and_close(source, tmp_path, spec, tol):
    out = str(tmp_path / "l.zarr")
    copy_store(source, out, compression=spec, progress=False)
    src, dst = Store(source), Store(out)
    assert dst.manifest["compression"] == spec and dst.manifest["lossy"]["kind"] == spec.split("+")[1][:4]
    a, b = src.read_features(0).astype(np.float32), dst.read_features(0).astype(np.float32)
    assert dst.read_features(0).dtype == np.float16 and not np.array_equal(a, b)
    if tol:  # a relative bound per value
        assert np.all(np.abs(a - b) <= tol * np.abs(a) + 1e-7)
    else:  # half a quantization step per channel and frame
        scale = np.abs(a).max(axis=(1, 2), keepdims=True) / 127
        assert np.all(np.abs(a - b) <= scale * 0.5 + 1e-3 * scale + 2e-3 * np.abs(a))
    assert dst.verify()["ok"]


def test_the_cli_copies_and_refuses_an_unknown_spec_in_one_line(source, tmp_path, capsys):
    assert store_main(["copy", source, str(tmp_path / "cli.zarr"), "--channels", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["channels"] == 32 and Store(str(tmp_path / "cli.zarr")).num_channels == 32
    assert "--channels 32" in Store(str(tmp_path / "cli.zarr")).manifest["copied_from"]["command"]
    with pytest.raises(StoreError, match="unknown compression"):
        store_main(["copy", source, str(tmp_path / "x.zarr"), "--compression", "gzip"])


def test_a_copy_onto_its_own_source_is_refused_before_anything_is_removed(source, tmp_path):
    """Self-copy with --overwrite once deleted the source: the same folder, a symlink alias of it and its
    file:// URL are each refused, and the store still verifies."""
    before = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs)
    alias = tmp_path / "alias.zarr"
    alias.symlink_to(source)
    for dst in (source, source + "/", str(alias), "file://" + source):
        with pytest.raises(StoreError, match="is the source store itself"):
            store_main(["copy", source, dst, "--overwrite"])
    with pytest.raises(StoreError, match="is the source store itself"):
        store_main(["copy", str(alias), source, "--overwrite", "--channels", "16"])
    after = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, fs in os.walk(source) for f in fs)
    assert after == before and Store(source).verify()["ok"]


# ---- remote locations -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3-protocol server (tests/conftest.py) with this module's bucket."""
    s3_server.create_bucket("share")
    return {"bucket": "share", "options": s3_server.storage_options, "endpoint": s3_server.endpoint}


@pytest.mark.slow  # a real S3 server round trip
def test_copy_to_s3_and_back_and_between_buckets(source, tmp_path, s3):
    url = "s3://share/team-a/p.zarr"
    copy_store(source, url, channels=16, dst_options=s3["options"], progress=False)
    remote = Store(url, s3["options"])
    assert remote.verify()["ok"] and remote.num_channels == 16
    fs = fsspec.filesystem("s3", **s3["options"])
    assert fs.exists("share/team-a/p.zarr/README.md")  # the card, written at finalize
    copy_store(url, "s3://share/team-b/p.zarr", src_options=s3["options"], dst_options=s3["options"], progress=False)
    copy_store("s3://share/team-b/p.zarr", str(tmp_path / "back.zarr"), src_options=s3["options"], progress=False)
    _same_clips(Store(source), Store(str(tmp_path / "back.zarr")), 16)
    open_stores([source, str(tmp_path / "back.zarr")])


class _HubStandIn(LocalFileSystem):
    """hf://datasets/ORG/NAME/... as a local folder: huggingface_hub's HfFileSystem cannot reach the hub here;
    the copy goes through fsspec exactly as it would for it."""

    protocol = ("hf",)
    root = ""

    def __init__(self, **kwargs):
        super().__init__(auto_mkdir=True, **kwargs)  # a hub has no folders to make; a local folder does

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("hf://"):
            path = path[len("hf://") :]
        if path.startswith(cls.root):
            return path.rstrip("/")
        return f"{cls.root}/{path.lstrip('/')}".rstrip("/")

    def unstrip_protocol(self, name):
        return "hf://" + name[len(self.root) + 1 :] if name.startswith(self.root) else name


def test_copy_to_and_from_an_hf_datasets_location(source, tmp_path):
    _HubStandIn.root = str(tmp_path / "hub")
    (tmp_path / "hub").mkdir()
    fsspec.register_implementation("hf", _HubStandIn, clobber=True)
    try:
        url = "hf://datasets/team/store/p.zarr"
        copy_store(source, url, channels=16, progress=False)
        assert (tmp_path / "hub" / "datasets" / "team" / "store" / "p.zarr" / "zarr.json").exists()
        copy_store(url, str(tmp_path / "from-hub.zarr"), progress=False)
        _same_clips(Store(source), Store(str(tmp_path / "from-hub.zarr")), 16)
    finally:
        from huggingface_hub import HfFileSystem

        fsspec.register_implementation("hf", HfFileSystem, clobber=True)


def test_copy_from_an_http_source(source, tmp_path):
    handler = functools.partial(_QuietHandler, directory=str(source).rsplit("/", 1)[0])
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s.zarr"
        copy_store(url, str(tmp_path / "h.zarr"), channels=32, progress=False)
        dst = Store(str(tmp_path / "h.zarr"))
        assert dst.manifest["copied_from"]["store"] == url
        _same_clips(Store(source), dst, 32)
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server with byte ranges (zarr reads a shard's index and chunks by range), as object
    stores and CDNs serve them. Without ranges the reader sees the wrong bytes and refuses them (crc32c)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not spec or not spec.startswith("bytes=") or not os.path.isfile(path):
            return super().do_GET()
        data = open(path, "rb").read()
        lo, _, hi = spec[len("bytes=") :].partition("-")
        start, end = (len(data) - int(hi), len(data) - 1) if lo == "" else (int(lo), int(hi) if hi else len(data) - 1)
        end = min(end, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self.wfile.write(data[start : end + 1])


def _store_job(*args, code: str | None = None, **kw):
    """`python -m jobs.store ARGS` (run as __main__), after `code` (a test's slowdown) where given."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    main = f"import runpy, sys\n{code or ''}\nsys.argv = ['jobs.store', *{list(map(str, args))!r}]; "
    main += "runpy.run_module('jobs.store', run_name='__main__')"
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", main], cwd=root, env=env, text=True, **kw)


def test_a_store_with_a_deleted_pca_chunk_is_one_line_pointing_at_verify(tmp_path):
    make_store(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "pca" / "components" / "c" / "0" / "0").unlink()
    for args in (
        ["copy", tmp_path / "s.zarr", tmp_path / "copy.zarr"],
        ["export-wds", tmp_path / "s.zarr", tmp_path / "w"],
    ):
        out, err = _store_job(*args, stdout=-1, stderr=-1).communicate(timeout=300)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 's.zarr'}: pca is damaged"), err
        assert f"run `python -m jobs.store verify {tmp_path / 's.zarr'}`" in lines[0]
        assert not (tmp_path / "copy.zarr").exists() and not (tmp_path / "w").exists()  # nothing written


def test_a_sigterm_during_a_copy_is_one_line_saying_how_to_resume(source, tmp_path):
    import signal
    import time

    slow = (
        "import time, pipeline.store.copy as c; f = c._copy_row; c._copy_row = lambda *a: (time.sleep(0.2), f(*a))[1]"
    )
    dst = tmp_path / "dst.zarr"
    job = _store_job("copy", source, dst, "--rows-per-unit", "1", code=slow, stdout=-1, stderr=-1)
    deadline = time.time() + 120
    while not list((dst / "progress").glob("*.json")) and time.time() < deadline:  # copying now
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143, err
    assert err.strip().splitlines() == ["terminated: rerun the same command to resume"], err
    done = _store_job("copy", source, dst, stdout=-1, stderr=-1)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0 and json.loads(out.splitlines()[-1])["units_resumed"] > 0, err
