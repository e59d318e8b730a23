"""What the cache job says while it runs and sums up at the end: a progress line, and per stage the
actors that ran with their clips and busy seconds."""

from __future__ import annotations

import sys
import time


class Progress:
    """One line every `every` seconds: done, rate, time left, failures, share of time each stage is busy."""

    def __init__(self, what: str, total: int, unit: str, enabled: bool, every: float = 10.0):
        self.what, self.total, self.unit, self.enabled, self.every = what, total, unit, enabled, every
        self.done = self.failed = 0
        self.t0 = self.last = time.time()

    def update(self, n: int, failed: int = 0, busy: dict | None = None) -> None:
        self.done += n
        self.failed += failed
        now = time.time()
        if not self.enabled or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        line = f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, ~{left:.0f} s left"
        if self.failed:
            line += f", {self.failed} failed"
        if busy:
            line += "; busy " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in busy.items())
        print(line, file=sys.stderr, flush=True)


class ActorStats:
    """Per stage: the actors that ran, and each one's clips and busy seconds (from the rows)."""

    def __init__(self):
        self.stages: dict[str, dict[str, dict]] = {}

    def add(self, row: dict, clips: int) -> None:
        for key, value in row.items():
            if key.startswith("a_"):
                stage = key[2:]
                actor = self.stages.setdefault(stage, {}).setdefault(str(value), {"clips": 0, "busy_s": 0.0})
                actor["clips"] += clips
                actor["busy_s"] += float(row.get(f"t_{stage}", 0.0))

    def busy_share(self, elapsed: float) -> dict:
        return {
            s: sum(a["busy_s"] for a in actors.values()) / max(elapsed * len(actors), 1e-9)
            for s, actors in self.stages.items()
        }

    def summary(self) -> dict:
        return {
            "actors": {s: len(a) for s, a in self.stages.items()},
            "per_actor": {
                s: [
                    {"actor": k[:12], "clips": v["clips"], "busy_s": round(v["busy_s"], 3)}
                    for k, v in sorted(a.items())
                ]
                for s, a in self.stages.items()
            },
        }
