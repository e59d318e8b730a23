"""Every job's `--help` explains every option and shows its default (issue 30, item 8).

The parsers are walked in-process: each job's `main` is called with its parser's `parse_args` replaced by
one that hands the parser back, so the test sees exactly the parser a user's `--help` prints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.__main__ import job_names
from jobs.__main__ import main as re2pix

JOBS = job_names()
ROOT = Path(__file__).resolve().parents[1]
# the tools that ship outside the installed packages (benchmarks/: python -m benchmarks.TOOL, scripts/: by path)
TOOLS = sorted(f"benchmarks.{p.stem}" for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__") + [
    "scripts.measure_noise_range",
    "scripts.train_demo_dinov2",
    "scripts.train_demo_vae",
]


class _Parsed(Exception):
    pass


def job_parser(job: str, monkeypatch) -> argparse.ArgumentParser:
    return module_parser(f"jobs.{job}", monkeypatch)


def module_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    def hand_back(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", hand_back)
    module = importlib.import_module(name)
    with pytest.raises(_Parsed) as got:
        module.main([])
    return got.value.args[0]


def options(parser: argparse.ArgumentParser, name: str):
    """(parser name, its formatter, action) for every option and positional, sub-commands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from options(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, parser._get_formatter(), action


def test_every_module_of_jobs_is_walked():
    assert {"cache", "train", "predict", "evaluate", "rollout", "store", "pca"} <= set(JOBS)
    assert {"benchmarks.bench_loader", "scripts.train_demo_vae"} <= set(TOOLS)
    assert not {tool.split(".")[1] for tool in TOOLS} & set(JOBS)  # the tools are no jobs of `re2pix`


@pytest.mark.parametrize("job", JOBS)
def test_every_option_has_help_and_shows_its_default(job, monkeypatch):
    parser = job_parser(job, monkeypatch)
    assert parser.prog.split()[-1] == f"jobs.{job}", parser.prog
    check_every_option(parser)


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_of_the_tools_has_help_and_shows_its_default(tool, monkeypatch):
    parser = module_parser(tool, monkeypatch)
    folder, name = tool.split(".")
    parts_of_bench = ("bench_loader", "bench_shards")  # their --help is benchmarks.bench's subcommand's
    command = f"python -m {tool}" if folder == "benchmarks" else f"python {folder}/{name}.py"
    assert parser.prog == command or name in parts_of_bench, parser.prog
    check_every_option(parser)


def check_every_option(parser: argparse.ArgumentParser) -> None:
    missing, no_default = [], []
    for where, formatter, action in options(parser, parser.prog):
        name = "/".join(action.option_strings) or action.dest
        if not action.help:
            missing.append(f"{where} {name}")
        elif action.option_strings and "default" not in formatter._expand_help(action):
            no_default.append(f"{where} {name}")
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help shows no default: {no_default}"


def test_pca_help_names_pca_and_bench_loader_help_prints(monkeypatch, capsys):
    assert job_parser("pca", monkeypatch).prog == "python -m jobs.pca"
    monkeypatch.undo()
    from benchmarks.bench_loader import main

    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.bench loader")


def test_typed_jobs_show_the_presets_value_as_default(monkeypatch):
    parser = job_parser("train", monkeypatch)
    [lr] = [a for a in parser._actions if "--stage1.lr" in a.option_strings]
    preset = json.loads((ROOT / "jobs/presets/train_tiny.json").read_text())
    assert f"(default: {preset['stage1']['lr']})" in parser._get_formatter()._expand_help(lr)


def test_encoder_and_dinov2_are_one_option_in_every_job(monkeypatch):
    for job in ("cache", "predict", "evaluate"):
        flags = {f for a in job_parser(job, monkeypatch)._actions for f in a.option_strings}
        assert {"--encoder", "--dinov2"} <= flags, job


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    from jobs.train import main

    with pytest.raises(SystemExit) as done:
        main(["--print-config", "--stage1.lr", "0.5", "--steps", "3"])
    assert done.value.code == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stage1"]["lr"] == 0.5 and cfg["steps"] == 3


def test_make_help_lists_the_targets_and_their_variables():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("cache", "train", "predict", "evaluate", "install"):
        assert f"make {target}" in out
    assert "RUN=" in out and "DATA_ROOT=" in out


def test_list_names_datasets_encoders_vaes_and_presets():
    out = subprocess.run(
        [sys.executable, "-m", "jobs.list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for word in ("videos", "synthetic", "demo", "RANDOM weights", "dinov2", "presets", "paper"):
        assert word in out, word


def test_re2pix_runs_a_job_by_name_as_python_m_does(capsys):
    assert re2pix(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {job} " in listing for job in ("cache", "train", "predict", "evaluate", "store"))
    done = subprocess.run([sys.executable, "-m", "jobs", "store", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "{info,verify,check" in done.stdout  # a fresh process, as the console runs it
    assert re2pix(["trian"]) == 2 and "no job 'trian'" in capsys.readouterr().err
