"""Where a store lives: a local path or an fsspec URL (file://, s3://, gs://, https://...)."""

from __future__ import annotations

import os
import uuid
import weakref

import fsspec
import zarr


def is_url(location: str) -> bool:
    return "://" in str(location)


def writable_location(location: str) -> str:
    """zarr's FsspecStore does not create local folders: write file:// URLs as plain paths."""
    location = str(location)
    return location.removeprefix("file://")


def fresh_options(location: str, storage_options: dict | None = None) -> dict:
    """Options for a remote filesystem that always lists afresh: markers written by other processes
    (workers on other nodes, a killed run) must be seen, so no cached listing and no shared instance."""
    options = dict(storage_options or {})
    protocol = str(location).split("://", 1)[0] if is_url(location) else "file"
    if protocol not in ("file", "local", "memory"):
        options.setdefault("use_listings_cache", False)
        options.setdefault("skip_instance_cache", True)
    return options


def open_group(location: str, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """Never through consolidated metadata: a rollout adds arrays to a finished store (describe.py)."""
    location = str(location) if mode == "r" else writable_location(location)
    if not is_url(location):
        return zarr.open_group(location, mode=mode, zarr_format=3, use_consolidated=False)
    options = fresh_options(location, storage_options) or None
    store = fsspec_store(location, options, read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def fsspec_store(location: str, storage_options: dict | None, read_only: bool):
    """zarr's store for a URL, whose HTTP session is closed when its filesystem goes (or at exit)."""
    from zarr.storage import FsspecStore

    store = FsspecStore.from_url(location, storage_options=storage_options, read_only=read_only)
    # on the filesystem, not the store: zarr hands the same filesystem to the stores it derives
    # (with_read_only), which outlive the one made here. The session is made lazily, so the finalizer
    # holds the filesystem's attribute dict (which does not keep the filesystem alive), not the session.
    weakref.finalize(store.fs, _close_session, type(store.fs), vars(store.fs))
    return store


def _close_session(kind: type, state: dict) -> None:
    """Close an async filesystem's HTTP session (s3fs, gcsfs, http), if it opened one. fsspec does this
    itself for its sync instances only; the async ones zarr uses (one per opened group: no shared
    instance, fresh listings) would each end with aiohttp's "Unclosed client session" on stderr."""
    close = getattr(kind, "close_session", None)
    session = state.get("_s3creator") or state.get("_session")
    if close is not None and session is not None:
        from zarr.core.sync import _get_loop  # the loop zarr runs its filesystems' coroutines on

        close(_get_loop(), session)


def same_location(a: str, b: str) -> bool:
    """Whether two locations name one store: local paths (and file:// URLs) after resolving symlinks and
    relative parts, URLs by protocol and path (trailing slashes aside)."""

    def key(location: str) -> str:
        location = writable_location(str(location))
        if not is_url(location):
            return "file://" + os.path.realpath(location)
        protocol, _, path = location.partition("://")
        return f"{protocol.lower()}://{path.rstrip('/')}"

    return key(a) == key(b)


def filesystem(location: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and root path of a store, for the small JSON files beside its arrays."""
    location = writable_location(location)
    if not is_url(location):
        location = os.path.abspath(location)
    return fsspec.core.url_to_fs(location, **fresh_options(location, storage_options))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole file or nothing: readers never see half of it."""
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
