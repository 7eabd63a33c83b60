"""Shared helpers for the benchmarks: interleaved timing, peak RSS, tables."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # where the committed tables live


def interleaved(cases: dict, rounds: int, per_round: int, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each case, timed round by round (A B C, then B C A, ...) after
    warm-up, so drift on a shared machine hits every case alike. The order changes every round and
    each case's first call in a round is not timed, so no case always pays for the one before it
    (cache and allocator state)."""
    import random

    for fn in cases.values():
        for _ in range(warmup):
            fn()
    order = list(cases)
    rng = random.Random(seed)
    times = {name: [] for name in cases}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            fn = cases[name]
            fn()
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.rise = self.peak - self.start


def in_subprocess(module: str, *args: str, timeout: int = 600) -> dict:
    """Run `python benchmarks/<module>.py args` in a fresh process (clean memory figures); it prints
    one JSON object on its last line."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{module}.py"), *args], capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{module} {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(k, "")) for _, k in columns) + " |")
    return "\n".join(lines)
