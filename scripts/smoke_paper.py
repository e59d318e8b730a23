"""The paper-size path end to end on this machine's CPU: every paper architecture and channel count.

Real-size DINOv2-Reg ViT-B/14 and the WAN2.1 VAE are built from their library configs with random
weights and saved as local folders (no download; the cache job loads them through the same code as
downloaded weights). Then, each step the command a user runs:

    cache     2 train scenes and 1 val scene of the synthetic set, one clip each, paper geometry
    verify    both stores
    stage 1   the 258M forecaster, one step at batch 1
    rollout   Stage 1's forecast features into the train store
    stage 2   the 782M DiT (and the Baseline), one step each at batch 1
    predict   one val clip: PNG grid and mp4
    evaluate  the val clip, one sampling run

Each step prints its wall time and the peak resident memory of its process tree (the job and every
process it starts: Ray workers, DataLoader workers), and the last line is all of them as JSON.

    python scripts/smoke_paper.py [--out /tmp/smoke-paper] [--reduced] [--sample-steps 2]

`--reduced` keeps every architecture and channel count (1152 PCA channels, 3072 feature dims, the
258M Stage 1, the 782M DiT) at smaller frames, 144 x 256 (the slow test lane runs it this way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
REDUCED = {"vae_input_hw": [144, 256], "dino_input_hw": [112, 196]}  # latents 18 x 32, features 8 x 14


def write_encoders(folder: Path) -> tuple[Path, Path]:
    """Random-weight DINOv2-Reg ViT-B/14 and WAN2.1 VAE at their real sizes, as local model folders (kept
    when there: the stores cached with them record their weights' hashes)."""
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    dinov2, vae = folder / "dinov2-with-registers-base", folder / "wan2.1-vae"
    if (dinov2 / "config.json").exists() and (vae / "config.json").exists():
        return dinov2, vae
    # facebook/dinov2-with-registers-base: ViT-B/14, 768 wide, 12 blocks (the library's default patch is 16)
    config = Dinov2WithRegistersConfig(image_size=518, patch_size=14, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(dinov2)
    AutoencoderKLWan().save_pretrained(vae)  # diffusers' defaults are the WAN2.1 VAE's
    return dinov2, vae


class PeakMemory:
    """The peak summed RSS of a process and its descendants, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def step(name: str, module: str, *args: str, record: list) -> None:
    """Run `python -m module args` as a user would; stop the smoke run at the first failure."""
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    memory = PeakMemory(proc.pid)
    rc = proc.wait()
    result = {"step": name, "seconds": round(time.time() - start, 1), "peak_rss_gib": round(memory.stop(), 2)}
    record.append(result)
    print(f"smoke-paper: {name}: {result['seconds']} s, peak RSS {result['peak_rss_gib']} GiB", flush=True)
    if rc != 0:
        print(json.dumps(record))
        raise SystemExit(f"smoke-paper: {name} failed (exit {rc}): python -m {module} {' '.join(args)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/smoke-paper", help="everything goes here")
    parser.add_argument(
        "--fresh", action="store_true", help="start from nothing (else encoders and stores are kept: reruns are quick)"
    )
    parser.add_argument("--reduced", action="store_true", help="144 x 256 frames; every architecture as the paper's")
    parser.add_argument("--sample-steps", type=int, default=2, help="sampler steps in predict and evaluate")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # what is trained and sampled is always made anew
    shutil.rmtree(out / "predict", ignore_errors=True)
    (out / "eval.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    record: list = []

    start = time.time()
    dinov2, vae = write_encoders(out / "weights")
    record.append({"step": "encoders", "seconds": round(time.time() - start, 1)})
    geometry = json.dumps(REDUCED) if args.reduced else "paper"
    height, width = (144, 256) if args.reduced else (432, 768)
    train, val, run = out / "train.zarr", out / "val.zarr", out / "run"
    device = ["--device", "cpu"]
    for split, store, scenes, basis in (("train", train, 2, []), ("val", val, 1, ["--pca", str(train)])):
        synthetic = {"num_scenes": scenes, "frames_per_scene": 25, "height": height, "width": width}
        step(
            f"cache {split}",
            "jobs.cache",
            "--preset",
            "paper",
            "--split",
            split,
            "--geometry",
            geometry,
            "--encoder",
            str(dinov2),
            "--vae",
            str(vae),
            "--source-options",
            json.dumps(synthetic),
            "--out",
            str(store),
            "--no-progress",
            *basis,
            *device,
            record=record,
        )  # fmt: skip  (a complete store is kept: the job says so and does nothing)
    for store in (train, val):
        step(f"verify {store.stem}", "jobs.store", "verify", str(store), record=record)
    one_step = ["--steps", "1", "--batch-size", "1", "--workers", "0", "--val-clips", "1", "--no-progress"]
    train_args = ["--preset", "paper", "--store", str(train), "--val-store", str(val), "--run-dir", str(run)]
    # no warm-up; the end-of-stage evaluation samples with the sampler steps predict and evaluate use
    warm = ["--stage1.warmup-steps", "0", "--stage2.warmup-steps", "0", "--stage2.sample-steps", str(args.sample_steps)]
    step("stage 1", "jobs.train", *train_args, "--stage", "1", *one_step, *warm, *device, record=record)
    step(
        "rollout", "jobs.rollout", "--preset", "paper", "--checkpoint", str(run / "stage1"), "--store", str(train),
        "--batch-size", "1", "--overwrite", "--no-progress", *device, record=record,
    )  # fmt: skip
    step("stage 2", "jobs.train", *train_args, "--stage", "2", *one_step, *warm, *device, record=record)
    step("baseline", "jobs.train", *train_args, "--stage", "baseline", *one_step, *warm, *device, record=record)
    checkpoints = [
        "--stage1",
        str(run / "stage1"),
        "--stage2",
        str(run / "stage2"),
        "--baseline",
        str(run / "baseline"),
    ]
    sampling = ["--sample-steps", str(args.sample_steps), "--no-progress", *device]
    step(
        "predict", "jobs.predict", "--preset", "paper", "--store", str(val), *checkpoints, "--out",
        str(out / "predict"), *sampling, record=record,
    )  # fmt: skip
    step(
        "evaluate", "jobs.evaluate", "--preset", "paper", "--store", str(val), *checkpoints, "--samples", "1",
        "--out", str(out / "eval.json"), *sampling, record=record,
    )  # fmt: skip
    results = json.loads((out / "eval.json").read_text())
    print(json.dumps({"geometry": geometry, "steps": record, "clips_evaluated": results.get("clips")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
