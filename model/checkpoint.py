"""Checkpoints of a training run, written so that a kill at any moment leaves a loadable one.

Layout under a run directory:

    checkpoints/step-000500/model.safetensors   weights (float32 as trained)
                           ema.safetensors     EMA weights, when the run keeps them
                           state.pt            optimizer, LR scheduler, step, data position (tensors and
                                               plain values only: loaded with torch.load(weights_only=True))
                           meta.json           task, model config, step, weight fingerprints, run config,
                                               the feature space it was trained in (feature_space)
    latest.json                                {"checkpoint": "checkpoints/step-000500", "step": 500}

A checkpoint folder is filled under a temporary name and renamed into place; `latest.json` is
replaced atomically after it. The fingerprint is a sha256 over the weight tensors (names, dtypes,
shapes, bytes): the rollout job records it beside the predictions it writes.

The training loop saves through an `AsyncSaver`: the state is copied to host memory (`host_snapshot`)
and written and hashed by a background thread while training goes on; a save waits only for the one
before it, and the run waits for its last before it ends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import Re2pixError
from pipeline.store.format import compatibility_view
from pipeline.store.lock import LOCK_FILE

log = logging.getLogger("re2pix.checkpoint")

LATEST = "latest.json"
RUN_MARKS = (LATEST, "checkpoints", "metrics.jsonl")  # any of these makes a folder a re2pix run


class CheckpointError(Re2pixError):
    """A checkpoint is of the wrong kind, unreadable, or does not match the fingerprint it recorded."""


class FeatureSpaceError(CheckpointError):
    """Data of another feature space (PCA basis, encoders, geometry) than the checkpoint was trained in."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors(weights: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's weights on the host (a host_snapshot's as they are)."""
    if isinstance(weights, dict):
        return weights
    return {k: v.detach().cpu().contiguous() for k, v in unwrap(weights).state_dict().items()}


def host_snapshot(obj):
    """`obj` copied to host memory: a module's weights, or nested dicts and lists of tensors and plain
    values (an optimizer's state); training can go on changing the originals while this is written."""
    if isinstance(obj, torch.nn.Module):
        return host_snapshot(unwrap(obj).state_dict())
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True).contiguous()
    if isinstance(obj, dict):
        return {k: host_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_snapshot(v) for v in obj)
    return copy.deepcopy(obj)


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def save_checkpoint(
    run_dir,
    step: int,
    *,
    model: torch.nn.Module | dict[str, torch.Tensor],
    state: dict,
    meta: dict,
    ema: torch.nn.Module | dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-{step}, point latest.json at it, keep the newest `keep` checkpoints.
    model, ema: modules or their host_snapshot. Returns the checkpoint folder. Call on one rank only."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    weights = _tensors(model)
    meta = dict(meta, step=step, model_fingerprint=weights_fingerprint(weights))
    save_file(weights, str(tmp / "model.safetensors"))
    if ema is not None:
        ema_weights = _tensors(ema)
        save_file(ema_weights, str(tmp / "ema.safetensors"))
        meta["ema_fingerprint"] = weights_fingerprint(ema_weights)
    meta["fingerprint"] = meta.get("ema_fingerprint", meta["model_fingerprint"])  # what inference uses
    torch.save(dict(state, step=step), tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if final.exists():  # a rerun from an older checkpoint reached this step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(run_dir / LATEST, {"checkpoint": f"checkpoints/{final.name}", "step": step})
    if keep > 0:  # the newest `keep`, counting this one
        older = sorted(p for p in root.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    return final


class AsyncSaver:
    """Checkpoints written off the training step: save() snapshots the state to host memory and hands
    it to a background thread that writes and hashes it (save_checkpoint: same files, same atomic
    renames, same fingerprints); it waits only for the previous save. wait() waits for the last. A
    failed write is raised by the next save() or wait(), as one line naming the checkpoint. The thread
    is not a daemon: a run stopped by an error or a signal still finishes the checkpoint in flight.
    A snapshot that would take more than half the host memory available (training on a CPU, where it is
    a second copy in the same memory) is not made: that save is written in the training thread."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._said_in_place = False

    def save(self, run_dir, step: int, *, model, state: dict, meta: dict, ema=None, keep: int = 2) -> None:
        self.wait()
        weights = [unwrap(m).state_dict() for m in (model, ema) if m is not None]
        size, available = _tensor_bytes([*weights, state]), host_available()
        if 2 * size > available:  # a snapshot beside training would crowd host memory (782M DiT on a CPU: +12.5 GB)
            if not self._said_in_place:
                log.info("checkpoints: a %.1f GB snapshot does not fit beside training in host memory (%.1f GB "
                         "available): written in the training thread", size / 1e9, available / 1e9)  # fmt: skip
                self._said_in_place = True
            self._write(Path(run_dir), step, {"model": model, "ema": ema, "state": state, "meta": meta}, keep)
            return self.wait()  # its error now, as the next save() would raise it
        snap = {
            "model": host_snapshot(model),
            "ema": host_snapshot(ema) if ema is not None else None,
            "state": host_snapshot(state),
            "meta": copy.deepcopy(meta),
        }
        self._thread = threading.Thread(
            target=self._write, args=(Path(run_dir), step, snap, keep), name=f"checkpoint-{step}"
        )
        self._thread.start()

    def _write(self, run_dir: Path, step: int, snap: dict, keep: int) -> None:
        try:
            save_checkpoint(run_dir, step, **snap, keep=keep)
        except BaseException as e:  # raised in the training thread by the next save() or wait()
            if not isinstance(e, Re2pixError):
                e = CheckpointError(f"writing {run_dir}/checkpoints/step-{step:06d} failed ({type(e).__name__}: {e})")
            self._error = e

    def wait(self, raise_error: bool = True) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def host_available() -> int:
    """Bytes of host memory available now (psutil), what a checkpoint's snapshot would take from."""
    import psutil

    return psutil.virtual_memory().available


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint latest.json points at, or None for a run that has not saved one."""
    path = Path(run_dir) / LATEST
    if not path.exists():
        return None
    try:
        ckpt = Path(run_dir) / json.loads(path.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from e
    if not (ckpt / "meta.json").exists():
        raise CheckpointError(f"{path} points at {ckpt}, which is missing or incomplete")
    return ckpt


def check_run_dir(run_dir) -> None:
    """Refuse a non-empty folder that is not a re2pix run: training writes and prunes files in its run
    folder, so it must never take over someone else's."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder")
    mine = [p for p in run_dir.iterdir() if p.name != LOCK_FILE] if run_dir.is_dir() else []  # the trainer's lock
    if mine and not any((run_dir / m).exists() for m in RUN_MARKS):
        shown = ", ".join(sorted(p.name for p in run_dir.iterdir())[:3])
        raise CheckpointError(
            f"{run_dir} is not empty and is not a re2pix run (it holds {shown}, and no "
            f"{LATEST}, checkpoints/ or metrics.jsonl): choose a new or empty --run-dir"
        )


def has_checkpoints(run_dir) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / LATEST).exists() or any((run_dir / "checkpoints").glob("step-*"))


def resolve_checkpoint(path) -> Path:
    """A checkpoint folder, given it or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (a checkpoint folder or a run directory was expected)")
    if (path / "meta.json").exists():
        return path
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no meta.json) nor a run directory with {LATEST}: train first (make train)"
        )
    return ckpt


def read_meta(ckpt) -> dict:
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a checkpoint's meta.json (a JSON object)")
    return meta


def load_weights(ckpt, which: str = "model", device="cpu") -> dict[str, torch.Tensor]:
    """The `model` or `ema` weights of a checkpoint (safetensors: no code is ever unpickled)."""
    path = Path(ckpt) / f"{which}.safetensors"
    if not path.exists():
        raise CheckpointError(f"{ckpt} has no {which} weights ({path.name})")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}): the checkpoint is damaged, or "
            "not one written by re2pix (its weights are never pickles)"
        ) from e


def load_state(ckpt) -> dict:
    """Optimizer, scheduler, step and data position, loaded with weights_only=True."""
    path = Path(ckpt) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects that weights-only loading refuses (only tensors and plain "
            "values are loaded, never code): not a re2pix checkpoint"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e


def verify_checkpoint(ckpt) -> dict:
    """Load every file of a checkpoint and check each weights file against the fingerprint meta.json
    recorded; returns the meta. Raises CheckpointError naming the file and the reason."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    for which in ("model", "ema"):
        recorded = meta.get(f"{which}_fingerprint")
        if recorded is None and which == "ema":
            continue
        if weights_fingerprint(load_weights(ckpt, which)) != recorded:
            raise CheckpointError(
                f"{ckpt}/{which}.safetensors does not match the fingerprint its meta.json "
                "recorded: the checkpoint is damaged"
            )
    load_state(ckpt)
    return meta


def find_resumable(run_dir, strict: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest intact checkpoint of a run, [(checkpoint, reason)] for the newer ones that are not).
    None for a run without checkpoints. A damaged checkpoint is skipped for the one before it unless
    `strict`, which stops with the damage; a run whose every checkpoint is damaged stops too."""
    run_dir = Path(run_dir)
    candidates = sorted((run_dir / "checkpoints").glob("step-*"), reverse=True)  # step-NNNNNN: newest first
    skipped: list[tuple[Path, str]] = []
    for ckpt in candidates:
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            if strict:
                raise
            skipped.append((ckpt, str(e)))
            continue
        return ckpt, skipped
    if skipped:
        raise CheckpointError(
            f"{run_dir}: no intact checkpoint to resume from ({skipped[0][1]}); choose another --run-dir to start over"
        )
    if (run_dir / LATEST).exists():
        raise CheckpointError(f"{run_dir / LATEST} exists but {run_dir / 'checkpoints'} holds no checkpoint")
    return None, skipped


def load_verified(path, tasks: tuple[str, ...], weights: str = "auto") -> tuple[Path, dict, dict, str]:
    """(checkpoint folder, meta, weights, fingerprint) of a run dir or checkpoint whose task is one of
    `tasks`. `weights`: "model", "ema", or "auto" (EMA when the run kept one). The weights must hash
    to the fingerprint meta.json recorded: a damaged or swapped file is refused."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("task") not in tasks:
        raise CheckpointError(f"{ckpt} holds a {meta.get('task')} checkpoint; expected {' or '.join(tasks)}")
    if weights == "auto":
        weights = "ema" if "ema_fingerprint" in meta else "model"
    state = load_weights(ckpt, weights)
    fingerprint = weights_fingerprint(state)
    if fingerprint != meta.get(f"{weights}_fingerprint"):
        raise CheckpointError(
            f"{ckpt}/{weights}.safetensors does not match the fingerprint its meta.json "
            "recorded: the checkpoint is damaged"
        )
    return ckpt, meta, state, fingerprint


# ---- the feature space a model was trained in ----------------------------------------------------------
def feature_space(manifest: dict, channels: int) -> dict:
    """What meta.json records as "feature_space": the training stores' compatibility view (PCA basis, a
    prefix copy's by the basis it is a prefix of; encoder identities; clip geometry; VAE latent
    normalization: pipeline/store/format.py) and the PCA channels the model reads. JSON-normalized."""
    return json.loads(json.dumps({**compatibility_view(manifest), "channels": channels}))


def check_feature_space(meta: dict, ckpt, where: str, manifest: dict | None, basis: str | None = None) -> None:
    """Refuse data of another feature space than the checkpoint was trained in, in one line naming both PCA
    fingerprints. `manifest`: the data's store manifest; None where only its PCA basis is known (a video
    projected with --pca): then `basis` is that basis's fingerprint. A checkpoint saved before checkpoints
    recorded their space is used with a one-line warning."""
    recorded = meta.get("feature_space")
    if not isinstance(recorded, dict):
        log.warning("%s records no feature space (saved before checkpoints did): not checked against %s", ckpt, where)
        return
    data = feature_space(manifest, recorded.get("channels")) if manifest is not None else {"pca.fingerprint": basis}
    keys = set(recorded) | set(data) if manifest is not None else {"pca.fingerprint"}
    # the PCA basis first, then an encoder's name: a store of another encoder is refused as such
    for key in sorted(keys - {"channels"}, key=lambda k: (k != "pca.fingerprint", not k.endswith(".name"), k)):
        if recorded.get(key) != data.get(key):
            was, now = recorded.get(key), data.get(key)
            other = "" if key == "pca.fingerprint" else f", and {key} differs ({was!r} vs {now!r})"
            raise FeatureSpaceError(
                f"{ckpt} was trained in feature space PCA {str(recorded.get('pca.fingerprint'))[:12]}; {where} "
                f"holds PCA {str(data.get('pca.fingerprint'))[:12]}{other}: features of another space must not meet "
                "this model (use a store cached under its basis: `python -m jobs.store check` compares stores)"
            )
