"""`python -m benchmarks.bench loader`: the trainer's data side on a local store at the paper's geometry.

Prints, from one run and measured in it:
1. the limit: the uncompressed read of the same arrays (features + latents of each clip of a batch read
   with `readinto` from raw files in the page cache into its slot of page-aligned batch buffers: one
   copy, no decoding, no checksum), timed side by side with the loader at 1152 channels (their windows
   alternate, so the machine's load falls on both alike), and beside them the same read into one
   clip-sized buffer reused (cache-resident: faster than any batch);
2. a codec table: for none, Blosc-lz4, Blosc-zstd at levels 1/3/5 and zstd, the bytes on disk, the
   decode MB/s per core of one feature chunk, and the loader's clips/CPU-s at 1152 and 256 channels;
3. on a store with the writer's default codec: the loader (`ClipStream.batches`, 0, 1 and 2
   DataLoader workers) next to raw Zarr reads and the store reader's own calls, at 1152 and 256
   channels, and features alone; 0 and 1 workers again side by side (windows alternating);
4. each goal of the loader next to its figure, "met" or "NOT met";
5. optionally, the data-side cost of one training sample from the store against decoding its 7
   frames (2048x1024 PNG) and running DINOv2-Reg ViT-B/14 (real size, random weights) at 448x784 +
   the PCA projection online, as the reference trainer does.

"Per core": torch, Blosc and Zarr's decode pool are limited to one thread each, and rates are clips per
CPU-second of every process involved (the main one and any DataLoader worker); wall-clock rates are
printed beside them. The stores hold random N(0, 1) float16 data (real PCA features compress a little
better: docs/design.md, "Facts measured"), written through the real writer; reads are timed from the page cache after a
warm-up pass.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1e6


# ---- the store ------------------------------------------------------------------------------------
def write_paper_store(
    path: Path, clips: int, compression: str, raw_dir: Path | None = None, seed: int = 0, geometry=None
) -> dict:
    """`clips` clips at the paper geometry or `geometry` (scenes of 37 frames, stride 4: 4 clips and 10 feature
    frames each), random float16 arrays, written through StoreWriter; the same arrays as raw files under
    `raw_dir` (one per feature frame and per latent row) for the uncompressed read."""
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
            n = (geometry or PAPER).clip_frames + (per_scene - 1) * 4
            return [FrameRef(i, i / self.fps, f"{scene}/{i:04d}") for i in range(n)]

        def read_frame(self, scene, frame):
            raise NotImplementedError

    g = geometry or PAPER
    index = build_clip_index(BenchSource(), g, stride=4, progress=False)
    index.clips[:] = index.clips[:clips]
    used = sorted({r for c in index.clips for r in c.feature_rows})
    assert used == list(range(len(used)))  # clips are cut from the end: the frames they use come first
    del index.frames[len(used) :]
    rng = np.random.default_rng(seed)
    d, c = g.feature_dim, g.num_pca_channels
    basis = PCABasis(
        np.zeros(d, np.float32), np.ones(d, np.float32), np.eye(c, d, dtype=np.float32), np.ones(c, np.float32)
    )
    w = StoreWriter.create(
        str(path),
        index=index,
        geometry=g,
        basis=basis,
        source_info=BenchSource().describe(),
        encoders={"dinov2": {"name": "bench"}, "vae": {"name": "bench"}},
        latent_norm={"mean": [0.0] * 16, "std": [1.0] * 16},
        compression=compression,
        overwrite=True,
    )
    t0 = time.perf_counter()
    for kind, rows, shape, write in (
        ("features", len(index.frames), g.features_shape[1:], w.write_features),
        ("latents", len(index.clips), g.latents_shape, w.write_latents),
    ):
        for r in range(rows):
            a = rng.standard_normal(shape, np.float32).astype(np.float16)
            write(r, a)
            if raw_dir is not None:
                a.tofile(raw_dir / f"{kind}-{r}.bin")
    w.mark_unit_done("unit-000000", clip_rows=range(len(index.clips)), frame_rows=range(len(index.frames)))
    w.finalize(["unit-000000"])
    raw = 2 * (
        len(index.frames) * int(np.prod(g.features_shape[1:])) + len(index.clips) * int(np.prod(g.latents_shape))
    )
    return {
        "clips": len(index.clips),
        "frame_rows": len(index.frames),
        "raw_bytes": raw,
        "disk_bytes": _du(path),
        "write_s": time.perf_counter() - t0,
        "compression": w.manifest["compression"],
        "channel_chunk": w.manifest["channel_chunk"],
    }


def _du(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in Path(path).rglob("*") if f.is_file())


def raw_pass(store) -> float:
    """Read every clip's 7 feature frames (all channels) and latents once; clips/s."""
    feats, lats = store.features_array, store.latents_array
    t0 = time.perf_counter()
    for i in range(len(store)):
        for r in store.feature_rows(i):
            feats[int(r)]
        lats[store.row(i)]
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
    """CPU seconds of a process (all its threads), from /proc: each thread's time on a CPU in ns
    (schedstat), else user + system clock ticks (10 ms: coarse against 0.5 s windows); 0 if it has gone."""
    if pid == os.getpid():
        return time.process_time()
    try:
        return (
            sum(int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0]) for t in os.listdir(f"/proc/{pid}/task"))
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        pass
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
    return timed_together({"step": step}, min_seconds, min_windows, window_s, children)["step"]


def timed_together(
    steps: dict,
    min_seconds: float,
    min_windows: int = 3,
    window_s: float = 0.5,
    children: bool = False,
    workers: dict | None = None,
) -> dict:
    """timed() for several steps side by side: their windows alternate (a, b, a, b, ...), so that a change
    in the machine's load falls on each of them alike; min_seconds is each step's. name -> rates.

    A step's CPU time in a window is this process's during the window plus that of the step's own worker
    processes (`workers`: name -> pids; `children`: every child process, for each step) from the start of
    the window to the start of the step's next one (or until they are idle, after the last): what the
    workers read ahead for a step while another step's window runs is charged to that step."""
    for step in steps.values():
        step()  # first calls pay one-off costs (allocator growth, lazy set-up)
    own = workers or ({name: _children(os.getpid()) for name in steps} if children else {})
    pids_of = {name: tuple(own.get(name, ())) for name in steps}
    windows, marks, t_start = {name: [] for name in steps}, {name: [] for name in steps}, time.perf_counter()
    while len(windows[next(iter(steps))]) < min_windows or time.perf_counter() - t_start < min_seconds * len(steps):
        for name, step in steps.items():
            marks[name].append(_cpu_of(pids_of[name]))
            c0, w0, clips = time.process_time(), time.perf_counter(), 0
            while not clips or time.perf_counter() - w0 < window_s:
                clips += step()
            windows[name].append((clips, time.perf_counter() - w0, time.process_time() - c0))
    out = {}
    for name, ws in windows.items():
        ends = marks[name][1:] + [_settled(pids_of[name])]
        ws = [(c, w, u + end - start) for (c, w, u), start, end in zip(ws, marks[name], ends)]
        out[name] = {
            "clips": sum(w[0] for w in ws),
            "windows": len(ws),
            "wall_s": sum(w[1] for w in ws),
            "cpu_s": sum(w[2] for w in ws),
            "per_s": float(np.median([c / w for c, w, _ in ws])),
            "per_cpu_s": float(np.median([c / max(u, 1e-9) for c, _, u in ws])),
            "processes": 1 + len(pids_of[name]),
        }
    return out


def _cpu_of(pids) -> float:
    return sum(_cpu_seconds(p) for p in pids)


def _settled(pids, poll_s: float = 0.05, limit_s: float = 2.0) -> float:
    """The CPU seconds of processes `pids` once they stop growing (workers done reading ahead), waiting at
    most limit_s."""
    last, t0 = _cpu_of(pids), time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        time.sleep(poll_s)
        now = _cpu_of(pids)
        if now - last < 1e-3:
            return now
        last = now
    return last


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


CODEC_TABLE = ("none", "blosc-lz4", "blosc-zstd:1", "blosc-zstd:3", "blosc-zstd:5", "zstd")  # --compression specs


def decode_twin(spec: str):
    """The numcodecs twin of a spec's Zarr codec (the decode-only rate of one chunk); None for `none`."""
    import numcodecs

    from pipeline.store.lossy import parse_compression

    c = parse_compression(spec)
    if c.codec == "zstd":
        return numcodecs.Zstd(level=c.level)
    if c.codec.startswith("blosc-"):
        cname = c.codec.removeprefix("blosc-")
        return numcodecs.Blosc(cname=cname, clevel=c.level, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=1 << 20)
    return None


def recode_store(src: Path, dst: Path, spec: str) -> int:
    """A copy of store `src` whose features and latents use compression `spec` as the writer stores it (its
    codec, then a crc32c); returns their bytes on disk."""
    import zarr

    from pipeline.store.writer import chunk_codecs

    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")
    for name in ("frames/features", "clips/latents"):
        old = zarr.open_array(str(src), path=name, mode="r")
        group, leaf = name.split("/")
        new = g[group].create_array(
            leaf,
            shape=old.shape,
            dtype=old.dtype,
            chunks=old.chunks,
            shards=old.shards,
            compressors=chunk_codecs(spec),
            fill_value=0,
            overwrite=True,
            config={"write_empty_chunks": True},
        )
        for r in range(old.shape[0]):
            new[r] = old[r]
    g.attrs["compression"] = spec
    return _du(dst / "frames" / "features") + _du(dst / "clips" / "latents")


def choose_default(table: dict) -> str:
    """docs/store_format.md's rule: the codec the loader reads fastest (clips/CPU-s at 1152 channels), unless another
    stores the same clips in <= 3/4 of its bytes (>= 1.33x smaller) while reading at >= 80 % of its speed
    (then the smallest of those)."""
    fastest = max(table, key=lambda k: table[k][1152]["per_cpu_s"])
    f = table[fastest]
    smaller = [
        k
        for k, t in table.items()
        if t["disk"] * 1.33 <= f["disk"] and t[1152]["per_cpu_s"] >= 0.8 * f[1152]["per_cpu_s"]
    ]
    return min(smaller, key=lambda k: table[k]["disk"]) if smaller else fastest


def decode_mb_per_s(twin, chunk: np.ndarray, seconds: float = 0.5) -> float:
    """MB of float16 decoded per CPU-second by the codec alone, on one feature chunk [1, 32, 56, 128]."""
    if twin is None:
        return float("nan")
    encoded, n, t0 = twin.encode(np.ascontiguousarray(chunk)), 0, time.process_time()
    while time.process_time() - t0 < seconds:
        twin.decode(encoded)
        n += 1
    return n * chunk.nbytes / MB / (time.process_time() - t0)


def page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized float16 array starting on a page boundary. A buffer from np.empty starts 16 bytes
    past one (glibc's header), and the kernel copies a file into such a destination up to 8x slower (AMD
    EPYC here): the limit would then measure the allocator, not the read."""
    raw = np.empty(2 * math.prod(shape) + 4096, np.uint8)
    skip = -raw.ctypes.data % 4096
    return raw[skip : skip + 2 * math.prod(shape)].view(np.float16).reshape(shape)


def limit_step(raw_dir: Path, store, batch_size: int = 1):
    """The uncompressed read of a batch of clips' arrays, each clip's 7 feature frames + latents `readinto`
    its own slot of page-aligned batch buffers (the loader's batch tensors are 64-byte aligned or better);
    returns clips read. batch_size 1 rereads one clip-sized buffer, which stays in the CPU's cache as no
    batch of the loader's can (measured here: 29 MB of destination read 1.2-1.3x faster than 58 MB or more)."""
    g = store.geometry
    feats = page_aligned((batch_size, *g.features_shape))
    lats = page_aligned((batch_size, *g.latents_shape))
    rows = [store.feature_rows(i) for i in range(len(store))]
    it = _cycle(len(store))

    def step():
        for b in range(batch_size):
            i = next(it)
            for k, r in enumerate(rows[i]):
                with open(raw_dir / f"features-{int(r)}.bin", "rb", buffering=0) as f:
                    f.readinto(memoryview(feats[b, k]).cast("B"))
            with open(raw_dir / f"latents-{store.row(i)}.bin", "rb", buffering=0) as f:
                f.readinto(memoryview(lats[b]).cast("B"))
        return batch_size

    return step


def loader_batches(location: str, channels: int, workers: int, batch_size: int, **reads):
    """The trainer's loader: ClipStream.batches() as the loop calls it (channel-blocked features where the
    store allows, reused batch tensors; pinned on GPU), started (worker processes, store handles, the first
    touch of each worker's reused batch sets); `reads`: what the stream reads (Stage 1: window=5,
    latents=False). Its batches are what the loop's to_device receives."""
    import torch

    from model.data import open_stream

    reads = {"channel_blocks": True, **reads}
    stream = open_stream(location, batch_size=batch_size, channels=channels, seed=0, **reads)
    batches = stream.batches(workers=workers, pin_memory=torch.cuda.is_available(), reuse=True)
    for _ in range(1 + workers * (2 + 2)):
        f = next(batches)["features"]
        assert f.shape[-1] * (f.shape[-2] if f.dim() == 6 else 1) == channels
    return batches


def measure_to_device(location: str, seconds: float, batch_size: int) -> dict:
    """to_device on the CPU (what a CPU trainer pays after the loader) for the same batch channel-blocked
    and in rows: laying the channels side by side in the float32 conversion against the conversion alone."""
    import torch

    from model.runtime import to_device

    out, cpu = {}, torch.device("cpu")
    for name, blocks in (("blocked", True), ("rows", False)):
        batches = loader_batches(location, 1152, 0, batch_size, channel_blocks=blocks)
        batch = next(batches)
        out[name] = timed(lambda b=batch: len(to_device(b, cpu)["clip"]), seconds)
        batches.close()
    return out


def measure_loader(location: str, channels: int, workers: int, seconds: float, batch_size: int, **reads) -> dict:
    """The loader's rates (loader_batches), start-up untimed."""
    batches = loader_batches(location, channels, workers, batch_size, **reads)
    out = timed(lambda: len(next(batches)["clip"]), seconds, children=workers > 0)
    batches.close()  # shuts the workers down
    return out


def measure_reads(location: str, channels: int, seconds: float) -> dict:
    """Raw Zarr reads and the store reader's calls of the same arrays as the loader reads."""
    from pipeline.store.reader import Store

    store = Store(location)
    feats, lats = store.features_array, store.latents_array
    rows = [store.feature_rows(i) for i in range(len(store))]

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

    return {
        "raw": timed(raw(True), seconds),
        "api": timed(api(True), seconds),
        "raw_features": timed(raw(False), seconds),
        "api_features": timed(api(False), seconds),
    }


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

    from pipeline.cache.stages import Projector
    from pipeline.encoders import load_dinov2
    from pipeline.frames import resize_frames
    from pipeline.sources.common import read_rgb
    from pipeline.store.basis import PCABasis
    from pipeline.store.geometry import PAPER

    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    pngs = write_pngs(work, frames)
    torch.manual_seed(0)
    Dinov2WithRegistersModel(
        Dinov2WithRegistersConfig(patch_size=14, image_size=518, num_register_tokens=4)
    ).save_pretrained(work / "dinov2")
    encoder = load_dinov2(str(work / "dinov2"), input_hw=PAPER.dino_input_hw)  # the real local-folder path
    params = sum(p.numel() for p in encoder.model.parameters())
    rng = np.random.default_rng(0)
    d, c = PAPER.feature_dim, PAPER.num_pca_channels
    basis = PCABasis(
        rng.standard_normal(d).astype(np.float32),
        rng.uniform(0.5, 2, d).astype(np.float32),
        (rng.standard_normal((c, d)) / np.sqrt(d)).astype(np.float32),
        np.ones(c, np.float32),
    )
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
    return {
        "frames": frames,
        "dino_frames": dino_frames,
        "png_mb": np.mean([p.stat().st_size for p in pngs]) / MB,
        "params_m": params / 1e6,
        "decode_s": t_decode,
        "resize_s": t_resize,
        "dino_s": t_dino * scale,
        "dino_per_frame_s": t_dino / dino_frames,
        "pca_s": t_pca * scale,
        "total_s": t_decode + t_resize + (t_dino + t_pca) * scale,
    }


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
    import inspect

    import numcodecs
    import torch
    import zarr

    from pipeline.store.lossy import parse_compression
    from pipeline.store.reader import Store
    from pipeline.store.writer import StoreWriter

    one_core()
    default = inspect.signature(StoreWriter.create).parameters["compression"].default
    work = Path(tempfile.mkdtemp(prefix="re2pix-bench-loader-"))
    t_start = time.perf_counter()
    try:
        print(
            f"machine: {os.cpu_count()} CPUs ({_cpu_model()}), "
            f"{'a GPU (unused here)' if torch.cuda.is_available() else 'no GPU'}; load average "
            f"{os.getloadavg()[0]:.2f} at start; torch {torch.__version__}, zarr {zarr.__version__}, "
            f"numcodecs {numcodecs.__version__}"
        )
        print(
            "per core: torch, Blosc and Zarr's decode pool on 1 thread; clips/CPU-s counts every process "
            "involved (main + DataLoader workers)"
        )
        raw_dir = work / "raw"
        raw_dir.mkdir()
        base = work / "none.zarr"
        info = write_paper_store(base, args.clips, "none", raw_dir)
        print(
            f"\nstores: {info['clips']} clips / {info['frame_rows']} feature frames at the paper geometry "
            f"(features [7, 32, 56, 1152] f16 per clip, latents [16, 7, 54, 96] f16), random N(0,1) data, "
            f"channel chunk {info['channel_chunk']}, {info['raw_bytes'] / MB:.0f} MB raw; the same arrays as "
            "raw files for the uncompressed read"
        )
        store = Store(str(base))
        drop = drop_page_cache()
        note = f"page cache: {drop}"
        if drop.startswith("dropped"):
            note += f"; one cold pass of raw reads after it: {raw_pass(store):.1f} clips/s (uncompressed store)"
        print(note)
        print(
            f"all rates: warm page cache (a warm-up pass over every clip first), each timed for "
            f">= {args.seconds:g} s (codec table: {args.codec_seconds:g} s) in >= 3 windows of >= 0.5 s, "
            f"median window; loader batch {args.batch_size}"
        )

        # ---- the codec table
        chunk = store.features_array[0:1, :, :, :128]  # one inner chunk [1, 32, 56, 128]
        table, locations = {}, {}
        for spec in CODEC_TABLE:
            loc = base if spec == "none" else work / f"{spec.replace(':', '-')}.zarr"
            disk = (
                _du(base / "frames" / "features") + _du(base / "clips" / "latents")
                if spec == "none"
                else recode_store(base, loc, spec)
            )
            locations[spec] = str(loc)
            raw_pass(Store(str(loc)))  # warm-up
            table[spec] = {
                "disk": disk,
                "decode": decode_mb_per_s(decode_twin(spec), chunk),
                **{c: measure_loader(str(loc), c, 0, args.codec_seconds, args.batch_size) for c in (1152, 256)},
            }
        print(
            f"\n{'codec table (loader: 0 workers), --compression':50s}{'MB on disk':>11s}{'ratio':>7s}"
            f"{'decode MB/s/core':>18s}{'clips/CPU-s c=1152':>20s}{'c=256':>8s}"
        )
        for spec, t in table.items():
            decode = "  (memcpy)" if spec == "none" else f"{t['decode']:10.0f}"
            name = spec + (" (the writer's default)" if parse_compression(spec) == parse_compression(default) else "")
            print(
                f"  {name:48s}{t['disk'] / MB:11.0f}{info['raw_bytes'] / t['disk']:7.2f}{decode:>18s}"
                f"{t[1152]['per_cpu_s']:20.2f}{t[256]['per_cpu_s']:8.2f}"
            )
        chosen = choose_default(table)
        print(
            f"  the rule (docs): the codec read fastest at c=1152 unless another saves >= 1.33x the bytes at "
            f">= 80 % of its speed -> {chosen}; the writer's default is {default}: "
            f"{_verdict(parse_compression(chosen) == parse_compression(default))}"
        )

        # ---- the loader on the writer's default codec, against the limit
        label = next(k for k in table if parse_compression(k) == parse_compression(default))
        location = locations[label]
        raw_pass(Store(location))
        # the goal's pair side by side: the limit and the loader (0 workers) at 1152 channels, windows alternating
        batches = loader_batches(location, 1152, 0, args.batch_size)
        uncompressed = limit_step(raw_dir, store, args.batch_size)
        one_clip = limit_step(raw_dir, store)
        for _ in range(len(store)):  # the raw files' warm-up pass (the page cache was dropped)
            one_clip()
        pair = timed_together(
            {"limit": uncompressed, "loader": lambda: len(next(batches)["clip"]), "one_clip": one_clip}, args.seconds
        )
        batches.close()
        limit = pair["limit"]
        results = {
            c: {
                **measure_reads(location, c, args.seconds),
                **{f"loader{w}": measure_loader(location, c, w, args.seconds, args.batch_size) for w in (0, 1, 2)},
                "stage1": measure_loader(
                    location,
                    c,
                    0,
                    args.seconds,
                    args.batch_size,
                    window=store.geometry.context_latents + 1,
                    latents=False,
                ),
            }
            for c in (1152, 256)
        }
        # goal B's pair side by side: 0 and 1 DataLoader workers at 1152 channels, windows alternating; the
        # worker's CPU is charged to the 1-worker loader only
        here = loader_batches(location, 1152, 0, args.batch_size)
        before = set(_children(os.getpid()))
        ahead = loader_batches(location, 1152, 1, args.batch_size)
        worker = [p for p in _children(os.getpid()) if p not in before]
        workers_pair = timed_together(
            {0: lambda: len(next(here)["clip"]), 1: lambda: len(next(ahead)["clip"])},
            args.seconds,
            workers={1: worker},
        )
        here.close()
        ahead.close()
        rows = [
            ("features + latents", None),
            ("  raw zarr: feats[r, :, :, :c] x7 + latents[row]", "raw"),
            ("  Store.read_features + read_latents", "api"),
            ("  loader: ClipStream.batches, 0 workers", "loader0"),
            ("  loader: ClipStream.batches, 1 worker", "loader1"),
            ("  loader: ClipStream.batches, 2 workers", "loader2"),
            ("Stage 1's reads: a 5-frame window, no latents", None),
            ("  loader: ClipStream.batches, 0 workers", "stage1"),
            ("features only", None),
            ("  raw zarr: feats[r, :, :, :c] x7", "raw_features"),
            ("  Store.read_features", "api_features"),
        ]
        print(f"\n{'per clip, warm cache, codec ' + label + ' (the default)':52s}{'c = 1152':>22s}{'c = 256':>22s}")
        print(f"{'':52s}{'clips/CPU-s  clips/s':>22s}{'clips/CPU-s  clips/s':>22s}")
        print(
            f"{'uncompressed read (readinto raw files), batch: the limit':52s}{limit['per_cpu_s']:11.2f}"
            f"{limit['per_s']:9.2f}"
        )
        loader, one_clip = pair["loader"], pair["one_clip"]
        print(
            f"{'  loader, 0 workers, its windows alternating with those':52s}{loader['per_cpu_s']:11.2f}"
            f"{loader['per_s']:9.2f}"
        )
        side = "  (the same read into one clip-sized buffer, reused)"
        print(f"{side:52s}{one_clip['per_cpu_s']:11.2f}{one_clip['per_s']:9.2f}")
        for name, key in rows:
            if key is None:
                print(name)
                continue
            cells = "".join(
                f"{results[c][key]['per_cpu_s']:11.2f}{results[c][key]['per_s']:9.2f}  " for c in (1152, 256)
            )
            print(f"{name:52s}{cells}")
            if key == "loader2":
                for w in (0, 1):
                    side = f"  loader, {w} worker{'s' if w == 0 else ''}, windows alternating (0, 1, 0, ...)"
                    print(f"{side:52s}{workers_pair[w]['per_cpu_s']:11.2f}{workers_pair[w]['per_s']:9.2f}")

        moved = measure_to_device(location, args.seconds, args.batch_size)
        print(
            f"{'to_device on a CPU (float32), c=1152: channel-blocked':52s}{moved['blocked']['per_cpu_s']:11.2f}"
            f"{moved['blocked']['per_s']:9.2f}\n{'  the same batch in rows (conversion alone)':52s}"
            f"{moved['rows']['per_cpu_s']:11.2f}{moved['rows']['per_s']:9.2f}\n"
            "  (on a GPU the blocked batch is copied as it lies and its channels are laid side by side there)"
        )

        online = None
        if args.dino_frames:
            print("\nonline (reference trainer) data side, one clip, 1 thread: building DINOv2 ...", flush=True)
            online = measure_online(work, 7, args.dino_frames)
            o = online
            print(
                f"  decode {o['frames']} PNGs (2048x1024, synthetic + noise, {o['png_mb']:.1f} MB each)  "
                f"{o['decode_s']:7.2f} CPU-s (all {o['frames']} measured)"
            )
            print(
                f"  resize to 448x784 (bilinear, antialiased)                  {o['resize_s']:7.2f} CPU-s "
                f"(all {o['frames']} measured)"
            )
            print(
                f"  DINOv2-Reg ViT-B/14 ({o['params_m']:.0f}M params, random weights) at 448x784   "
                f"{o['dino_s']:7.2f} CPU-s ({o['dino_per_frame_s']:.2f} s/frame measured on {o['dino_frames']} "
                f"frame(s), x{o['frames'] / o['dino_frames']:g})"
            )
            print(
                f"  PCA projection 3072 -> 1152                                {o['pca_s']:7.2f} CPU-s "
                f"(measured on {o['dino_frames']} frame(s), x{o['frames'] / o['dino_frames']:g})"
            )
            print(f"  total per training sample                                  {o['total_s']:7.2f} CPU-s")
            print("  WAN2.1 VAE online encode (Stage 2's reference): skipped, not measured in this run")

        # ---- goals
        r1, r2 = results[1152], results[256]
        share = pair["loader"]["per_cpu_s"] / limit["per_cpu_s"]
        share_one = pair["loader"]["per_cpu_s"] / one_clip["per_cpu_s"]
        speed = r2["api_features"]["per_cpu_s"] / r1["api_features"]["per_cpu_s"]
        raw_speed = r2["raw_features"]["per_cpu_s"] / r1["raw_features"]["per_cpu_s"]
        one = workers_pair[1]["per_cpu_s"] / workers_pair[0]["per_cpu_s"]
        two = r1["loader2"]["per_s"] / r1["loader1"]["per_s"]
        goals = [
            (
                "loader (0 workers) >= 50% of the uncompressed read, c=1152 (clips/CPU-s, side by side)",
                f"{100 * share:.0f}%",
                share >= 0.5,
            ),
            (
                "  the same against the read into one clip-sized buffer (cache-resident)",
                f"{100 * share_one:.0f}%",
                share_one >= 0.5,
            ),
            (
                "features alone: 256 ch >= 3.5x faster than 1152 (Store.read_features, clips/CPU-s)",
                f"{speed:.2f}x",
                speed >= 3.5,
            ),
            ("1 worker >= 0 workers in clips/CPU-s, c=1152 (side by side)", f"{one:.2f}x", one >= 1.0),
            ("2 workers >= 1.6x the clips/s of 1 worker, c=1152", f"{two:.2f}x", two >= 1.6),
        ]
        if online:
            ratio = online["total_s"] * r1["loader0"]["per_cpu_s"]
            goals.append(
                (
                    "online decode + DINOv2 + PCA >= 100x the loader's cost per sample (c=1152)",
                    f"{ratio:.0f}x",
                    ratio >= 100,
                )
            )
        width = max(len(g[0]) for g in goals) + 2
        print(f"\n{'goal':{width}s}{'measured':>10s}")
        for name, value, ok in goals:
            print(f"{name:{width}s}{value:>10s}  {_verdict(ok)}")
        print(
            f"  (raw zarr reads, features alone: 256 ch {raw_speed:.2f}x faster than 1152; 2 workers need 2 free "
            f"cores: this machine has {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} now)"
        )
        print(f"\nloader bench took {time.perf_counter() - t_start:.0f} s")
        return {
            "store": info,
            "codecs": table,
            "limit": limit,
            "limit_one_clip": one_clip,
            "reads": results,
            "workers": workers_pair,
            "to_device": moved,
            "online": online,
        }
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


LOADER_OPTIONS = (  # name, type, default, help
    ("clips", int, 32, "clips in the benchmark store (paper geometry)"),
    ("batch-size", int, 4, "loader batch size"),
    ("seconds", float, 3.0, "minimum time per read measurement"),
    ("codec-seconds", float, 2.0, "minimum time per loader measurement of the codec table"),
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


def main(argv=None) -> int:
    """`python -m benchmarks.bench_loader ...` is `python -m benchmarks.bench loader ...`."""
    import sys

    from benchmarks.bench import main as bench

    return bench(["loader", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
