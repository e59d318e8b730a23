"""WebDataset export of a store, for sequential streaming: one self-contained tar sample per clip row.

A sample `{clip_id}` holds `{clip_id}.latents.npy` [16, 7, h, w], `{clip_id}.features.npy`
[7, H, W, c] (optionally only the first c channels), `{clip_id}.pred_features.npy` when the store has
rollouts, and `{clip_id}.json` (its metadata). The shards sit in `data/` (exports made before: beside the
manifest); beside `data/`, `manifest.json` carries the store's manifest so readers can refuse incompatible
shards, `pca.npz` the PCA basis (float32 arrays, no pickle) and `README.md` a Hugging Face dataset card: its
YAML header names the shards and their features (float16 arrays), so `datasets.load_dataset(EXPORT)` loads
the export as it is, and its text the naming scheme below. Arrays are .npy read with allow_pickle=False.
The export goes to a local folder or any fsspec URL (s3://, gs://, ...), the shards written through fsspec.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np

from .basis import BASIS_ARRAYS
from .format import FORMAT_NAME, StoreError, check_manifest, geometry_of
from .location import filesystem, is_url, write_atomic
from .lock import LOCK_FILE
from .reader import ClipArrays, Store

SHARD_FOLDER = "data"  # Hugging Face's layout: the data files in their own folder, the card beside it
SHARD_PATTERN = f"{SHARD_FOLDER}/shard-%06d.tar"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


EXPORT_MARK = ".re2pix-export.json"  # written first, removed after manifest.json: an export in progress
EXPORT_FILES = ("manifest.json", "pca.npz", "README.md", EXPORT_MARK)  # besides the shards
_SHARD_NAME = re.compile(rf"(?:{SHARD_FOLDER}/)?shard-\d{{6}}\.tar")  # exports made before: beside the manifest
_NPY = ("latents.npy", "features.npy", "pred_features.npy")


def export_webdataset(
    store: Store,
    out_dir: str,
    channels: int | None = None,
    shard_size_mb: float = 300.0,
    progress: bool = True,
    overwrite: bool = False,
    storage_options: dict | None = None,
) -> list[str]:
    """Write every valid clip row of `store` into tar shards of about `shard_size_mb` under `out_dir` (a folder
    or an fsspec URL). `out_dir` must be new, empty, an unfinished export of the same store and settings
    (resumed after its last finished shard), or an earlier export (replaced only with `overwrite`)."""
    import webdataset as wds
    from tqdm.auto import tqdm

    from .copy import absolute_url

    c = store._channels(channels)  # refused before anything is written, like a damaged basis
    _ = store.basis  # loaded (and checked) now; written beside the shards at the end
    fs, root = filesystem(out_dir, storage_options)
    with_pred = store.has_pred_features
    source = absolute_url(store.location)
    settings = {
        "source_store": source,
        "pca_fingerprint": store.pca_fingerprint,
        "channels": c,
        "shard_size_mb": shard_size_mb,
        "pred_features": store.pred_features_fingerprint if with_pred else None,
    }
    shards, count = _claim(fs, root, out_dir, overwrite, settings)  # shards finished by a killed export
    if shards:
        print(f"resuming the export to {out_dir}: {len(shards)} shards ({count} samples) already written")
    fs.makedirs(f"{root}/{SHARD_FOLDER}", exist_ok=True)

    def record():  # the finished shards, so that a killed export resumes after the last of them
        write_atomic(fs, f"{root}/{EXPORT_MARK}", json.dumps(dict(settings, shards=shards, samples=count)).encode())

    record()
    limit, current, sink, f, size = int(shard_size_mb * 2**20), None, None, None, 0
    rows = [(i, v) for i in range(len(store)) for v in range(store.num_variants)]
    try:
        for i, v in tqdm(rows[count:], desc="export", unit="clip", disable=not progress):
            clip = store.read_clip(i, channels=c, variant=v, with_pred=with_pred)
            sample = {
                "__key__": clip.clip_id,
                "latents.npy": _npy(clip.latents),
                "features.npy": _npy(clip.features),
                "json": json.dumps(clip.meta).encode(),
            }
            if with_pred:
                sample["pred_features.npy"] = _npy(clip.pred_features)
            if sink is None or size >= limit:  # the next shard, through fsspec (local or remote alike)
                if sink is not None:
                    sink.close()
                    f.close()
                    shards.append(current)
                    record()
                current = SHARD_PATTERN % len(shards)
                f = fs.open(f"{root}/{current}", "wb")
                sink, size = wds.TarWriter(f, mtime=0), 0
            size += sink.write(sample)
            count += 1
        if sink is not None:
            sink.close()
            f.close()
            shards.append(current)
    except BaseException:
        if sink is not None and current not in shards:  # unfinished, not in the mark: dropped (a rerun redoes it)
            _abandon(sink, f, fs, f"{root}/{current}")
        raise
    _write_companions(fs, root, store, source, c, shards, count, with_pred)
    fs.rm(f"{root}/{EXPORT_MARK}")
    return [f"{out_dir.rstrip('/')}/{s}" for s in shards]


def _abandon(sink, f, fs, path: str) -> None:
    """Drop an unfinished shard without flushing it: on a full disk a flush fails again (and tarfile would try
    once more when collected, printing a traceback at exit)."""
    sink.tarstream.closed = sink.tarstream.fileobj.closed = True
    with contextlib.suppress(OSError):
        f.close()
    with contextlib.suppress(OSError):
        fs.rm(path)


def _write_companions(
    fs, root: str, store: Store, source: str, c: int, shards: list[str], count: int, with_pred: bool
) -> None:
    """pca.npz (the basis), README.md (the naming scheme), then manifest.json: what makes the export whole."""
    basis = store.basis
    buf = io.BytesIO()
    np.savez(buf, **{name: np.asarray(getattr(basis, name), np.float32) for name in BASIS_ARRAYS})
    write_atomic(fs, f"{root}/pca.npz", buf.getvalue())
    write_atomic(fs, f"{root}/README.md", _readme(store, source, c, len(shards), count, with_pred).encode())
    manifest = dict(
        store.manifest,
        webdataset={
            "channels": c,
            "shards": shards,
            "samples": count,
            "source_store": source,
            "has_pred_features": with_pred,
            "pca_file": "pca.npz",
        },
    )
    write_atomic(fs, f"{root}/manifest.json", json.dumps(manifest, indent=1).encode())


def _readme(store: Store, source: str, c: int, shards: int, count: int, with_pred: bool) -> str:
    """The export's dataset card: a YAML header for Hugging Face `datasets`, then the naming scheme."""
    g = store.geometry
    h, w = g.feature_hw
    split = store.manifest.get("split")
    split = split if isinstance(split, str) and re.fullmatch(r"\w+", split) else "train"
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": split, "path": f"{SHARD_FOLDER}/*.tar"}]}],
        "dataset_info": {"features": _features(g, c, with_pred)},
    }
    return "\n".join(
        [
            "---",
            _yaml(header).rstrip("\n"),
            "---",
            f"# re2pix WebDataset export of {store.manifest.get('dataset')} / {store.manifest.get('split')}",
            "",
            f"Exported from `{source}` (PCA basis `{store.pca_fingerprint}`): {count} samples in {shards} shards.",
            "",
            "## Naming scheme",
            "",
            "- `data/shard-NNNNNN.tar`: tar shards numbered from 000000, each a few hundred MB; samples in store order",
            "- a sample is one clip row; its key is the clip id (`[A-Za-z0-9_-]`, `-hflip` for a flipped variant),",
            "  and its members are (the WebDataset convention names a column after the member's extension, and",
            "  readers decode `.npy` by it, so these column names keep their `.npy`):",
            f"  - `KEY.latents.npy`: float16 {list(g.latents_shape)}, normalized WAN2.1-VAE posterior means",
            f"  - `KEY.features.npy`: float16 [{g.latent_frames}, {h}, {w}, {c}], the first {c} PCA channels of the "
            "DINOv2 features of frames 0, 4, ..., 24",
            *(
                [
                    f"  - `KEY.pred_features.npy`: float16 [{g.future_latents}, {h}, {w}, {c}], "
                    f"Stage 1 rollouts of latents {g.context_latents}..{g.latent_frames - 1}"
                ]
                if with_pred
                else []
            ),
            "  - `KEY.json`: clip_id, scene, start, timestamps (seconds), variant",
            "- `manifest.json`: the store's manifest (encoders, geometry, PCA fingerprint, counts) and `webdataset`",
            "  (channels, the list of shards, samples, the absolute URL of the source store)",
            "- `pca.npz`: the PCA basis (mean, std, components, explained_variance; float32; `np.load(...,",
            "  allow_pickle=False)`); `pipeline.store.basis.PCABasis(**arrays).fingerprint` equals the manifest's",
            "",
            "## Reading it",
            "",
            "```python",
            "import datasets, numpy as np  # the header above: Array4D float16 columns of the shapes listed",
            f"ds = datasets.load_dataset(EXPORT, split={split!r})",
            "arrays = ['latents.npy', 'features.npy']  # numpy's format casts to float32 unless told the dtype",
            "ds = ds.with_format('numpy', columns=arrays, dtype=np.float16, output_all_columns=True)",
            "shards = datasets.load_dataset('webdataset', data_dir=EXPORT + '/data')  # the shards alone",
            "",
            "import webdataset as wds  # plain webdataset; from a bucket, a `pipe:` opener streams each shard",
            f"urls = 'pipe:aws s3 cp s3://BUCKET/EXPORT/data/shard-{{000000..{max(shards - 1, 0):06d}}}.tar -'",
            "samples = wds.WebDataset(urls, shardshuffle=False).decode()  # add --endpoint-url URL for other S3s",
            "```",
            "",
            "re2pix reads it with `pipeline.store.wds.iter_webdataset(shard_urls(URL))` and trains on it with "
            "`--store URL`; `.npy` files are plain NumPy arrays, never pickles.",
            "",
        ]
    )


def _features(g, c: int, with_pred: bool) -> list[dict]:
    """The samples' columns as `datasets` declares them (dataset_info.features)."""
    h, w = g.feature_hw

    def array(shape):
        return {f"array{len(shape)}_d": {"shape": list(shape), "dtype": "float16"}}

    out = [{"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]
    out.append({"name": "latents.npy", "dtype": array(g.latents_shape)})
    out.append({"name": "features.npy", "dtype": array((g.latent_frames, h, w, c))})
    if with_pred:
        out.append({"name": "pred_features.npy", "dtype": array((g.future_latents, h, w, c))})
    meta = [{"name": k, "dtype": t} for k, t in (("clip_id", "string"), ("scene", "string"), ("start", "int64"))]
    meta += [{"name": "timestamps", "list": "float64"}, {"name": "variant", "dtype": "string"}]
    return [*out, {"name": "json", "struct": meta}]


def _yaml(x, indent: int = 0) -> str:
    """Block YAML of dicts, lists and scalars (JSON-quoted strings): the card header, without a YAML library."""
    pad = " " * indent
    if isinstance(x, dict):
        out = ""
        for k, v in x.items():
            if isinstance(v, (dict, list)):
                out += f"{pad}{k}:\n{_yaml(v, indent + 2)}"
            else:
                out += f"{pad}{k}: {json.dumps(v)}\n"
        return out
    out = ""
    for v in x:
        item = _yaml(v, indent + 2) if isinstance(v, (dict, list)) else f"{pad}  {json.dumps(v)}\n"
        out += f"{pad}- {item.lstrip()}"
    return out


def _claim(fs, root: str, out_dir: str, overwrite: bool, settings: dict) -> tuple[list[str], int]:
    """Refuse a target that holds anything but an export of ours; clear ours only with `overwrite`. Returns the
    finished shards and their samples of an unfinished export of the same store and settings (to resume)."""
    if not fs.exists(root):
        return [], 0
    if not fs.isdir(root):
        raise StoreError(f"{out_dir} is a file, not a folder: refusing to export there")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    names = [n for n in names if n != LOCK_FILE]  # this export's own lock
    if not names:
        return [], 0
    ours = EXPORT_MARK in names or _is_export_manifest(fs, f"{root}/manifest.json")
    if not ours:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise StoreError(
            f"{out_dir} is not empty and is not a re2pix WebDataset export (it holds {shown}): "
            "refusing to write there, with or without --overwrite; choose a new or empty folder"
        )
    if overwrite:
        _remove_export(fs, root)
        return [], 0
    if EXPORT_MARK not in names:
        raise StoreError(f"{out_dir} already holds a WebDataset export; pass --overwrite to replace it")
    try:
        mark = json.loads(fs.cat_file(f"{root}/{EXPORT_MARK}"))
    except (OSError, ValueError):
        mark = {}
    if {k: mark.get(k) for k in settings} != settings or not _int_in(mark.get("samples"), 0, 1 << 40):
        raise StoreError(
            f"{out_dir} holds an unfinished export of another store or with other settings (channels, "
            "shard size): pass --overwrite to replace it"
        )
    shards = mark.get("shards")
    if not (isinstance(shards, list) and shards == [SHARD_PATTERN % k for k in range(len(shards))]):
        raise StoreError(f"{root}/{EXPORT_MARK} is damaged: pass --overwrite to export again")
    return shards, mark["samples"]


def _is_export_manifest(fs, path: str) -> bool:
    try:
        m = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("format") == FORMAT_NAME and isinstance(m.get("webdataset"), dict)


def _remove_export(fs, root: str) -> None:
    """Delete an export's own files (its shards, manifest.json, the in-progress mark), nothing else."""
    for folder in (f"{root}/{SHARD_FOLDER}", root):
        if not fs.isdir(folder):
            continue
        for p in fs.ls(folder, detail=False):
            name = p.rstrip("/")[len(root) :].strip("/")
            if _SHARD_NAME.fullmatch(name) or name in EXPORT_FILES:
                fs.rm(p)
        if not fs.ls(folder, detail=False):
            fs.rmdir(folder)


def reading_filesystem(location: str, storage_options: dict | None = None):
    """(filesystem, root) for reading a finished export: one instance per process and options (fsspec's
    instance cache, which a forked worker does not inherit), so one session, not one per file: a new S3
    session costs more than the small reads it serves. No listing cache: what a listing said may change."""
    import fsspec

    location = str(location).removeprefix("file://")
    if not is_url(location):
        return filesystem(location)
    return fsspec.core.url_to_fs(location, **{**(storage_options or {}), "use_listings_cache": False})


def read_wds_manifest(out_dir: str, storage_options: dict | None = None) -> dict:
    """The export's manifest, with every size in it bounds-checked before anything is allocated."""
    fs, root = reading_filesystem(out_dir, storage_options)
    path = f"{root}/manifest.json"
    try:
        manifest = json.loads(fs.cat_file(path))
    except FileNotFoundError as e:
        raise StoreError(f"{out_dir} has no manifest.json: not a re2pix WebDataset export") from e
    except (ValueError, OSError) as e:
        raise StoreError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} is not a re2pix WebDataset manifest (not a JSON object)")
    check_manifest(manifest, out_dir)
    g = geometry_of(manifest, path)
    w, counts, variants = manifest.get("webdataset"), manifest.get("counts"), manifest.get("variants")
    if not isinstance(w, dict) or not isinstance(counts, dict) or not isinstance(variants, list):
        raise StoreError(f"{path} lacks its webdataset, counts or variants entries: not a re2pix export")
    rows = counts.get("clips", 0) * len(variants) if isinstance(counts.get("clips"), int) else -1

    def bad(what):
        return StoreError(f"{path}: {what}; refusing the export (a damaged or forged manifest)")

    if not _int_in(w.get("channels"), 1, g.num_pca_channels):
        raise bad(f"webdataset.channels is {_short(w.get('channels'))}, the geometry has 1..{g.num_pca_channels}")
    if not _int_in(w.get("samples"), 0, max(rows, 0)):
        raise bad(f"webdataset.samples is {_short(w.get('samples'))}, the store had {rows} clip rows")
    shards = w.get("shards")
    if not (
        isinstance(shards, list)
        and len(shards) <= max(1, w["samples"])
        and all(isinstance(x, str) and _SHARD_NAME.fullmatch(x) for x in shards)
    ):
        raise bad(f"webdataset.shards must list at most one shard-NNNNNN.tar per sample ({_short(shards)})")
    return manifest


def _int_in(x, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def shard_urls(out_dir: str, storage_options: dict | None = None) -> list[str]:
    base = out_dir.rstrip("/")
    return [f"{base}/{s}" for s in read_wds_manifest(out_dir, storage_options)["webdataset"]["shards"]]


def read_wds_basis(out_dir: str, storage_options: dict | None = None):
    """The PCA basis the export carries (pca.npz), checked against the manifest's fingerprint. The trainer
    does not need it (it trains on PCA features); users of the shards call it to un-project features."""
    from .basis import PCABasis

    manifest = read_wds_manifest(out_dir, storage_options)
    fs, root = reading_filesystem(out_dir, storage_options)
    try:
        with np.load(io.BytesIO(fs.cat_file(f"{root}/pca.npz")), allow_pickle=False) as z:
            basis = PCABasis(**{name: np.asarray(z[name], np.float32) for name in BASIS_ARRAYS})
    except (OSError, KeyError, ValueError) as e:
        raise StoreError(f"{out_dir}/pca.npz is missing or unreadable ({type(e).__name__}: {e})") from e
    if basis.fingerprint != manifest["pca"]["fingerprint"]:
        raise StoreError(
            f"{out_dir}/pca.npz hashes to {basis.fingerprint[:12]}, the manifest says "
            f"{str(manifest['pca']['fingerprint'])[:12]}: the basis was swapped or damaged"
        )
    return basis


def _check_member(name: str, shard: str) -> None:
    # nothing is extracted to disk, but a member that tries to leave its folder is a forged shard
    if name.startswith("/") or ".." in name.split("/") or "/" in name:
        raise StoreError(f"{shard}: tar member {name!r} is not a plain file name; refusing the shard")


def export_folder(shard_url: str) -> str:
    """The export folder of a shard: the folder holding data/ (or, for exports made before, the shard)."""
    folder = posixpath.dirname(shard_url.rstrip("/")) or "."
    return (posixpath.dirname(folder) or ".") if posixpath.basename(folder) == SHARD_FOLDER else folder


def expected_shapes(folder: str, storage_options: dict | None = None) -> dict[str, tuple] | None:
    """The array shapes an export's samples must have, from its manifest.json (None for bare shards)."""
    fs, root = reading_filesystem(folder, storage_options)
    if not fs.exists(f"{root}/manifest.json"):
        return None
    return manifest_shapes(read_wds_manifest(folder, storage_options), folder)


def manifest_shapes(m: dict, folder: str) -> dict[str, tuple]:
    """The sample shapes of the export whose (checked) manifest is `m`."""
    g, c = geometry_of(m, folder), m["webdataset"]["channels"]
    h, w = g.feature_hw
    return {
        "latents.npy": g.latents_shape,
        "features.npy": (g.latent_frames, h, w, c),
        "pred_features.npy": (g.future_latents, h, w, c),
    }


def _load_npy(data: bytes, shard: str, member: str, shape: tuple | None) -> np.ndarray:
    """A float16 array from .npy bytes: header checked (dtype, shape, size) before any allocation,
    never a pickle. Errors name the shard and the member."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        got, fortran, dtype = read_header(f)
    except (ValueError, OSError, EOFError) as e:
        raise StoreError(f"{shard}: member {member} is not a valid .npy file ({e})") from e
    if dtype != np.float16:
        raise StoreError(f"{shard}: member {member} holds {dtype} values, a store's arrays are float16")
    if (shape is not None and tuple(got) != tuple(shape)) or len(got) != 4:
        raise StoreError(
            f"{shard}: member {member} has shape {list(got)}, the export's manifest says "
            f"{list(shape) if shape else '4 axes'}"
        )
    n = 2
    for s in got:
        n *= s
    if len(data) - f.tell() != n:
        raise StoreError(f"{shard}: member {member} holds {len(data) - f.tell()} bytes of data, its header says {n}")
    a = np.frombuffer(data, np.float16, offset=f.tell())
    return a.reshape(got, order="F" if fortran else "C").copy()


def decode_sample(sample: dict, shard: str = "?", shapes: dict | None = None) -> ClipArrays:
    """A raw WebDataset sample (bytes per extension) -> ClipArrays. No pickle is ever loaded; with `shapes`
    (from the export's manifest) every array must have its shape."""
    key = sample.get("__key__", "?")
    for k in sample:
        if not k.startswith("__"):
            _check_member(f"{key}.{k}", shard)
    missing = [m for m in ("json", "latents.npy", "features.npy") if m not in sample]
    if missing:
        raise StoreError(f"{shard}: sample {key} lacks {', '.join(f'{key}.{m}' for m in missing)}")

    def arr(ext):
        return _load_npy(sample[ext], shard, f"{key}.{ext}", (shapes or {}).get(ext))

    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        raise StoreError(f"{shard}: member {key}.json is not JSON ({e})") from e
    if not isinstance(meta, dict):
        raise StoreError(f"{shard}: member {key}.json is not a JSON object")
    return ClipArrays(
        key,
        arr("features.npy"),
        arr("latents.npy"),
        meta,
        arr("pred_features.npy") if "pred_features.npy" in sample else None,
    )


_LOOK_UP = object()  # iter_shard's shapes: read them from the export's manifest.json


def iter_shard(url: str, storage_options: dict | None = None, shapes=_LOOK_UP) -> Iterator[ClipArrays]:
    """Stream one tar shard (local path or URL) without extracting it; its samples are checked against
    `shapes` (expected_shapes), by default those of its export's manifest.json when there is one. A stream
    that opens many shards passes the shapes it read once; remote shards open through reading_filesystem."""
    if shapes is _LOOK_UP:
        shapes = expected_shapes(export_folder(url), storage_options)
    if is_url(url):
        opener = reading_filesystem(url, storage_options)[0].open(url, "rb")
    else:
        opener = open(url, "rb")
    try:
        with opener as f, tarfile.open(fileobj=f, mode="r|") as tar:
            sample: dict = {}
            for member in tar:
                if not member.isfile():
                    raise StoreError(f"{url}: tar member {member.name!r} is not a regular file")
                _check_member(member.name, url)
                if "." not in member.name:
                    raise StoreError(f"{url}: tar member {member.name!r} has no extension: not a sample's file")
                key, ext = member.name.split(".", 1)
                if sample and sample["__key__"] != key:
                    yield decode_sample(sample, url, shapes)
                    sample = {}
                sample["__key__"] = key
                sample[ext] = tar.extractfile(member).read()
            if sample:
                yield decode_sample(sample, url, shapes)
    except (tarfile.TarError, EOFError) as e:
        raise StoreError(f"{url}: the shard is damaged ({type(e).__name__}: {e})") from e
    except FileNotFoundError as e:
        raise StoreError(f"{url}: no such shard") from e


def iter_webdataset(urls: Iterable[str], storage_options: dict | None = None) -> Iterator[ClipArrays]:
    """Every clip of the shards at `urls` (shard_urls(folder) lists an export's), in order. The trainer streams
    shards one at a time with iter_shard (model/data.py); this is the reader the export's card names for users."""
    for url in urls:
        yield from iter_shard(url, storage_options)
