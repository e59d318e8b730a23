"""Decoded frames kept on disk between evaluations (`jobs.evaluate --decode-cache DIR`).

Two decodes of every evaluation do not change from one evaluation of a store to the next: the VAE
reconstruction of the stored latents (the reference) and copy-last-frame's latents. `make experiment`
evaluates the same val clips some twenty times per seed, and on a CPU decoding is most of an evaluation's
time (a 4-clip evaluation of the demo: 45 s with decoding, 5 s without). So they are kept, one uint8 .npy
per clip, named by the sha256 of the latents decoded and of the VAE's record (weights, precision, latent
normalization): a changed store or VAE misses instead of reading stale frames. Files are written whole
under a temporary name, read without pickle, and one that does not hold a frame array is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("re2pix.evaluate")


class DecodeCache:
    def __init__(self, folder: str | Path, codec):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.codec = codec
        record = json.dumps(codec.vae.describe(), sort_keys=True, default=str).encode()
        norm = codec.a.numpy().tobytes() + codec.b.numpy().tobytes()
        self.vae_key = hashlib.sha256(record + norm).digest()

    def key(self, latents: torch.Tensor) -> str:
        """One clip's latents [16, T, h, w] -> the name of its decoded frames."""
        z = latents.detach().float().cpu().contiguous().numpy()
        return hashlib.sha256(self.vae_key + repr(z.shape).encode() + z.tobytes()).hexdigest()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """[B, 16, T, h, w] store-normalized -> uint8 frames [B, F, H, W, 3], decoding only what is not kept."""
        keys = [self.key(z) for z in latents]
        frames = [self.load(k) for k in keys]
        missing = [i for i, f in enumerate(frames) if f is None]
        if missing:
            decoded = self.codec.decode(latents[missing])
            for i, f in zip(missing, decoded):
                self.save(keys[i], f)
                frames[i] = f
        return np.stack(frames)

    def load(self, key: str) -> np.ndarray | None:
        path = self.folder / f"{key}.npy"
        if not path.exists():
            return None
        try:
            frames = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s), decoding again", path, e)
            return None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            log.warning("%s: not a frame array (%s %s), decoding again", path, frames.dtype, frames.shape)
            return None
        return frames

    def save(self, key: str, frames: np.ndarray) -> None:
        path = self.folder / f"{key}.npy"
        tmp = path.with_name(f".{key}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(frames, dtype=np.uint8), allow_pickle=False)
        os.replace(tmp, path)
