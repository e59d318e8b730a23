"""One writer per store and one trainer per run folder: a lock file naming its holder.

The lock is `.re2pix-lock.json` inside the folder it guards (a store, an export folder, a run folder):
{job, host, pid, started}. A second writer is refused with one line naming the holder. A lock left by a
job that no longer runs (same host, its PID gone or reused) is taken over with a note naming the old
holder; a lock held on another host cannot be checked from here, so it is refused with the way to clear it.

Local paths are locked atomically (the file is written whole under a temporary name, then hard-linked to
its name, which fails when the name exists). Object stores (s3://, gs://, ...) have no create-if-absent
through fsspec: there the lock is written when absent and read back; two writers starting within the
same moment can both pass, so the lock guards against a second run started later (the common mistake),
not against a race of simultaneous starts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import time
import uuid

from pipeline.errors import Re2pixError

from .location import filesystem, is_url

LOCK_FILE = ".re2pix-lock.json"


class LockedError(Re2pixError):
    """Another job holds the lock of the folder this job would write."""


@contextlib.contextmanager
def locked(location: str, job: str, storage_options: dict | None = None):
    """Hold the lock of `location` (a store, an export or a run folder) for the block; released on every exit."""
    lock = Lock(location, job, storage_options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def live_holder(location: str, storage_options: dict | None = None) -> str | None:
    """'jobs.cache (PID 123 on host since ...)' when a running job holds `location`'s lock; else None."""
    lock = Lock(location, "", storage_options)
    holder = lock.read()
    return describe(holder) if holder is not None and lock.alive(holder) is not False else None


def describe(holder: dict) -> str:
    return (
        f"{holder.get('job', '?')} (PID {holder.get('pid', '?')} on {holder.get('host', '?')} "
        f"since {holder.get('since', '?')})"
    )


class Lock:
    def __init__(self, location: str, job: str, storage_options: dict | None = None):
        self.location = str(location)
        self.fs, root = filesystem(location, storage_options)
        self.path = f"{root.rstrip('/')}/{LOCK_FILE}"
        self.local = not is_url(self.location) or self.location.startswith("file://")
        self.made = False
        now = time.time()
        self.mine = {
            "job": job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": now,
            "since": _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds"),
            "token": uuid.uuid4().hex,
        }

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock taken over by another job between our read and our create: look again
            if self._create():
                return
            holder = self.read()
            if holder is None:  # released between our create and our read
                continue
            alive = self.alive(holder)
            if alive is None:
                raise LockedError(
                    f"{self.location} is locked by {describe(holder)}, on another machine: if that job no "
                    f"longer runs, delete {self.path} and rerun"
                )
            if alive:
                raise LockedError(
                    f"{self.location} is in use by {describe(holder)}: wait for it to end (or end it: "
                    f"kill {holder.get('pid')}) and rerun"
                )
            print(
                f"note: {self.location} was locked by {describe(holder)}, which no longer runs; taking the lock over",
                file=sys.stderr,
            )
            self._remove_if(holder)
        raise LockedError(f"{self.location}: its lock {self.path} changes hands too often to take it; rerun")

    def release(self) -> None:
        """Remove the lock (call in a `finally`): an error on its way out learns, as `written`, the location
        the job was writing, for a message that has no path of its own (a full disk: jobs/cli.py)."""
        error = sys.exc_info()[1]
        if error is not None and getattr(error, "written", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                error.written = self.location
        self._remove_if(self.mine)
        parent = self.path.rsplit("/", 1)[0]
        if self.made and not os.listdir(parent):  # a job refused before writing anything leaves no folder
            os.rmdir(parent)

    def read(self) -> dict | None:
        try:
            holder = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            holder = {}
        return holder if isinstance(holder, dict) else {}

    def alive(self, holder: dict) -> bool | None:
        """Whether the holder still runs: None where this machine cannot tell (another host)."""
        import psutil

        if holder.get("host") != self.mine["host"]:
            return None
        try:
            p = psutil.Process(int(holder["pid"]))
            running = p.status() != psutil.STATUS_ZOMBIE
            # a PID reused by a process started after the lock was taken is not the holder
            return running and p.create_time() <= float(holder["started"]) + 1
        except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
            return False

    def _create(self) -> bool:
        data = json.dumps(self.mine).encode()
        parent = self.path.rsplit("/", 1)[0]
        if self.fs.isfile(parent):
            raise Re2pixError(f"{self.location} is a file, not a folder: refusing to write there")
        self.made = self.local and not self.fs.exists(parent)  # removed again on release if left empty
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{parent}/.tmp-{self.mine['token']}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)  # atomic: fails when a lock is there
                return True
            except FileExistsError:
                return False
            finally:
                os.remove(tmp)
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        return (self.read() or {}).get("token") == self.mine["token"]

    def _remove_if(self, holder: dict) -> None:
        """Remove the lock file if it still names `holder` (never a lock another job has taken since)."""
        now = self.read()
        if now is not None and now.get("token") == holder.get("token"):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.path)
