"""`python -m jobs.bench loader`: the trainer's data side on a local store at the paper's geometry.

Prints, from one run and measured in it:
1. clips/s per core of the loader (ClipStream through a DataLoader, 0 workers and 1 worker) at 1152
   and 256 feature channels, next to plain reads of the same arrays: raw Zarr reads (one basic slice
   per feature frame, one per latent row) and the store reader's own calls (Store.read_features +
   read_latents); and features alone at 256 vs 1152 channels;
2. the data-side cost of one training sample from the store against decoding its 7 frames (2048x1024
   PNG) and running DINOv2-Reg ViT-B/14 (real size, random weights) at 448x784 + the PCA projection
   online, as the reference trainer does.

"Per core": torch, Blosc and Zarr's decode pool are limited to one thread each, and rates are clips per
CPU-second of every process involved (the main one and any DataLoader worker); wall-clock rates are
printed beside them. The store holds random float16 data, written through the real writer with its
default compression; reads are timed from the page cache after a warm-up pass.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1e6


# ---- the store ------------------------------------------------------------------------------------
def write_paper_store(path: Path, clips: int, seed: int = 0) -> dict:
    """`clips` clips at the paper geometry (scenes of 37 frames, stride 4: 4 clips and 10 feature frames
    each), random float16 arrays, written through StoreWriter with its default compression."""
    from pipeline.clips import build_clip_index
    from pipeline.sources.base import FrameRef, Source
    from pipeline.store.basis import PCABasis
    from pipeline.store.geometry import PAPER
    from pipeline.store.writer import StoreWriter

    per_scene = 4
    scenes = -(-clips // per_scene)

    class BenchSource(Source):  # only the frame bookkeeping matters to the store
        name, root, split, fps = "bench", "mem://bench", "train", 10.0

        def scenes(self):
            return [f"scene-{i:03d}" for i in range(scenes)]

        def frames(self, scene):
            n = PAPER.clip_frames + (per_scene - 1) * 4
            return [FrameRef(i, i / self.fps, f"{scene}/{i:04d}") for i in range(n)]

        def read_frame(self, scene, frame):
            raise NotImplementedError

    g = PAPER
    index = build_clip_index(BenchSource(), g, stride=4, progress=False)
    index.clips[:] = index.clips[:clips]
    used = sorted({r for c in index.clips for r in c.feature_rows})
    assert used == list(range(len(used)))  # clips are cut from the end: the frames they use come first
    del index.frames[len(used):]
    rng = np.random.default_rng(seed)
    d, c = g.feature_dim, g.num_pca_channels
    basis = PCABasis(np.zeros(d, np.float32), np.ones(d, np.float32), np.eye(c, d, dtype=np.float32),
                     np.ones(c, np.float32))
    w = StoreWriter.create(str(path), index=index, geometry=g, basis=basis, source_info=BenchSource().describe(),
                           encoders={"dinov2": {"name": "bench"}, "vae": {"name": "bench"}},
                           latent_norm={"mean": [0.0] * 16, "std": [1.0] * 16}, overwrite=True)
    t0 = time.perf_counter()
    for r in range(len(index.frames)):
        w.write_features(r, rng.standard_normal(g.features_shape[1:], np.float32).astype(np.float16))
    for r in range(len(index.clips)):
        w.write_latents(r, rng.standard_normal(g.latents_shape, np.float32).astype(np.float16))
    w.mark_unit_done("unit-000000", clip_rows=range(len(index.clips)), frame_rows=range(len(index.frames)))
    w.finalize(["unit-000000"])
    raw = 2 * (len(index.frames) * int(np.prod(g.features_shape[1:]))
               + len(index.clips) * int(np.prod(g.latents_shape)))
    return {"clips": len(index.clips), "frame_rows": len(index.frames), "raw_bytes": raw,
            "disk_bytes": _du(path), "write_s": time.perf_counter() - t0,
            "compression": w.manifest["compression"], "channel_chunk": w.manifest["channel_chunk"]}


def _du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


def raw_pass(store) -> float:
    """Read every clip's 7 feature frames (all channels) and latents once; clips/s."""
    t0 = time.perf_counter()
    for i in range(len(store)):
        for r in store._feature_rows[store.row(i)]:
            store._features[int(r)]
        store._latents[store.row(i)]
    return len(store) / (time.perf_counter() - t0)


def drop_page_cache() -> str:
    """Try to empty the kernel's page cache; say what happened (needs root, may be refused)."""
    def cached_mb():
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("Cached:"))
    try:
        before = cached_mb()
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        after = cached_mb()
    except OSError as e:
        return f"could not drop the page cache ({e.strerror or e})"
    return f"dropped (page cache {before:.0f} -> {after:.0f} MB)"


# ---- timing -----------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc; 0 if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def timed(step, min_seconds: float, min_windows: int = 3, window_s: float = 0.5, children: bool = False) -> dict:
    """Call step() (returns clips done) once untimed, then in windows of >= window_s (at least one step
    each) until there are >= min_windows and >= min_seconds in all. Rates are medians over windows (robust to
    another program's bursts on a shared machine): clips per CPU-second of this process (and of its child
    processes when asked: DataLoader workers), and clips per wall-second."""
    step()  # first calls pay one-off costs (allocator growth, lazy set-up)
    pids = [os.getpid()] + (_children(os.getpid()) if children else [])
    cpu = lambda: sum(_cpu_seconds(p) for p in pids)
    windows, t_start = [], time.perf_counter()
    while len(windows) < min_windows or time.perf_counter() - t_start < min_seconds:
        c0, w0, clips = cpu(), time.perf_counter(), 0
        while not clips or time.perf_counter() - w0 < window_s:
            clips += step()
        windows.append((clips, time.perf_counter() - w0, cpu() - c0))
    clips = sum(w[0] for w in windows)
    return {"clips": clips, "windows": len(windows), "wall_s": sum(w[1] for w in windows),
            "cpu_s": sum(w[2] for w in windows), "per_s": float(np.median([c / w for c, w, _ in windows])),
            "per_cpu_s": float(np.median([c / max(u, 1e-9) for c, _, u in windows])), "processes": len(pids)}


def _cycle(n: int, seed: int = 0):
    order = np.random.default_rng(seed).permutation(n)
    k = 0
    while True:
        yield int(order[k % n])
        k += 1


def one_core() -> None:
    """torch, Blosc and Zarr's decode pool on one thread each (Zarr's pool is rebuilt if it exists)."""
    import numcodecs.blosc
    import torch
    import zarr
    import zarr.core.sync as zsync
    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    zarr.config.set({"threading.max_workers": 1})
    if zsync._executor is not None:
        zsync.cleanup_resources()


def measure_reads(location: str, channels: int, seconds: float, batch_size: int) -> dict:
    from model.data import ClipStream, make_loader
    from pipeline.store.reader import Store

    store = Store(location)
    feats, lats = store._features, store._latents
    rows = [store._feature_rows[store.row(i)] for i in range(len(store))]
    out = {}

    def raw(both):
        it = _cycle(len(store))

        def step():
            i = next(it)
            f = [feats[int(r), :, :, :channels] for r in rows[i]]  # 7 x [H, W, c]
            if both:
                lats[store.row(i)]
            return 1 if f else 0
        return step

    def api(both):
        it = _cycle(len(store))

        def step():
            i = next(it)
            store.read_features(i, channels)
            if both:
                store.read_latents(i)
            return 1
        return step

    out["raw"] = timed(raw(True), seconds)
    out["api"] = timed(api(True), seconds)
    out["raw_features"] = timed(raw(False), seconds)
    out["api_features"] = timed(api(False), seconds)
    for workers in (0, 1):
        stream = ClipStream(location, batch_size=batch_size, channels=channels, seed=0, loop=True)
        loader = iter(make_loader(stream, workers=workers, pin_memory=False))
        first = next(loader)  # start-up (worker process, store handles) is not timed
        assert first["features"].shape[-1] == channels
        step = lambda it=loader: len(next(it)["clip"])
        out[f"loader{workers}"] = timed(step, seconds, children=workers > 0)
        del loader, step  # shuts the worker down
    return out


# ---- online encoding (the reference trainer's data side) -----------------------------------------------
def write_pngs(folder: Path, n: int, hw=(1024, 2048), noise: float = 2.0) -> list[Path]:
    """n frames of a synthetic driving scene rendered at 2048x1024, with mild pixel noise so that the
    PNGs are camera-sized (a few MB) rather than flat-colour small."""
    from PIL import Image

    from pipeline.sources.synthetic import SyntheticSource
    src = SyntheticSource(num_scenes=1, frames_per_scene=4 * (n - 1) + 1, height=hw[0], width=hw[1])
    scene = src.scenes()[0]
    rng = np.random.default_rng(0)
    paths = []
    for k, frame in enumerate(src.frames(scene)[::4][:n]):
        img = src.read_frame(scene, frame).astype(np.float32) + rng.normal(0, noise, (*hw, 3)).astype(np.float32)
        p = folder / f"frame{k:02d}.png"
        Image.fromarray(np.clip(img.round(), 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def measure_online(work: Path, frames: int, dino_frames: int) -> dict:
    """Decode + resize every frame of one clip (measured), DINOv2 + PCA projection on `dino_frames` of
    them (measured), scaled to the clip's `frames`. One thread."""
    import torch
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from pipeline.encoders import load_dinov2
    from pipeline.frames import resize_frames
    from pipeline.ray_cache import Projector
    from pipeline.sources.common import read_rgb
    from pipeline.store.basis import PCABasis
    from pipeline.store.geometry import PAPER

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    pngs = write_pngs(work, frames)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4)
                             ).save_pretrained(work / "dinov2")
    encoder = load_dinov2(str(work / "dinov2"), input_hw=PAPER.dino_input_hw)  # the real local-folder path
    params = sum(p.numel() for p in encoder.model.parameters())
    rng = np.random.default_rng(0)
    d, c = PAPER.feature_dim, PAPER.num_pca_channels
    basis = PCABasis(rng.standard_normal(d).astype(np.float32), rng.uniform(0.5, 2, d).astype(np.float32),
                     (rng.standard_normal((c, d)) / np.sqrt(d)).astype(np.float32), np.ones(c, np.float32))
    project = Projector(basis, "cpu")
    encoder(np.zeros((1, 112, 196, 3), np.uint8))  # first-call set-up, at a small size

    t0 = time.process_time()
    decoded = np.stack([read_rgb(str(p)) for p in pngs])  # [7, 1024, 2048, 3]
    t_decode = time.process_time() - t0
    t0 = time.process_time()
    resized = resize_frames(decoded, PAPER.dino_input_hw)  # [7, 448, 784, 3]
    t_resize = time.process_time() - t0
    t0 = time.process_time()
    with torch.inference_mode():
        feats = encoder(resized[:dino_frames])  # [n, 32, 56, 3072]
    t_dino = time.process_time() - t0
    t0 = time.process_time()
    with torch.inference_mode():
        pca = project(feats)  # [n, 32, 56, 1152]
    t_pca = time.process_time() - t0
    assert tuple(pca.shape) == (dino_frames, *PAPER.feature_hw, c)
    scale = frames / dino_frames
    return {"frames": frames, "dino_frames": dino_frames, "png_mb": np.mean([p.stat().st_size for p in pngs]) / MB,
            "params_m": params / 1e6, "decode_s": t_decode, "resize_s": t_resize, "dino_s": t_dino * scale,
            "dino_per_frame_s": t_dino / dino_frames, "pca_s": t_pca * scale,
            "total_s": t_decode + t_resize + (t_dino + t_pca) * scale}


# ---- report -------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def bench_loader(args) -> dict:
    import numcodecs
    import torch
    import zarr

    one_core()
    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="re2pix-bench-loader-"))
    t_start = time.perf_counter()
    try:
        print(f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), {'a GPU (unused here)' if gpu else 'no GPU'}; "
              f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__}, zarr {zarr.__version__}, "
              f"numcodecs {numcodecs.__version__}")
        print("per core: torch, Blosc and Zarr's decode pool on 1 thread; clips/CPU-s counts every process "
              "involved (main + DataLoader worker)")
        location = str(work / "store.zarr")
        info = write_paper_store(Path(location), args.clips)
        print(f"\nstore: {info['clips']} clips / {info['frame_rows']} feature frames at the paper geometry "
              f"(features [7, 32, 56, 1152] f16 per clip, latents [16, 7, 54, 96] f16), random N(0,1) data, "
              f"written by StoreWriter in {info['write_s']:.1f} s, {info['compression']} "
              f"(channel chunk {info['channel_chunk']}): {info['raw_bytes'] / MB:.0f} MB raw, "
              f"{info['disk_bytes'] / MB:.0f} MB on disk ({info['raw_bytes'] / info['disk_bytes']:.2f}x)")

        from pipeline.store.reader import Store
        store = Store(location)
        clip_mb = 2 * (int(np.prod(store.geometry.features_shape)) + int(np.prod(store.geometry.latents_shape))) / MB
        drop = drop_page_cache()
        cold_note = f"page cache: {drop}"
        if drop.startswith("dropped"):
            cold = raw_pass(store)
            cold_note += (f"; one cold pass of raw reads (features 1152 + latents) after it: {cold:.1f} clips/s "
                          f"({cold * clip_mb:.0f} MB/s decoded; the VM's disk may be cached by its host)")
        print(cold_note)
        raw_pass(store)  # warm-up: every file of the store once
        print("all rates below: warm page cache (after a warm-up pass over every clip), "
              f"each timed for >= {args.seconds:g} s in >= 3 windows of >= 0.5 s, median window shown; "
              f"loader batch {args.batch_size}")

        results = {c: measure_reads(location, c, args.seconds, args.batch_size) for c in (1152, 256)}
        rows = [("features + latents", None),
                ("  raw zarr: feats[r, :, :, :c] x7 + latents[row]", "raw"),
                ("  Store.read_features + read_latents", "api"),
                ("  loader: ClipStream + DataLoader, 0 workers", "loader0"),
                ("  loader: ClipStream + DataLoader, 1 worker", "loader1"),
                ("features only", None),
                ("  raw zarr: feats[r, :, :, :c] x7", "raw_features"),
                ("  Store.read_features", "api_features")]
        print(f"\n{'per clip, warm cache':52s}{'c = 1152':>22s}{'c = 256':>22s}")
        print(f"{'':52s}{'clips/CPU-s  clips/s':>22s}{'clips/CPU-s  clips/s':>22s}")
        for label, key in rows:
            if key is None:
                print(label)
                continue
            cells = "".join(f"{results[c][key]['per_cpu_s']:11.2f}{results[c][key]['per_s']:9.2f}  "
                            for c in (1152, 256))
            print(f"{label:52s}{cells}")

        online = None
        if args.dino_frames:
            print("\nonline (reference trainer) data side, one clip, 1 thread: building DINOv2 ...", flush=True)
            online = measure_online(work, 7, args.dino_frames)
            o = online
            print(f"  decode {o['frames']} PNGs (2048x1024, synthetic + noise, {o['png_mb']:.1f} MB each)  "
                  f"{o['decode_s']:7.2f} CPU-s (all {o['frames']} measured)")
            print(f"  resize to 448x784 (bilinear, antialiased)                  {o['resize_s']:7.2f} CPU-s "
                  f"(all {o['frames']} measured)")
            print(f"  DINOv2-Reg ViT-B/14 ({o['params_m']:.0f}M params, random weights) at 448x784   "
                  f"{o['dino_s']:7.2f} CPU-s ({o['dino_per_frame_s']:.2f} s/frame measured on {o['dino_frames']} "
                  f"frame(s), x{o['frames'] / o['dino_frames']:g})")
            print(f"  PCA projection 3072 -> 1152                                {o['pca_s']:7.2f} CPU-s "
                  f"(measured on {o['dino_frames']} frame(s), x{o['frames'] / o['dino_frames']:g})")
            print(f"  total per training sample                                  {o['total_s']:7.2f} CPU-s")
            print("  WAN2.1 VAE online encode (Stage 2's reference): skipped, not measured in this run")

        # ---- goals
        r1, r2 = results[1152], results[256]
        goals = []
        for c, r in ((1152, r1), (256, r2)):
            for key, name in (("raw", "raw zarr reads"), ("api", "Store.read_*")):
                share = r["loader0"]["per_cpu_s"] / r[key]["per_cpu_s"]
                goals.append((f"loader (0 workers) >= 50% of plain read, c={c}, vs {name}", f"{100 * share:.0f}%",
                              share >= 0.5))
        for key, name in (("raw_features", "raw zarr reads"), ("api_features", "Store.read_features")):
            speed = r2[key]["per_cpu_s"] / r1[key]["per_cpu_s"]
            goals.append((f"features alone: 256 ch >= 3.5x faster than 1152, {name}", f"{speed:.2f}x", speed >= 3.5))
        cached_s = 1 / r1["loader0"]["per_cpu_s"]
        if online:
            ratio = online["total_s"] / cached_s
            goals.append(("online decode + DINOv2 + PCA >= 100x the loader's cost per sample (c=1152)",
                          f"{ratio:.0f}x", ratio >= 100))
        width = max(len(g[0]) for g in goals) + 2
        print(f"\n{'goal':{width}s}{'measured':>10s}")
        for label, value, ok in goals:
            print(f"{label:{width}s}{value:>10s}  {_verdict(ok)}")
        if online:
            raw_s = 1 / r1["raw"]["per_cpu_s"]
            print(f"  per sample: {online['total_s']:.2f} CPU-s online vs {1000 * cached_s:.0f} CPU-ms through the "
                  f"loader ({1000 * raw_s:.0f} CPU-ms for the raw zarr read of the same arrays: "
                  f"{online['total_s'] / raw_s:.0f}x)")
        print(f"\nloader bench took {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.2f} "
              "at the end (other programs on this machine)")
        return {"store": info, "reads": results, "online": online}
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


LOADER_OPTIONS = (  # name, type, default, help
    ("clips", int, 32, "clips in the benchmark store (paper geometry)"),
    ("batch-size", int, 4, "loader batch size"),
    ("seconds", float, 3.0, "minimum time per read measurement"),
    ("dino-frames", int, 1, "frames DINOv2 runs on, scaled to the clip's 7 (0 skips the online measurement)"),
)


def add_arguments(p, prefix: str = "") -> None:
    """The loader bench's options; `prefix` (e.g. "loader-") when they share a parser with others."""
    for name, typ, default, help in LOADER_OPTIONS:
        p.add_argument(f"--{prefix}{name}", type=typ, default=default, help=help)
    p.add_argument(f"--{prefix}keep", action="store_true", help="keep the benchmark store and files")


def loader_args(args, prefix: str = ""):
    """The loader bench's options out of a namespace that holds them under `prefix`."""
    import argparse
    pre = prefix.replace("-", "_")
    names = [n.replace("-", "_") for n, *_ in LOADER_OPTIONS] + ["keep"]
    return argparse.Namespace(**{n: getattr(args, pre + n) for n in names})
