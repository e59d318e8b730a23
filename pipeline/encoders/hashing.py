"""Where an encoder's weights come from (hub id or local folder) and what they hash to.

Nothing here falls back to random weights: weights that cannot be found raise EncoderWeightsError.
Heavy imports (torch, huggingface_hub) stay inside the functions.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from pipeline.errors import Re2pixError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EncoderWeightsError(Re2pixError):
    """An encoder's weights could not be found or loaded."""


def state_dict_sha256(module) -> str:
    """sha256 over a module's state_dict: keys in sorted order, each with its dtype, shape and raw bytes.

    It identifies the weights as loaded (independent of the file format they came from).
    """
    import torch

    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_weights(
    spec: str,
    *,
    flag: str,
    allow_patterns: list[str],
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> tuple[Path, str, str | None]:
    """A local folder or a hub id -> (local folder, weights_id, revision).

    weights_id is the hub id, or the absolute path of a local folder; revision is the hub commit
    (None for a local folder). Hub ids are looked up in the local Hugging Face cache only, unless
    allow_download. `flag` names the command-line option that sets the spec, for the error message.
    """
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path.resolve(), str(path.resolve()), None
    if not _HUB_ID.match(spec):
        raise EncoderWeightsError(
            f"encoder weights folder {spec!r} does not exist; pass an existing folder or a hub id with {flag}"
        )
    from huggingface_hub import snapshot_download

    try:
        local = Path(
            snapshot_download(
                spec,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=cache_dir,
                local_files_only=not allow_download,
            )
        )
    except Exception as e:  # not cached, unknown repo, offline, ...
        how = (
            "allow downloads (allow_download=True), or " if not allow_download else ""
        ) + f"pre-download it with `hf download {spec}` (HF_HOME / HF_HUB_CACHE choose the cache)"
        raise EncoderWeightsError(
            f"encoder weights {spec!r} (revision {revision or 'main'}) are not in the local Hugging Face "
            f"cache{' and could not be downloaded' if allow_download else ''}: {how}, or pass a local "
            f"folder with {flag} /path/to/{spec.split('/')[-1]}  [{type(e).__name__}: {e}]"
        ) from e
    # snapshots live in .../snapshots/<commit>/
    rev = local.name if local.parent.name == "snapshots" else revision
    return local, spec, rev
