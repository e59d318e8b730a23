"""Store format v1: names, the manifest, errors, and the compatibility rule.

The manifest lives in the root group's attributes. A store is readable as finished only when
`complete` is true: the writer sets it last, after every array and every failure is written.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.errors import Re2pixError

FORMAT_NAME = "re2pix-store"
FORMAT_VERSION = 1
# what a store's folder holds (docs/store_format.md, "Layout"): all that --overwrite may remove
STORE_LAYOUT = ("zarr.json", "pca", "frames", "clips", "failures", "progress", "clips.parquet")
# The default codec, chosen from `make bench`'s codec table: the one the loader reads fastest per core,
# unless another saves >= 1.33x the bytes at >= 80 % of that speed (fp16 PCA features gain only ~1.16x)
DEFAULT_COMPRESSION = "none"
VARIANT_SUFFIX = {"orig": "", "hflip": "-hflip"}  # clip id suffix of each cached variant
# The optional pseudo-depth target (cache --pseudo-depth): one float16 [h, w] map per frame row at `scale` x the
# feature grid, recorded under the manifest's "pseudo_depth"; it is no part of the features' compatibility.
PSEUDO_DEPTH = "frames/pseudo_depth"
PSEUDO_DEPTH_TARGET = "relative inverse depth (disparity), up to scale and shift"
MAX_PSEUDO_DEPTH_SCALE = 16

# Encoder description keys that may differ between compatible stores: the same weights can be
# loaded from a hub id or from a local folder; what must match is which encoder (its name), its
# sha256 and how it ran.
_ENCODER_KEYS_FREE = {"weights_id", "revision", "device", "dtype_note", "precision"}


class StoreError(Re2pixError):
    """Base class: a store cannot be used as asked. Messages name the store."""

    def __init__(self, message: str = ""):
        super().__init__(_from_worker(message, type(self).__name__))


def _from_worker(message: str, name: str) -> str:
    """torch's DataLoader re-raises a worker's exception as `type(message)` where the message is
    "Caught X in DataLoader worker process N. Original Traceback ...": keep the one line the error had."""
    message = str(message)
    if not message.startswith(f"Caught {name} in DataLoader worker"):
        return message
    last = [ln.split(f"{name}: ", 1)[1] for ln in message.splitlines() if f"{name}: " in ln]
    return last[-1] if last else message.splitlines()[0]


class NotAStoreError(StoreError):
    pass


class StoreVersionError(StoreError):
    pass


class IncompleteStoreError(StoreError):
    pass


class DamagedStoreError(StoreError):
    """A chunk the manifest says exists is missing, or fails its checksum or decoding.
    `location`, `array` and `row` name where; readers raise it instead of handing out fill values."""

    def __init__(self, location: str, array: str | None = None, row: int | None = None, reason: str | None = None):
        self.location, self.array, self.row, self.reason = location, array, row, reason
        if array is None:  # one message: re-raised from a DataLoader worker (see _from_worker)
            super().__init__(location)
            return
        where = f"{array}[{row}]" if row is not None else array
        super().__init__(f"{location}: {where} is damaged ({reason}); run `python -m jobs.store verify {location}`")


# What a damaged chunk raises inside zarr: a failed crc32c ("checksum do not match"), a codec that cannot
# decode truncated bytes, a shard index that does not parse. Any of these on a read is damage to the store.
DECODE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError)


def decode_reason(e: BaseException) -> str:
    """A DamagedStoreError's reason for one of DECODE_ERRORS raised by a read."""
    text = str(e).split("\n")[0][:160]
    if "checksum" in text:
        return "crc32c checksum mismatch: its bytes changed on disk"
    return f"cannot read or decode it: {type(e).__name__}: {text}"


def digest(a: np.ndarray) -> str:
    """A row's digest, as the writer records it in its unit markers and verify compares it."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


class IncompatibleStoresError(StoreError):
    def __init__(self, field: str, a: str, va, b: str, vb):
        self.field = field
        super().__init__(
            f"stores are incompatible: {field} differs ({a}: {_short(va)}; {b}: {_short(vb)}). "
            "Features under different encoders, PCA bases or clip geometry must not be mixed."
        )


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def check_manifest(manifest: dict, where: str, allow_incomplete: bool = False) -> None:
    """Refuse what is not a v1-readable, finished store, naming `where` and the reason."""
    if manifest.get("format") != FORMAT_NAME:
        raise NotAStoreError(
            f"{where} is not a re2pix store: its attributes have no "
            f"format={FORMAT_NAME!r} (found keys {sorted(manifest)[:8]})"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise NotAStoreError(f"{where}: format_version is missing or not an integer ({version!r})")
    if version > FORMAT_VERSION:
        raise StoreVersionError(
            f"{where} has store format version {version}, newer than this re2pix "
            f"reads ({FORMAT_VERSION}): upgrade re2pix to read it"
        )
    if not allow_incomplete and not manifest.get("complete", False):
        raise IncompleteStoreError(
            f"{where} was never finished (complete=false): the job that wrote it "
            "stopped early; rerun the same cache command to resume it"
        )


def geometry_of(manifest: dict, where: str):
    """The manifest's clip geometry, bounds-checked before it sizes anything; refused naming `where`."""
    from .geometry import Geometry

    try:
        return Geometry.from_dict(manifest.get("geometry"))
    except (ValueError, TypeError) as e:
        raise StoreError(f"{where}: the manifest's geometry is refused: {e}") from e


def pseudo_depth_hw(geometry, scale) -> tuple[int, int]:
    """The stored pseudo-depth map's size: `scale` x the feature grid (1 <= scale <= MAX_PSEUDO_DEPTH_SCALE)."""
    if not (isinstance(scale, int) and not isinstance(scale, bool) and 1 <= scale <= MAX_PSEUDO_DEPTH_SCALE):
        raise ValueError(f"the pseudo-depth scale must be an integer in 1..{MAX_PSEUDO_DEPTH_SCALE}, got {scale!r}")
    h, w = geometry.feature_hw
    return h * scale, w * scale


def basis_root(manifest: dict) -> str | None:
    """The fingerprint of the basis this store's basis is a prefix of (its own when it is no prefix copy)."""
    pca = manifest.get("pca", {})
    prefix = pca.get("prefix_of")
    return prefix.get("fingerprint") if isinstance(prefix, dict) else pca.get("fingerprint")


def compatibility_view(manifest: dict) -> dict:
    """The fields that must be equal for two stores to be read together, flattened to dotted paths.
    A copy that keeps the first C PCA channels (`jobs.store copy --channels C`) records the basis it is a
    prefix of: it reads together with its original, and with other prefixes of it, at <= C channels."""
    view = {"pca.fingerprint": basis_root(manifest)}  # of the original basis, for a prefix copy
    for k, v in manifest.get("geometry", {}).items():
        if k != "num_pca_channels":  # stores of one basis differ only in how many channels they keep
            view[f"geometry.{k}"] = v
    for enc, desc in sorted(manifest.get("encoders", {}).items()):
        for k, v in sorted(desc.items()):
            if k not in _ENCODER_KEYS_FREE:
                view[f"encoders.{enc}.{k}"] = v
    for k, v in manifest.get("latent_norm", {}).items():
        view[f"latent_norm.{k}"] = v
    return view


def check_compatible(manifests: list[dict], names: list[str]) -> None:
    """Raise IncompatibleStoresError naming the first field where any store differs from the first."""
    if len(manifests) < 2:
        return
    ref = compatibility_view(manifests[0])
    for m, name in zip(manifests[1:], names[1:]):
        other = compatibility_view(m)
        # an encoder's name first: stores of two encoders are refused as such, not by a config detail
        for key in sorted(set(ref) | set(other), key=lambda k: (not k.endswith(".name"), k)):
            if ref.get(key) != other.get(key):
                raise IncompatibleStoresError(key, names[0], ref.get(key), name, other.get(key))


# ---- strings ---------------------------------------------------------------------------------
# Text columns (clip ids, scenes, frame paths, failures) are stored as uint8 [n, width]: UTF-8 bytes,
# zero-padded. Every Zarr v3 reader reads uint8 (tensorstore has no vlen-utf8 `string` type); stores
# written before used zarr's `string` dtype, and `decode_strings` reads both.
STRING_ENCODING = "utf8-zero-padded-uint8"


def encode_strings(values) -> np.ndarray:
    """[n] str -> [n, width] uint8 (width >= 1), UTF-8 zero-padded; a string may not hold NUL."""
    raw = [str(v).encode("utf-8") for v in values]
    if any(b"\x00" in r for r in raw):
        raise ValueError("strings stored in a store cannot contain NUL characters")
    width = max([len(r) for r in raw] + [1])
    out = np.zeros((len(raw), width), np.uint8)
    for i, r in enumerate(raw):
        out[i, : len(r)] = np.frombuffer(r, np.uint8)
    return out


def decode_strings(a: np.ndarray) -> np.ndarray:
    """What encode_strings wrote (or an old store's `string` array) -> [n] array of str."""
    a = np.asarray(a)
    if a.dtype.kind in "OUT":  # stores of format 1 written before the uint8 encoding
        return np.array([str(x) for x in a], dtype=object)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"a string column must be uint8 [n, width], got {a.dtype} {list(a.shape)}")
    return np.array([bytes(r).rstrip(b"\x00").decode("utf-8") for r in a], dtype=object)
