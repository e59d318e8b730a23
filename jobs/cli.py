"""One `main` wrapper for every job: project errors become one line and an exit status.

    if __name__ == "__main__":
        sys.exit(run(main))

A `Re2pixError` prints `error: <message>` and exits with its `exit_code` (1, or 2 for too many
failures); a full disk (wherever the write failed: here, in a Ray worker, in torch's or safetensors'
writers) prints one line naming the path and its free space, exit 1; Ctrl-C exits 130 and SIGTERM 143,
each with one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline.errors import Re2pixError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The jobs' --help: the module docstring as written, each option's default after its help."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so that `finally` blocks (Ray shutdown, temp files) run."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run(main, argv=None, resume_hint: str | None = None) -> int:
    """Call `main(argv)` and return its exit status. `resume_hint` is printed after an interruption."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main(argv) or 0
    except Re2pixError as e:  # a full disk reported by our own code (a background checkpoint write) included
        print(f"error: {disk_full(e) or e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        quiet_pending_tasks()
        print("interrupted" + (f": {resume_hint}" if resume_hint else ""), file=sys.stderr)
        return 130
    except Terminated:
        quiet_pending_tasks()
        print("terminated" + (f": {resume_hint}" if resume_hint else ""), file=sys.stderr)
        return 143
    except Exception as e:
        if (message := disk_full(e)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_pending_tasks() -> None:
    """An interrupted job leaves coroutines of zarr's or fsspec's event loop unfinished; asyncio would log
    "Task was destroyed but it is pending!" for each as they are collected at exit."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


# how a full disk reads in errors that lost their errno on the way (torch's writer, safetensors, a Ray worker)
_DISK_FULL = re.compile(r"No space left on device|os error 28|inline_container\.cc:\d+.*unexpected pos")
_PATH = re.compile(r"No space left on device: '([^']+)'")


def disk_full(error: BaseException) -> str | None:
    """One line for a write that found its disk full, naming the path and its free space; None for any other
    error. The path is the error's own, else the location the job was writing (set by its lock's release)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or _DISK_FULL.search(str(e)):
            found = getattr(e, "filename", None) or (m.group(1) if (m := _PATH.search(str(e))) else None)
            path = found or getattr(error, "written", None)
            where = f"{path or 'the output'}{_free(path)}"
            return f"no space left on device writing {where}: free space and rerun the same command"
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def _free(path: str | None) -> str:
    """' (N MiB free there)' for a local path (its nearest existing folder), '' where that cannot be known."""
    if not path or ("://" in str(path) and not str(path).startswith("file://")):
        return ""
    folder = os.path.abspath(str(path).removeprefix("file://"))
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free there)"


# the registry's seeded random-weight encoders (pipeline/encoders): the tests' and benches' plumbing
RANDOM_WEIGHTS = ("tiny", "tiny-wan2.2", "siglip2:tiny")


def random_weights_notice(specs: dict[str, str | None], manifest: dict | None = None) -> None:
    """One line on stderr when a job runs with random-weight encoders. `specs`: {"encoder" | "vae": the spec
    given, or None: the one the store's `manifest` records}."""
    recorded = (manifest or {}).get("encoders", {})
    keys = {"encoder": "dinov2", "vae": "vae"}
    specs = {flag: spec or (recorded.get(keys[flag]) or {}).get("weights_id") for flag, spec in specs.items()}
    named = [f"--{flag} {spec}" for flag, spec in specs.items() if spec in RANDOM_WEIGHTS]
    if named:
        print(
            f"note: {' and '.join(named)}: RANDOM weights (plumbing tests), the features and pictures mean nothing; "
            "for real data --encoder demo --vae demo (trained on the synthetic set) or --preset paper "
            "(python -m jobs.list)",
            file=sys.stderr,
        )


def replace_run_folder(run: Path, job: str) -> None:
    """Empty `run` for a job that rewrites all of it (the demo, the experiment), refusing a folder that
    holds anything this job did not write there: its marker file says it did."""
    marker = run / f".re2pix-{job}"
    if run.exists() and any(run.iterdir()) and not marker.exists():
        raise Re2pixError(f"{run} is not empty and was not written by jobs.{job}: give another --run")
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    marker.write_text(f"written by python -m jobs.{job}\n")


class StepError(Re2pixError):
    """A job run as a step of another (the demo, the experiment) exited with an error; its own message is in
    its output."""


def step(title: str, args: list[str], timings: dict, log: Path | None = None) -> None:
    """Run `python -m *args` as one titled step, its output to the terminal or to `log`; its seconds add to
    timings[title]."""
    print(f"\n=== {title}: python -m {' '.join(args)}" + (f"  (output: {log})" if log else ""), flush=True)
    t0 = time.time()
    with open(log, "w") if log else contextlib.nullcontext() as out:
        done = subprocess.run([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT if log else None)
    if done.returncode:
        where = f"its output is in {log}" if log else "its output is above"
        raise StepError(f"step {title!r} (python -m {args[0]}) exited with status {done.returncode}; {where}")
    timings[title] = timings.get(title, 0.0) + time.time() - t0


class Shared:
    """One queue of independent steps for n lanes (side_by_side): iterating it takes the next step, so a lane
    that ends its step early takes another instead of idling behind a pre-dealt list."""

    def __init__(self, steps: list[tuple[str, list[str]]], n: int = 2):
        self.steps, self.n, self.lock = list(steps), n, threading.Lock()

    def __iter__(self):
        while True:
            with self.lock:
                if not self.steps:
                    return
                item = self.steps.pop(0)
            yield item


def side_by_side(lanes, logs: Path, timings: dict) -> None:
    """Run lanes of steps at once (each step after the one before it in its lane): the tiny trainers use one
    thread each, so two lanes keep both cores of a small machine busy. `lanes`: a list of step lists, or
    Shared(steps, n): n lanes that each take the next step of one queue when their last one ends (independent
    steps of uneven length). The first lane prints here, the others write to logs/; the first failure is
    raised once every lane has stopped."""
    logs.mkdir(parents=True, exist_ok=True)
    errors: list[Exception] = []

    def lane(i, steps):
        try:
            for title, args in steps:
                name = "".join(ch if ch.isalnum() or ch in "._" else "-" for ch in title.lower())
                step(title, args, timings, None if i == 0 else logs / f"{name}.log")
        except StepError as e:
            errors.append(e)

    if isinstance(lanes, Shared):
        lanes = [lanes] * lanes.n  # every lane draws from the one queue
    threads = [threading.Thread(target=lane, args=(i, steps)) for i, steps in enumerate(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
