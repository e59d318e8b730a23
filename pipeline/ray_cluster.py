"""Which Ray cluster a job runs on, decided explicitly (every job that starts Ray comes here).

1. `--ray-address ADDR` or `RAY_ADDRESS=ADDR` -> connect to that cluster and size from its resources.
   `local` (either way) always starts a private cluster on this machine.
2. else a live local cluster (the address Ray records for the last `ray start`) -> use it, and say so.
3. else -> start a private local cluster sized from this machine.

Ray itself, given no address, reads the last `ray start` address from its temp folder even after that
cluster has stopped, and then refuses `num_cpus`: a dead cluster's leftover address must never stop
a job, so the address is checked (a TCP connect to its GCS port) before it is used.

Credentials and endpoints for object storage (`AWS_*`, `GOOGLE_*`, ... see FORWARDED_ENV) are
forwarded to every worker through the runtime environment, never printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass

from pipeline.errors import Re2pixError

# the variables object-storage clients read; forwarded to workers, never logged
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "FSSPEC_")


class RayConnectionError(Re2pixError):
    """The job could not join the cluster it was given or found: one line saying what to set."""

    def __init__(self, address: str, error: BaseException | None):
        text = ""
        while error is not None:  # Ray reports a refused token inside a RuntimeError's text
            text += f"{type(error).__name__}: {error}\n"
            error = error.__cause__ or error.__context__
        if "AuthenticationError" in text or "InvalidAuthToken" in text:
            why = (
                "it refused this job's authentication token: set RAY_AUTH_TOKEN_PATH to the token file the "
                "head's `ray start` used (~/.ray/auth_token on the head node), or RAY_AUTH_TOKEN to its contents"
            )
        elif text:
            why = text.strip().splitlines()[-1]
        else:
            why = f"nothing answers there (is it running? `ray status --address {address}`)"
        super().__init__(
            f"ray: cannot join the Ray cluster at {address}: {why}; --ray-address local starts a private one "
            "on this machine"
        )


@dataclass
class RayCluster:
    address: str  # what was connected to ("local" for a private cluster)
    kind: str  # "given", "found", "private"
    cpus: float
    gpus: float
    nodes: int
    owned: bool = False  # this process connected: it disconnects at the end (a caller's connection is kept)

    def describe(self) -> str:
        where = {
            "given": f"the Ray cluster at {self.address}",
            "found": f"the running local Ray cluster at {self.address} (found by Ray's address file; "
            "--ray-address local starts a private one)",
            "private": "a private local Ray cluster",
        }[self.kind]
        return f"ray: using {where}: {self.nodes} node(s), {self.cpus:g} CPUs, {self.gpus:g} GPUs"


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def _alive(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def recorded_local_address() -> str | None:
    """The address of the last `ray start` on this machine, if that cluster still answers."""
    from ray._private.utils import read_ray_address

    address = read_ray_address()
    return address if address and _alive(address) else None


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return host in ("localhost", "::1") or host.startswith("127.")


def stay_on_loopback() -> None:
    """Ray swaps a given 127.0.0.1 for the host's address (and binds a private cluster there) unless
    told it is not a multi-machine cluster: tell it, for loopback addresses and private clusters."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray._private.services


def use_cluster_token() -> None:
    """Join a token-protected cluster. `ray start` protects its cluster with the machine's token
    (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) whenever one exists, and any earlier private
    cluster has written one; Ray's client turns token mode on by itself only for `address="auto"`, so a job
    given an address (or finding one) does what `auto` does: token mode when RAY_AUTH_MODE is unset and a
    token is at hand. A cluster without authentication ignores the token."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _clusters_dir() -> str:
    """Where this user's jobs record the private clusters they start (a per-user state folder)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "re2pix", "ray-clusters")


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def record_private_cluster() -> None:
    """Record the private cluster this job just started: its raylet (whose workers carry RAY_RAYLET_PID) and
    the agents it started (which carry nothing that names their cluster), each with its start time."""
    import psutil

    me = psutil.Process()
    raylets = [p for p in me.children() if p.name() == "raylet"]
    record = {
        "driver": [me.pid, me.create_time()],
        "raylets": [p.pid for p in raylets],
        "processes": [[c.pid, c.create_time()] for r in raylets for c in r.children(recursive=True)],
    }
    os.makedirs(_clusters_dir(), exist_ok=True)
    path = os.path.join(_clusters_dir(), f"{me.pid}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def forget_private_cluster() -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(_clusters_dir(), f"{os.getpid()}.json"))


def leftover_processes() -> list[str]:
    """Ray processes left by this user's earlier killed jobs of this project: processes of a private cluster
    a job recorded (record_private_cluster) whose driver no longer runs, re-parented to init (Ray ends its
    workers, raylet and GCS with a SIGKILLed driver, but not always its agents and actors). Other users' and
    other jobs' Ray processes are never named. A record with nothing left is removed."""
    import psutil

    raylets, processes, spent = set(), set(), []
    for name in os.listdir(_clusters_dir()) if os.path.isdir(_clusters_dir()) else []:
        path = os.path.join(_clusters_dir(), name)
        try:
            with open(path) as f:
                r = json.load(f)
            driver, started = r["driver"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _started(driver) == started:  # that job still runs: its processes are its own
            continue
        raylets |= {str(p) for p in r.get("raylets", [])}
        processes |= {(p, t) for p, t in r.get("processes", [])}
        spent.append(path)
    found = []
    for p in psutil.process_iter(["pid", "ppid", "name", "uids", "create_time", "status"]):
        if not (p.info["name"] or "").startswith("ray::") or p.info["ppid"] != 1:
            continue
        if p.info["status"] == psutil.STATUS_ZOMBIE:  # already ended
            continue
        if p.info["uids"] is None or p.info["uids"].real != os.getuid():
            continue
        try:
            raylet = p.environ().get("RAY_RAYLET_PID")
        except psutil.Error:
            continue
        if raylet in raylets or (p.info["pid"], p.info["create_time"]) in processes:
            found.append(f"{p.info['pid']} ({p.info['name']})")
    if not found:
        for path in spent:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return found


def quiet_ray(verbose: bool) -> None:
    """Silence Ray's own notices (C++ log lines, progress-bar warnings) unless --verbose."""
    if verbose:
        return
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # core_worker.cc lines on the driver's stderr
    # Ray Data resets its loggers' levels on import; its ERROR lines only announce (with a stack trace) the
    # exception the job then raises, which the job reports itself (in one line where it is the user's)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    for name in ("ray", "ray.data", "ray._private", "ray.util"):
        logging.getLogger(name).setLevel(logging.ERROR)


# a line of Ray's C++ log ("[2026-12-01 23:00:29,401 I 15039 15039] logging.cc:303: ..."), or its notice
# about token authentication, printed by the core as it connects
RAY_LOG_LINE = re.compile(
    r"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z] \d+ \d+\] \S+:\d+: |Token authentication is enabled)"
)


@contextlib.contextmanager
def without_ray_log_lines(verbose: bool):
    """Hold the process's stderr (fd 2) while Ray's core starts, then pass on every line but Ray's C++ log
    lines: the core prints that it read RAY_BACKEND_LOG_LEVEL whatever level that sets."""
    if verbose:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not RAY_LOG_LINE.match(line)))
            sys.stderr.flush()


def start_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    verbose: bool = False,
    announce: bool = True,
) -> RayCluster:
    """Connect to (or start) the job's Ray cluster; see the module docstring for the order.
    `num_cpus` / `num_gpus` size a private cluster only (logical GPUs: `num_gpus=4` on a CPU machine)."""
    quiet_ray(verbose)
    import ray

    owned = not ray.is_initialized()
    if owned:
        address = address or os.environ.get("RAY_ADDRESS") or None
        kind = "given"
        if address is None:
            address = recorded_local_address()
            kind = "found" if address else "private"
        elif address == "local":
            kind = "private"
        kwargs = {
            "include_dashboard": False,
            "configure_logging": False,
            "log_to_driver": verbose,
            "runtime_env": {"env_vars": forwarded_env()},
        }
        if kind == "private":
            kwargs.update(
                num_cpus=num_cpus or os.cpu_count(),
                num_gpus=num_gpus or None,
                _node_ip_address="127.0.0.1",  # a one-machine cluster listens on loopback only
                # Ray starts workers 15 nice levels below the raylet: the actors doing the job's work
                # would yield the CPU to every other process of the machine. They run at the job's own.
                _system_config={"worker_niceness": 0},
            )
            address = "local"
        if kind == "private" and (left := leftover_processes()):
            print(
                f"note: Ray processes left by an earlier killed job, not used: {', '.join(left)} "
                "(end them with `kill PID`)",
                file=sys.stderr,
            )
        if kind == "private" or _is_loopback(address):
            stay_on_loopback()
        if kind != "private":
            if address != "auto" and not _alive(address, timeout=5.0):  # Ray itself would retry for minutes
                raise RayConnectionError(address, None)
            use_cluster_token()
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            with without_ray_log_lines(verbose):
                ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError) as e:
            if kind == "private":
                raise
            raise RayConnectionError(address, e) from None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)  # ray.init replaces it with a sys.exit that aborts
        if kind == "private":  # so that a later job can name what a kill of this one leaves behind
            record_private_cluster()
    else:
        kind, address = "given", ray.get_runtime_context().gcs_address
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = verbose
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False
    res = ray.cluster_resources()
    cluster = RayCluster(
        address, kind, res.get("CPU", 0), res.get("GPU", 0), sum(1 for n in ray.nodes() if n.get("Alive")), owned
    )
    if announce:
        print(cluster.describe(), file=sys.stderr, flush=True)
    return cluster


def stop_ray(cluster: RayCluster | None) -> None:
    """Disconnect if `start_ray` connected; a private cluster's processes end with it, a shared
    cluster keeps running (the job's actors, none detached, end with the driver's connection)."""
    import ray

    if cluster is not None and cluster.owned and ray.is_initialized():
        ray.shutdown()
        if cluster.kind == "private":
            forget_private_cluster()
