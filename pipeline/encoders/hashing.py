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


WEIGHT_FILES = ("*.json", "*.safetensors")  # what a hub snapshot fetches: configs and weights, no pickles


class HashedWeights:
    """What a store manifest records first about every encoder: its name, weights id, revision and the
    sha256 of its weights as loaded (computed once, on first use)."""

    name: str
    weights_id: str
    revision: str | None
    _sha256: str | None = None

    def weights_identity(self, module) -> dict:
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(module)
        return {"name": self.name, "weights_id": self.weights_id, "revision": self.revision, "sha256": self._sha256}


def resolve_weights(
    spec: str,
    *,
    flag: str,
    allow_patterns=WEIGHT_FILES,
    subfolder: str | None = None,
    allow_download: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> tuple[Path, str, str | None]:
    """A local folder or a hub id -> (local folder, weights_id, revision).

    weights_id is the hub id, or the absolute path of a local folder; revision is the hub commit
    (None for a local folder). Hub ids are looked up in the local Hugging Face cache only, unless
    allow_download. `flag` names the command-line option that sets the spec, for the error message.
    With `subfolder` (a diffusers repo's "vae"), only that folder is fetched, and the local folder is
    it when it holds a config.json (else the folder given is taken to be the VAE's own).
    """
    local, weights_id, rev = _locate(
        spec, flag, [f"{subfolder}/*"] if subfolder else list(allow_patterns), allow_download, revision, cache_dir
    )
    if subfolder and (local / subfolder / "config.json").is_file():
        local = local / subfolder
    return local, weights_id, rev


def load_pretrained(cls, spec: str, what: str, *, flag: str, **where) -> tuple:
    """`cls.from_pretrained` (transformers or diffusers) of the weights `spec` names, from local files only,
    in float32: (model, local folder, weights_id, revision). `where`: resolve_weights' keywords."""
    local, weights_id, rev = resolve_weights(spec, flag=flag, **where)
    return from_pretrained(cls, local, spec, what), local, weights_id, rev


def backbone_weights(spec: str, tiny_model, tiny_config: dict, model_class: str, what: str, **where) -> tuple:
    """(model, local folder or None, weights_id, revision, the tiny config to record or None) of a feature
    backbone's spec: "tiny" is the preset's seeded random model, anything else `transformers.<model_class>`
    by load_pretrained (flag --encoder; `where`: resolve_weights' keywords)."""
    if spec == "tiny":
        return tiny_model(), None, "tiny", None, tiny_config
    import transformers

    model, local, wid, rev = load_pretrained(getattr(transformers, model_class), spec, what, flag="--encoder", **where)
    return model, local, wid, rev, None


def from_pretrained(cls, local: Path, spec: str, what: str):
    try:
        return cls.from_pretrained(local, local_files_only=True).float()
    except (OSError, ValueError) as e:
        raise EncoderWeightsError(f"could not load {what} from {local} (for {spec!r}): {e}") from e


def load_demo_model(stem: Path, build, *, what: str, train: str, took: str):
    """A demo preset's trained model: `build(config)` from stem.json's "config", its weights from
    stem.safetensors (no pickle); missing or unreadable files name the script that trains them
    (`train`: its path in a checkout, e.g. scripts/train_demo_vae.py)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    missing = [str(f) for f in (weights, meta) if not f.is_file()]
    if missing:
        raise EncoderWeightsError(
            f"the demo {what}'s weights are missing ({', '.join(missing)}): train them with `python {train}` ({took})"
        )
    try:
        model = build(json.loads(meta.read_text())["config"])
        model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise EncoderWeightsError(
            f"could not load the demo {what} from {weights}: {e}; retrain it with `python {train}`"
        ) from e
    return model.float()


def seeded(build, seed: int):
    """`build()` under torch's global seed `seed`, leaving the caller's random state as it was: a tiny
    preset's deterministic random weights (same seed -> same sha256)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _locate(spec, flag, allow_patterns, allow_download, revision, cache_dir) -> tuple[Path, str, str | None]:
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
            "allow downloads (--allow-download), or " if not allow_download else ""
        ) + f"pre-download it with `hf download {spec}` (HF_HOME / HF_HUB_CACHE choose the cache)"
        raise EncoderWeightsError(
            f"encoder weights {spec!r} (revision {revision or 'main'}) are not in the local Hugging Face "
            f"cache{' and could not be downloaded' if allow_download else ''}: {how}, or pass a local "
            f"folder with {flag} /path/to/{spec.split('/')[-1]}  [{type(e).__name__}: {e}]"
        ) from e
    # snapshots live in .../snapshots/<commit>/
    rev = local.name if local.parent.name == "snapshots" else revision
    return local, spec, rev
