"""The project's own error types: what a user did or gave that cannot work, as opposed to a bug.

Every job's `main` runs through `jobs.cli.run`, which turns a `Re2pixError` into one line on stderr
and its `exit_code`, and lets any other exception show its traceback (a bug must stay visible).
Exit statuses (docs/errors.md): 0 done, 1 error, 2 too many failures, 130 / 143 interrupted by SIGINT / SIGTERM.
"""

from __future__ import annotations


class Re2pixError(RuntimeError):
    """A user-facing error: the message names the file (or store, or flag) and the reason."""

    exit_code = 1


class TooManyFailuresError(Re2pixError):
    """More inputs failed than `--max-failures` allows; the work that succeeded is kept."""

    exit_code = 2


class ConfigError(Re2pixError, ValueError):
    """A setting that cannot work: an unknown key in a preset, a checkpoint's or a manifest's config, or a
    value its class refuses. Also a ValueError, so that a reader of someone else's file (a manifest's
    geometry) that refuses bad values keeps refusing these in the same words."""
