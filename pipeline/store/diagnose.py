"""Latent diagnostics of a store, to compare VAEs and feature encoders side by side.

- latent temporal distance (LTD): for each interval d = 1 .. T-1 latent frames (T latent frames per
  clip), the mean over clips and over t of ||z[t+d] - z[t]||_2, each latent frame [C, h, w] flattened.
  A smoother (more diffusible) latent space grows more slowly with d. `ltd_rms` divides by
  sqrt(C h w) (the per-value RMS), so VAEs with other channel counts or grids compare; the interval
  is also given in video frames (d x temporal_downsample), so VAEs of other temporal factors do.
- feature temporal distance: the same over the stored PCA features of the clip's feature frames.
- per-channel statistics of the latents (mean, std, min, max) and of the PCA features.

Clips are read evenly spread over the store (variant 0), each check the reader makes included.
numpy (and matplotlib for the figure) only: no torch, no encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .format import StoreError

if TYPE_CHECKING:
    from .reader import Store


def temporal_distance(x: np.ndarray) -> np.ndarray:
    """x [T, ...] (one clip's frames, time first) -> [T-1]: mean over t of ||x[t+d] - x[t]||_2, d = 1 .. T-1."""
    flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    return np.array([np.linalg.norm(flat[d:] - flat[:-d], axis=1).mean() for d in range(1, len(flat))])


class _Moments:
    """Per-channel count, sum, sum of squares, min and max in float64 (channels on `axis`)."""

    def __init__(self):
        self.n, self.s, self.ss, self.lo, self.hi = 0, 0.0, 0.0, np.inf, -np.inf

    def add(self, x: np.ndarray, axis: int):
        x = np.moveaxis(np.asarray(x, np.float64), axis, 0).reshape(x.shape[axis], -1)
        self.n += x.shape[1]
        self.s, self.ss = self.s + x.sum(1), self.ss + (x * x).sum(1)
        self.lo, self.hi = np.minimum(self.lo, x.min(1)), np.maximum(self.hi, x.max(1))

    def stats(self) -> dict:
        mean = self.s / self.n
        std = np.sqrt(np.maximum(self.ss / self.n - mean * mean, 0.0))
        return {
            k: [round(float(v), 6) for v in a]
            for k, a in (("mean", mean), ("std", std), ("min", self.lo), ("max", self.hi))
        }


def diagnose(store: Store, max_clips: int | None = 256) -> dict:
    """The diagnostics of `store` over at most `max_clips` clips (None: all), as a JSON-able dict."""
    n = len(store)
    if n == 0:
        raise StoreError(f"{store.location} holds no usable clip to diagnose")
    k = n if max_clips is None else max(1, min(n, max_clips))
    clips = sorted({int(i * n / k) for i in range(k)})
    g = store.geometry
    ltd, ftd, lat, feat = 0.0, 0.0, _Moments(), _Moments()
    for i in clips:
        z = store.read_latents(i)  # [C, T, h, w]
        f = store.read_features(i)  # [T, h, w, P]
        ltd = ltd + temporal_distance(np.moveaxis(z, 1, 0))
        ftd = ftd + temporal_distance(f)
        lat.add(z, axis=0)
        feat.add(f, axis=-1)
    ltd, ftd = ltd / len(clips), ftd / len(clips)
    per_frame = g.latent_channels * g.latent_hw[0] * g.latent_hw[1]
    enc = store.manifest.get("encoders", {})
    return {
        "store": store.location,
        "clips": len(clips),
        "of_clips": n,
        "vae": (enc.get("vae") or {}).get("name"),
        "encoder": (enc.get("dinov2") or {}).get("name"),
        "latents_shape": list(g.latents_shape),
        "features_shape": list(g.features_shape),
        "intervals": list(range(1, g.latent_frames)),
        "intervals_frames": [d * g.temporal_downsample for d in range(1, g.latent_frames)],
        "ltd": [round(float(v), 6) for v in ltd],
        "ltd_rms": [round(float(v / np.sqrt(per_frame)), 6) for v in ltd],
        "feature_td": [round(float(v), 6) for v in ftd],
        "latent_channels": lat.stats(),
        "feature_channels": feat.stats(),
    }


def table(reports: list[dict], feature_channels: int = 8) -> str:
    """The reports side by side: one column per store."""
    cols = [f"[{i}]" for i in range(len(reports))]
    lines = [
        f"{c} {r['store']}  ({r['clips']} of {r['of_clips']} clips; vae {r['vae']}, encoder {r['encoder']}; "
        f"latents {r['latents_shape']}, features {r['features_shape']})"
        for c, r in zip(cols, reports)
    ]

    def row(label, values):
        lines.append(f"{label:<28}" + "".join(f"{v:>14}" for v in values))

    def num(v):
        return "-" if v is None else f"{v:.4g}"

    lines.append("")
    row("", cols)
    longest = max(len(r["ltd"]) for r in reports)
    for j in range(longest):
        at = [r["intervals_frames"][j] if j < len(r["ltd"]) else None for r in reports]
        frames = "/".join(sorted({str(a) for a in at if a is not None}))
        row(f"LTD d={j + 1} ({frames} frames)", [num(r["ltd"][j]) if j < len(r["ltd"]) else "-" for r in reports])
    for j in range(longest):
        row(f"LTD rms d={j + 1}", [num(r["ltd_rms"][j]) if j < len(r["ltd"]) else "-" for r in reports])
    for j in range(max(len(r["feature_td"]) for r in reports)):
        row(f"feature TD d={j + 1}", [num(r["feature_td"][j]) if j < len(r["feature_td"]) else "-" for r in reports])
    for name in ("latent_channels", "feature_channels"):
        most = max(len(r[name]["mean"]) for r in reports)
        show = most if name == "latent_channels" else min(most, feature_channels)
        for c in range(show):
            for stat in ("mean", "std"):
                row(
                    f"{name.split('_')[0]} ch{c} {stat}",
                    [num(r[name][stat][c]) if c < len(r[name][stat]) else "-" for r in reports],
                )
        if show < most:
            lines.append(f"{'':<28}(first {show} of {most} feature channels; --json lists all)")
    return "\n".join(lines)


COLORS = [(40, 96, 220), (220, 80, 40), (46, 170, 70), (150, 60, 180), (200, 160, 20), (20, 160, 170)]


def plot_png(reports: list[dict], path, size=(900, 380)) -> Path:
    """Two panels with labelled axes: the latent temporal distance (LTD) per value against the interval in
    video frames, and the per-channel latent std; one colour, line style and marker per store (so that equal
    curves stay visible one over the other: the first store widest), a legend naming each store below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, 2, figsize=(size[0] / dpi, (size[1] + 22 * len(reports)) / dpi), dpi=dpi)
    panels = [
        (
            "latent temporal distance (LTD): mean ||z[t+d] - z[t]||, per value",
            "interval d (video frames)",
            "LTD rms (lower growth: smoother latents)",
            [(r["intervals_frames"], r["ltd_rms"]) for r in reports],
        ),
        (
            "latent std per channel",
            "latent channel",
            "std over clips and positions",
            [(list(range(len(r["latent_channels"]["std"]))), r["latent_channels"]["std"]) for r in reports],
        ),
    ]
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "x"]
    for ax, (title, xlabel, ylabel, series) in zip(axes, panels):
        for i, (xs, ys) in enumerate(series):
            ax.plot(
                xs,
                [np.nan if y is None else y for y in ys],
                linestyle=styles[i % len(styles)],
                marker=markers[i % len(markers)],
                color=[c / 255 for c in COLORS[i % len(COLORS)]],
                linewidth=max(1.0, 3.0 - i),
                markersize=max(3.0, 7.0 - 1.5 * i),
                label=f"[{i}]",
            )
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    labels = [f"[{i}] {r['store']} (vae {r['vae']}, encoder {r['encoder']})" for i, r in enumerate(reports)]
    fig.legend(axes[0].get_lines(), labels, loc="lower left", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 22 * len(reports) / (size[1] + 22 * len(reports)), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
