"""Interleaved timing, summary statistics, profiles and the GEMM measurement."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every function once per round, rotating the order; return each one's samples.

    Each function returns its own elapsed seconds (so set-up outside the timed region, such as
    making an input batch, is not counted). Round i of every variant ran at nearly the same
    moment, so a burst of load from other jobs slows all variants of that round alike and the
    ratios of medians stay meaningful on a shared machine.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            samples[name].append(float(fns[name]()))
    return samples


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """Wrap a no-argument function so that it returns its wall time in seconds."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def summary(samples: list[float]) -> dict:
    """Median (the reported value), spread and the raw samples (seconds)."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": [round(s, 6) for s in samples]}


def paired_ratio_range(num: list[float], den: list[float]) -> list[float] | None:
    """Min and max over rounds of den_time/num_time (a speed ratio per round)."""
    pairs = [d / n for n, d in zip(num, den) if n > 0]
    return [round(min(pairs), 3), round(max(pairs), 3)] if pairs else None


def profile_top_ops(fn: Callable[[], object], rows: int = 10) -> dict:
    """torch.profiler over one call: the ops with most self CPU time, and the convolutions' share.

    Self times of the ops on the calling thread add up to the wall time of the call (intra-op
    parallel work is inside each op), so the shares are shares of the step.
    """
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key.lower())
    return {
        "wall_s": round(wall, 4),
        "self_total_ms": round(total / 1e3, 2),
        "conv_share": round(conv / total, 4),
        "top": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                 "share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
                for e in events[:rows]],
    }


def gemm_gflops(sizes: tuple[int, ...], dtype: torch.dtype, repeats: int) -> list[dict]:
    """GFLOP/s of torch.mm on n x n matrices (median of `repeats` after one warm-up)."""
    out = []
    generator = torch.Generator().manual_seed(0)
    for n in sizes:
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        torch.mm(a, b)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            samples.append(time.perf_counter() - start)
        median = statistics.median(samples)
        out.append({"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": median,
                    "gflops": 2 * n**3 / median / 1e9})
    return out
