"""Every bad value ends in one line naming the option, exit status 1, before Ray starts or anything is
written (issue 31 item 6; issue 30 item 7: too few clips for a batch). Each case runs the job's `main`
in-process through jobs.cli.run, as `python -m jobs.<job>` does."""

from __future__ import annotations

import json
import re

import pytest

from jobs import cache, train
from jobs.cli import run
from tests.store_factory import make_store

SYNTH = '{"num_scenes": 2, "frames_per_scene": 33, "height": 32, "width": 48}'

CACHE_CASES = [  # (extra arguments, what the one line must name)
    (["--unit-clips", "0"], r"unit[_-]clips"),
    (["--stride", "0"], r"stride"),
    (["--pca-frames", "0"], r"pca[_-]frames"),
    (["--batch-frames", "0"], r"batch[_-]frames"),
    (["--batch-clips", "-1"], r"batch[_-]clips"),
    (["--channel-chunk", "0"], r"channel[_-]chunk"),
    (["--compression", "zstd:99"], r"zstd"),
    (["--compression", "lz5"], r"compression"),
    (["--max-clips", "-1"], r"max[_-]clips"),
    (["--max-clips", "0"], r"max[_-]clips"),
    (["--max-failures", "-2"], r"max[_-]failures"),
    (["--source-options", '{"num_scenes": -1}'], r"num_scenes"),
    (["--source-options", '{"num_scenes": "ten"}'], r"num_scenes"),
    (["--source-options", '{"bogus": 1}'], r"bogus"),
    (["--source-options", "[1, 2]"], r"source_options"),
    (["--source-options", '{"dynamics": "smooth"}'], r"dynamics"),
    (["--source-options", '{"entry_rate": 0.2}'], r"entry_rate"),
    (["--source-options", '{"dynamics": "forecastable", "entry_rate": -1}'], r"entry_rate"),
    (["--dataset", "videos", "--data-root", ".", "--source-options", '{"resample_fps": "x"}'], r"resample_fps"),
    (["--dataset", "videos", "--data-root", ".", "--source-options", '{"crop_aspect": -1}'], r"crop_aspect"),
]


def one_line_error(capsys, rc: int, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize("extra, names", CACHE_CASES, ids=[" ".join(c[0]) for c in CACHE_CASES])
def test_cache_bad_values(tmp_path, capsys, extra, names):
    out = tmp_path / "store.zarr"
    argv = ["--dataset", "synthetic", "--source-options", SYNTH, "--out", str(out), "--no-progress", *extra]
    one_line_error(capsys, run(cache.main, argv), names)
    assert not out.exists()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad_values") / "store.zarr"
    make_store(path, scenes=1, frames=33)  # 3 clips (stride 4)
    return str(path)


TRAIN_CASES = [
    (["--stage1", '{"steps": "ten"}'], r"steps"),
    (["--stage1", '{"steps": 10.5}'], r"steps"),
    (["--stage1", '{"lr": "fast"}'], r"lr"),
    (["--stage1", '{"bogus": 1}'], r"bogus"),
    (["--stage1", "[1]"], r"stage1"),
    (["--steps", "0"], r"steps"),
    (["--steps", "-5"], r"steps"),
    (["--batch-size", "-8"], r"batch_size"),
    (["--batch-size", "0"], r"batch_size"),
    (["--batch-size", "4096"], r"--batch-size"),  # the store's 3 clips cannot fill it
    (["--batch-size", "8"], r"3 clips cannot fill one batch of 8"),  # issue 30 item 7
    (["--channels", "0"], r"channels"),
    (["--channels", "-3"], r"channels"),
    (["--channels", "100000"], r"--channels"),  # more than the store holds
    (["--lr", "nan"], r"lr"),
    (["--lr", "-1"], r"lr"),
    (["--stage1.lr", "inf"], r"lr"),
    (["--workers", "-2"], r"workers"),
    (["--prefetch-factor", "0"], r"prefetch_factor"),
    (["--stage1.model.num-layers", "-1"], r"num_layers"),
    (["--stage1.model.num-heads", "0"], r"num_heads"),
    (["--stage2.model.num-layers", "0"], r"num_layers"),
    (["--stage2.pred-p", "1.5"], r"pred_p"),
    (["--stage1.betas", "[0.9]"], r"betas"),
    (["--stage1.schedule", "steep"], r"schedule"),
    (["--stage", "3"], r"stage"),
    (["--on-bad-clip", "ignore"], r"on_bad_clip"),
]


@pytest.mark.parametrize("extra, names", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_bad_values(tmp_path, capsys, store, extra, names):
    run_dir = tmp_path / "run"
    argv = ["--store", store, "--run-dir", str(run_dir), "--val-clips", "1", "--no-progress", *extra]
    one_line_error(capsys, run(train.main, argv), names)
    assert not run_dir.exists()  # nothing written: --lr nan used to leave a run folder


def test_bad_value_in_a_preset_file(tmp_path, capsys, monkeypatch, store):
    import jobs.config

    (tmp_path / "train_mine.json").write_text(json.dumps({"stage1": {"steps": "ten"}}))
    monkeypatch.setattr(jobs.config, "PRESETS", tmp_path)
    argv = ["--preset", "mine", "--store", store, "--run-dir", str(tmp_path / "run")]
    err = one_line_error(capsys, run(train.main, argv), r"steps must be an integer, got 'ten'")
    assert re.search(r"preset '?mine", err)
