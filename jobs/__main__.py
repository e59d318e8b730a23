"""`re2pix JOB [OPTIONS]` (the console entry point) or `python -m jobs JOB [OPTIONS]`: the same as
`python -m jobs.JOB [OPTIONS]`, for every job in jobs/ (`re2pix --help` lists them)."""

from __future__ import annotations

import ast
import pkgutil
import runpy
import sys
from pathlib import Path

import jobs

NOT_JOBS = {"cli", "config", "__main__"}


def job_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(jobs.__path__) if m.name not in NOT_JOBS)


def summary(job: str) -> str:
    """The first line of a job's docstring, read without importing it."""
    doc = ast.get_docstring(ast.parse((Path(jobs.__file__).parent / f"{job}.py").read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def usage() -> str:
    names = job_names()
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {summary(name)}" for name in names]
    return "\n".join(["usage: re2pix JOB [OPTIONS]   (re2pix JOB --help: the job's options)", "", "jobs:", *lines])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    job, *rest = argv
    if job not in job_names():
        print(f"error: re2pix has no job {job!r}; jobs: {', '.join(job_names())}", file=sys.stderr)
        return 2
    sys.argv = [f"re2pix {job}", *rest]
    runpy.run_module(f"jobs.{job}", run_name="__main__", alter_sys=True)  # exactly `python -m jobs.JOB`
    return 0


if __name__ == "__main__":
    sys.exit(main())
