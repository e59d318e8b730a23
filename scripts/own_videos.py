"""The README's own-videos section, followed literally on a folder like a user's.

Writes a mixed folder of drives rendered by the synthetic set (mp4, mov, mkv, webm, avi at 10, 12, 15
and 25 fps, a portrait video, a folder of JPEG frames) beside what makes no clip (a 10-frame video, a
text file, a video one folder too deep), then runs the section's four commands with make:

    make cache DATASET=videos DATA_ROOT=FOLDER RUN=RUN ARGS="--encoder demo --vae demo"
    make train RUN=RUN
    make predict RUN=RUN ARGS="--video FOLDER/drive_a.mp4"
    make evaluate RUN=RUN

and checks what a user would look for: every file that makes no clip named with its reason, the
demo encoders used (no random-weight notice), a picture and a video from predict, finite scores from
evaluate. Prints each step's wall time. `--quick` trains and samples a few steps only (what the
commands cost is then not the README's).

    python scripts/own_videos.py [--quick] [--out /tmp/own-videos]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.sources.synthetic import SyntheticSource  # noqa: E402

# (file, container codec, fps, frames, portrait): the drives a clip is made from
DRIVES = [
    ("drive_a.mp4", "libx264", 10, 61, False),
    ("drive_b.mov", "mpeg4", 12, 61, False),
    ("drive_c.mkv", "libx264", 15, 61, False),
    ("drive_d.webm", "libvpx-vp9", 10, 61, False),
    ("drive_e.avi", "mpeg4", 25, 61, False),
    ("phone.mp4", "libx264", 10, 61, True),
]
# what makes no clip, and the words the job gives as its reason
IGNORED = {
    "short.mp4": "too short",
    "notes.txt": "not a video",
    "nested": "a folder holding a folder of videos: one level is read",
}


def frames(scene: int, n: int, fps: float, portrait: bool) -> list[np.ndarray]:
    source = SyntheticSource(num_scenes=scene + 1, frames_per_scene=n, height=144, width=256, fps=fps, seed=7)
    name = source.scenes()[scene]
    out = [source.read_frame(name, ref) for ref in source.frames(name)]
    if portrait:  # a phone held upright: the middle of the road, taller than wide
        out = [np.ascontiguousarray(np.repeat(f[:, 80:176], 2, axis=0)) for f in out]  # 288 x 96
    return out


def write_video(path: Path, images: list[np.ndarray], codec: str, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = images[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_folder(folder: Path) -> None:
    for scene, (name, codec, fps, n, portrait) in enumerate(DRIVES):
        write_video(folder / name, frames(scene, n, fps, portrait), codec, fps)
    jpegs = folder / "drive_f"  # a folder of frames: 10 fps unless the source options say otherwise
    jpegs.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(frames(len(DRIVES), 61, 10, False)):
        Image.fromarray(image).save(jpegs / f"{i:06d}.jpg", quality=92)
    write_video(folder / "short.mp4", frames(len(DRIVES) + 1, 10, 10, False), "libx264", 10)
    write_video(folder / "nested/deeper/drive_z.mp4", frames(len(DRIVES) + 2, 61, 10, False), "libx264", 10)
    (folder / "notes.txt").write_text("route notes, not a video\n")


def make(step: str, *args: str) -> tuple[str, float]:
    """One README command; its output goes to the screen as a user sees it, and is kept for the checks."""
    start = time.time()
    proc = subprocess.run(["make", step, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.time() - start
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode != 0:
        raise SystemExit(f"own-videos: `make {step}` failed (exit {proc.returncode}) after {seconds:.0f} s")
    print(f"own-videos: make {step}: {seconds:.0f} s", flush=True)
    return proc.stdout + proc.stderr, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/own-videos", help="the folder of videos and the run go here (replaced)")
    parser.add_argument("--quick", action="store_true", help="a few training and sampling steps only")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    folder, run = out / "drives", out / "run"
    write_folder(folder)
    print(f"own-videos: {len(DRIVES)} videos, a folder of JPEG frames, {len(IGNORED)} inputs making no clip: {folder}")

    quick_train = "--steps 30" if args.quick else ""
    quick_sample = "--sample-steps 4" if args.quick else ""
    times = {}
    log, times["cache"] = make(
        "cache", "DATASET=videos", f"DATA_ROOT={folder}", f"RUN={run}", "ARGS=--encoder demo --vae demo"
    )
    missing = [f"{name} ({why})" for name, why in IGNORED.items() if name not in log]
    assert not missing, f"the cache job did not name: {missing}"
    assert "random weights" not in log, "the demo encoders are trained; the job said random weights"
    _, times["train"] = make("train", f"RUN={run}", *([f"ARGS={quick_train}"] if quick_train else []))
    assert (run / "train/val_scenes.json").is_file()
    _, times["predict"] = make("predict", f"RUN={run}", f"ARGS=--video {folder / 'drive_a.mp4'} {quick_sample}")
    pictures = sorted((run / "predict").glob("*.png"))
    videos = sorted((run / "predict").glob("*.mp4"))
    assert pictures and videos, f"predict wrote no picture or video under {run / 'predict'}"
    _, times["evaluate"] = make("evaluate", f"RUN={run}", *([f"ARGS={quick_sample}"] if quick_sample else []))
    results = json.loads((run / "eval/results.json").read_text())
    scores = [v for v in _numbers(results)]
    assert scores and all(math.isfinite(v) for v in scores), "evaluate's results hold a value that is not finite"
    print(json.dumps({"seconds": {k: round(v) for k, v in times.items()}, "pictures": [str(p) for p in pictures]}))
    return 0


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield float(tree)


if __name__ == "__main__":
    raise SystemExit(main())
