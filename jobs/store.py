"""Store tools: `python -m jobs.store {info,verify,check,export-wds,copy,card,upgrade,diagnose} ...`.

info URL            what a store holds: dataset, geometry, encoders, PCA basis, counts, failures
verify URL          read every row the store holds: decoding, missing chunks, NaN/Inf, recorded digests,
                    the PCA basis against its fingerprint; lists bad rows (array, row, reason), exit 1
check URL URL ...   are these stores compatible (can one training run read them together)?
export-wds URL OUT  write WebDataset tar shards of the store (optionally the first --channels) to a folder
                    or any fsspec URL (s3://..., gs://...)
copy SRC DST        copy a store between fsspec locations (local, s3://, gs://, hf://datasets/..., http(s)
                    as a source): --channels C keeps the first C PCA channels (a prefix of the basis,
                    readable with the original), --compression re-encodes (lossy: +trimK, +int8);
                    resumable after a kill, verified as it goes
card URL            write README.md and card.json into the store: what it holds, licence, how to read it
upgrade URL         give a store written before them its arrays' dimension names and descriptions, clips.parquet
                    and consolidated metadata (metadata only: no chunk is rewritten), for xarray, pandas, DuckDB
diagnose URL ...    latent temporal distance curve, per-channel latent and feature statistics: a table
                    (one column per store) and a PNG (--png), to compare VAEs and encoders side by side
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.cli import HelpFormatter, run
from pipeline.store.format import StoreError
from pipeline.store.lock import locked
from pipeline.store.lossy import parse_compression
from pipeline.store.reader import Store, open_stores


def _size(location: str, storage_options: dict | None = None) -> str:
    from pipeline.store.location import filesystem

    fs, root = filesystem(location, storage_options)
    try:
        total = fs.du(root)
    except (OSError, NotImplementedError):
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if total < 1024:
            return f"{total:.1f} {unit}"
        total /= 1024
    return f"{total:.1f} PB"


def info(store: Store) -> str:
    m, g = store.manifest, store.geometry
    enc = m.get("encoders", {})
    lines = [
        f"store      {store.location}  ({_size(store.location, store.storage_options)} on disk)",
        (
            f"format     {m['format']} v{m['format_version']}, written by re2pix {m.get('pipeline_version')} "
            f"({m.get('created', '?')} .. {m.get('finished', '?')})"
        ),
        f"dataset    {m.get('dataset')} / {m.get('split')} at {m.get('fps')} fps from {m.get('source_root')}",
        (
            f"clips      {len(store)} usable of {m['counts']['clips']} indexed ({m['counts'].get('failed_clips', 0)} "
            f"failed), variants {store.variants}, stride {m.get('clip_stride')}"
        ),
        f"frames     {m['counts']['frames']} feature frames (shared by overlapping clips)",
        (
            f"geometry   {g.clip_frames} frames ({g.context_frames} context) -> latents {list(g.latents_shape)}, "
            f"features {list(g.features_shape)}"
        ),
    ]
    for name, d in sorted(enc.items()):
        lines.append(
            f"encoder    {name}: {d.get('weights_id')} sha256 {str(d.get('sha256', '?'))[:12]} "
            f"input {d.get('input_size')}"
        )
    lines.append(
        f"pca        {m['pca']['num_components']} of {m['pca']['feature_dim']} dims, fingerprint "
        f"{m['pca']['fingerprint'][:16]}"
    )
    lines.append(f"storage    compression {m.get('compression')}, channel chunk {m.get('channel_chunk')}")
    if store.pred_features_fingerprint:
        state = "complete" if store.has_pred_features else "unfinished"
        lines.append(f"rollouts   clips/pred_features from checkpoint {store.pred_features_fingerprint[:12]} ({state})")
    for f in store.failures()[:10]:
        lines.append(f"failed     {f['clip_id'] or 'ignored'}: {f['file']}: {f['reason']}")
    if len(store.failures()) > 10:
        lines.append(f"failed     ... and {len(store.failures()) - 10} more (`info --json` lists all)")
    return "\n".join(lines)


def verify(store: Store, as_json: bool) -> int:
    report = store.verify(progress=not as_json and sys.stderr.isatty())
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        for b in report["bad_rows"]:
            where = f"{b['array']}[{b['row']}]" if b["row"] is not None else b["array"]
            print(f"BAD {where}: {b['reason']}")
        rows = ", ".join(f"{n} {a}" for a, n in report["checked"].items())
        verdict = "OK" if report["ok"] else f"{len(report['bad_rows'])} problems"
        print(
            f"{store.location}: {verdict} (checked {rows}; {report['rows_without_digest']} rows had no recorded "
            "digest and were checked for decoding, presence and finite values only)"
        )
    return 0 if report["ok"] else 1


def check(locations: list[str], storage_options: dict | None = None) -> str:
    from pipeline.store.verify import basis_problems

    stores = open_stores(locations, storage_options)
    for s in stores:  # the fingerprint is what makes stores compatible: it must describe the basis they hold
        problems = basis_problems(s)
        if problems:
            raise StoreError(f"{s.location}: {problems[0]['array']}: {problems[0]['reason']}")
    return (
        f"compatible: {len(stores)} stores, {sum(len(s) for s in stores)} clips, PCA {stores[0].pca_fingerprint[:12]}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.store", description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    remote = argparse.ArgumentParser(add_help=False)  # the reading commands' fsspec options
    remote.add_argument(
        "--storage-options", type=json.loads, default=None, help="fsspec options as JSON (e.g. an S3 endpoint)"
    )
    a = sub.add_parser("info", help="describe a store", parents=[remote], formatter_class=HelpFormatter)
    a.add_argument("store", help="store path or URL")
    a.add_argument("--json", action="store_true", help="print the manifest and failures as JSON")
    a.add_argument("--allow-incomplete", action="store_true", help="describe an unfinished store too")
    a = sub.add_parser(
        "verify",
        help="read and check every row; exit 1 when any is bad",
        parents=[remote],
        formatter_class=HelpFormatter,
    )
    a.add_argument("store", help="store path or URL")
    a.add_argument("--json", action="store_true", help="print the report as JSON (bad_rows: array, row, reason)")
    a = sub.add_parser(
        "check", help="check that stores can be read together", parents=[remote], formatter_class=HelpFormatter
    )
    a.add_argument("stores", nargs="+", help="store paths or URLs")
    a = sub.add_parser("export-wds", help="export WebDataset shards", formatter_class=HelpFormatter)
    a.add_argument("store", help="store path or URL")
    a.add_argument("out", help="folder or URL of the shards")
    a.add_argument("--channels", type=int, default=None, help="keep only the first C PCA channels")
    a.add_argument("--shard-size-mb", type=float, default=300.0, help="size of one shard")
    a.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT")
    a.add_argument(
        "--storage-options", type=json.loads, default=None, help="fsspec options of OUT as JSON (e.g. an S3 endpoint)"
    )
    a = sub.add_parser(
        "copy",
        help="copy a store (a channel prefix, another compression) between locations",
        formatter_class=HelpFormatter,
    )
    a.add_argument("src", help="the store to copy (path or URL)")
    a.add_argument("dst", help="where the copy goes (path or URL)")
    a.add_argument("--channels", type=int, default=None, help="keep only the first C PCA channels")
    a.add_argument(
        "--compression",
        default=None,
        help="CODEC[:LEVEL][+trimK|+int8], CODEC in none, blosc-lz4, blosc-zstd, zstd (default: the source's)",
    )
    a.add_argument("--rows-per-unit", type=int, default=16, help="rows per resumable work unit")
    a.add_argument("--src-options", type=json.loads, default=None, help="fsspec options of SRC as JSON")
    a.add_argument("--dst-options", type=json.loads, default=None, help="fsspec options of DST as JSON")
    a.add_argument("--overwrite", action="store_true", help="replace a finished store, or another unfinished one")
    a = sub.add_parser(
        "upgrade",
        help="dimension names, clips.parquet, consolidated metadata",
        parents=[remote],
        formatter_class=HelpFormatter,
    )
    a.add_argument("store", help="store path or URL")
    a = sub.add_parser(
        "card", help="write README.md and card.json into a store", parents=[remote], formatter_class=HelpFormatter
    )
    a.add_argument("store", help="store path or URL")
    a = sub.add_parser(
        "diagnose",
        help="latent temporal distance, per-channel latent and feature statistics",
        parents=[remote],
        formatter_class=HelpFormatter,
    )
    a.add_argument("stores", nargs="+", help="store paths or URLs, compared in one figure")
    a.add_argument("--max-clips", type=int, default=256, help="clips read per store, evenly spread (0: all)")
    a.add_argument("--png", default="diagnose.png", help="where to write the figure")
    a.add_argument("--json", action="store_true", help="print the reports as JSON instead of the table")
    args = p.parse_args(argv)
    if args.cmd == "info":
        store = Store(args.store, args.storage_options, allow_incomplete=args.allow_incomplete)
        if args.json:
            print(json.dumps({"manifest": store.manifest, "failures": store.failures()}, indent=1))
        else:
            print(info(store))
    elif args.cmd == "verify":
        return verify(Store(args.store, args.storage_options), args.json)
    elif args.cmd == "check":
        print(check(args.stores, args.storage_options))
    elif args.cmd == "export-wds":
        from pipeline.store.wds import export_webdataset

        with locked(args.out, "jobs.store export-wds", args.storage_options):  # one export into OUT at a time
            shards = export_webdataset(
                Store(args.store),
                args.out,
                args.channels,
                args.shard_size_mb,
                progress=sys.stderr.isatty(),
                overwrite=args.overwrite,
                storage_options=args.storage_options,
            )
        print(f"wrote {len(shards)} shards, manifest.json, pca.npz and README.md to {args.out}")
    elif args.cmd == "copy":
        import shlex

        from pipeline.store.copy import copy_store, refuse_self_copy

        try:
            parse_compression(args.compression or "zstd")  # an unknown spec is the user's error: one line
        except ValueError as e:
            raise StoreError(str(e)) from e
        # how the copy was made, for its card: the locations and settings, never the fsspec options (credentials)
        command = " ".join(
            shlex.quote(x)
            for x in ["python -m jobs.store copy", args.src, args.dst]
            + (["--channels", str(args.channels)] if args.channels else [])
            + (["--compression", args.compression] if args.compression else [])
        )
        refuse_self_copy(args.src, args.dst)  # before the lock goes into it
        with locked(args.dst, "jobs.store copy", args.dst_options):  # one writer per store
            summary = copy_store(
                args.src,
                args.dst,
                channels=args.channels,
                compression=args.compression,
                src_options=args.src_options,
                dst_options=args.dst_options,
                rows_per_unit=args.rows_per_unit,
                overwrite=args.overwrite,
                progress=sys.stderr.isatty(),
                command=command.replace("'python -m jobs.store copy'", "python -m jobs.store copy"),
            )
        print(json.dumps(summary))
    elif args.cmd == "card":
        from pipeline.store.card import write_card

        card = write_card(args.store, args.storage_options)
        print(
            f"wrote README.md and card.json into {args.store} ({card['holds']['usable_clips']} clips, "
            f"{card['holds']['bytes'] / 2**20:.1f} MiB)"
        )
    elif args.cmd == "upgrade":
        from pipeline.store.describe import publish

        Store(args.store, args.storage_options)  # a finished store of ours, or one line saying why not
        done = publish(args.store, args.storage_options)
        print(
            f"{args.store}: {done['arrays_described']} arrays and groups described, clips.parquet "
            f"({done['clip_table_rows']} rows) and consolidated metadata written"
        )
    elif args.cmd == "diagnose":
        from pipeline.store import diagnose as d

        reports = [d.diagnose(Store(s, args.storage_options), args.max_clips or None) for s in args.stores]
        print(json.dumps(reports, indent=1) if args.json else d.table(reports))
        print(f"figure: {d.plot_png(reports, args.png)}", file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    writes = sys.argv[1:2] in (["copy"], ["export-wds"])  # the commands that resume where they stopped
    sys.exit(run(main, resume_hint="rerun the same command to resume" if writes else None))
