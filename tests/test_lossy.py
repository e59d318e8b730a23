"""Lossy compression specs (never the default): trimmed float16 mantissas and per-channel int8 with scales."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.store.format import DEFAULT_COMPRESSION
from pipeline.store.lossy import dequantize_int8, parse_compression, quantize_int8, trim_mantissa
from pipeline.store.reader import Store
from tests.store_factory import make_store


def test_specs_parse_and_unknown_ones_are_refused():
    assert parse_compression("blosc-zstd").lossy is None
    assert parse_compression("zstd+trim7").mantissa_bits == 7 and parse_compression("none+int8").dtype == "int8"
    for bad in ("gzip", "zstd+trim0", "zstd+trim11", "zstd+int4", "zstd+", "none:3", "zstd:0", "blosc-zstd:10"):
        with pytest.raises(ValueError, match="compression|lossy"):
            parse_compression(bad)


@pytest.mark.parametrize("spec", ["none", "blosc-lz4", "blosc-zstd:1", "blosc-zstd:3", "blosc-zstd", "zstd"])
def test_every_codec_of_the_bench_table_writes_a_store_that_reads_back_exactly(tmp_path, spec):
    """`--compression` keeps every choice of `make bench`'s codec table; a level is part of the spec."""
    c = parse_compression(spec)
    assert parse_compression(c.spec) == c and (c.level is None) == (spec == "none")
    assert parse_compression("blosc-zstd:5") == parse_compression("blosc-zstd")  # 5 is Blosc's default level
    _, index, written = make_store(tmp_path / "s.zarr", compression=spec)
    store = Store(str(tmp_path / "s.zarr"))
    assert store.manifest["compression"] == spec
    codec = store.group["frames/features"].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert [x["name"] for x in codec] == ["bytes"] + ([] if spec == "none" else [spec[:5].rstrip("-")]) + ["crc32c"]
    for i, clip in enumerate(index.clips):
        np.testing.assert_array_equal(store.read_latents(i), written[("latents", i)])
        np.testing.assert_array_equal(store.read_features(i)[2], written[("features", clip.feature_rows[2])])


def test_trimming_rounds_to_the_nearest_kept_value_and_never_to_inf():
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float16) * 100
    for k in (3, 7, 10):
        t = trim_mantissa(x, k)
        low = t.view(np.uint16) & ((1 << (10 - k)) - 1)
        assert not low.any()  # the dropped bits are zero: that is what compresses
        rel = np.abs(t.astype(np.float32) - x) / np.maximum(np.abs(x.astype(np.float32)), 1e-3)
        assert rel.max() <= 2.0 ** -(k + 1) * 1.001  # half a step of the kept mantissa
    assert np.isfinite(trim_mantissa(np.array([65504, -65504], np.float16), 2)).all()
    np.testing.assert_array_equal(trim_mantissa(x, 10), x)


def test_int8_keeps_one_scale_per_channel():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 14, 64)) * np.linspace(0.01, 50, 64)).astype(np.float16)
    q, s = quantize_int8(x, -1)
    assert q.dtype == np.int8 and s.shape == (64,)
    back = dequantize_int8(q, s).astype(np.float32)
    assert np.all(np.abs(back - x) <= s * 0.5 + np.abs(x) * 2e-3 + 1e-6)  # small channels keep their precision


@pytest.mark.parametrize("spec", ["blosc-zstd+trim6", "zstd+int8", "none+trim7"])
def test_the_writer_applies_the_spec_the_cache_job_passes_and_the_reader_undoes_int8(tmp_path, spec):
    _, index, written = make_store(tmp_path / "s.zarr", compression=spec)
    store = Store(str(tmp_path / "s.zarr"))
    assert store.manifest["lossy"]["kind"] in spec and store.manifest["compression"] == spec
    rows = store._feature_rows[store.row(0)]
    want = np.stack([written[("features", int(r))] for r in rows]).astype(np.float32)
    got = store.read_features(0)
    assert got.dtype == np.float16 and got.shape == want.shape
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 0 < rel < (2.0**-6 if "trim" in spec else 0.02)
    z = store.read_latents(0).astype(np.float32)
    assert 0 < np.linalg.norm(z - written[("latents", store.row(0))]) / np.linalg.norm(z) < 0.02
    assert store.verify()["ok"]
    lossless = make_store(tmp_path / "l.zarr")[0].manifest
    assert "lossy" not in lossless and lossless["compression"] == DEFAULT_COMPRESSION  # never the default


def test_verify_reads_the_scales_of_an_int8_store(tmp_path):
    make_store(tmp_path / "s.zarr", compression="zstd+int8")
    chunk = tmp_path / "s.zarr" / "frames" / "feature_scales" / "c" / "3" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(data)
    report = Store(str(tmp_path / "s.zarr")).verify()
    assert [(b["array"], b["row"]) for b in report["bad_rows"]] == [("frames/features", 3)]
    assert "feature_scales" in report["bad_rows"][0]["reason"] or "checksum" in report["bad_rows"][0]["reason"]
