"""What there is to choose from: `python -m jobs.list` (or `re2pix list`).

Prints the datasets (`--dataset`), the feature encoders (`--encoder`, alias `--dinov2`) and VAEs (`--vae`)
by the names the jobs take, the geometries (`--geometry`) and every job's presets (`--preset`).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from jobs.cli import HelpFormatter, run
from jobs.config import PRESETS

ENCODERS = [
    ("tiny", "DINOv2-Reg at a tiny size with RANDOM weights: plumbing tests only, meaningless features"),
    ("demo", "DINOv2-Reg at a tiny size trained on the synthetic set (shipped: pipeline/encoders/weights)"),
    ("facebook/dinov2-with-registers-base", "the paper's DINOv2-Reg ViT-B/14 (hub id or a local folder)"),
    ("siglip2:SPEC, hf:SPEC, vjepa2:SPEC", "SigLIP-2, any transformers backbone, V-JEPA 2 (registry.py)"),
]
VAES = [
    ("tiny, tiny-wan2.2", "WAN2.1 / Wan2.2 VAE at a tiny size with RANDOM weights: plumbing tests only"),
    ("demo", "a small WAN VAE trained on the synthetic set (shipped: pipeline/encoders/weights)"),
    ("demo-predictive", "the same, trained with the PV-VAE objective (predictive latents; weights/)"),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "the paper's WAN2.1 VAE (hub id or a local folder)"),
    ("diffusers:SPEC", "any other diffusers video VAE"),
]
GEOMETRIES = [("tiny", "96 x 160 frames, 8 x 14 feature grid (CPU)"), ("paper", "432 x 768 frames, 32 x 56 grid")]


def datasets() -> list[tuple[str, str]]:
    """(name, the first line of its adapter's module docstring), read without importing the adapter."""
    from pipeline.sources import SOURCES

    out = []
    for name, target in SOURCES.items():
        path = Path(__file__).resolve().parents[1] / (target.split(":")[0].replace(".", "/") + ".py")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out.append((name, doc.splitlines()[0] if doc else ""))
    return out


def presets() -> list[tuple[str, str]]:
    jobs: dict[str, list[str]] = {}
    names = ("train_dpt", "cache", "train", "rollout", "predict", "evaluate")  # train_dpt before train
    for path in sorted(PRESETS.glob("*.json")):
        job = next(j for j in names if path.stem.startswith(j))
        jobs.setdefault(job, []).append(path.stem.removeprefix(f"{job}_"))
    return [(job, ", ".join(names)) for job, names in jobs.items()]


def table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join([title] + [f"  {name:<{width}}  {what}" for name, what in rows])


def main(argv=None) -> int:
    argparse.ArgumentParser(prog="python -m jobs.list", description=__doc__, formatter_class=HelpFormatter).parse_args(
        argv
    )
    print(table("datasets (--dataset; --data-root DIR for all but synthetic):", datasets()))
    print(table("\nfeature encoders (--encoder / --dinov2):", ENCODERS))
    print(table("\nVAEs (--vae):", VAES))
    print(table("\ngeometries (--geometry):", GEOMETRIES))
    print(table("\npresets (--preset), by job (jobs/presets/JOB_NAME.json):", presets()))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
