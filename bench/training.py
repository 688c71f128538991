"""The `train` section: training images/s of bit_core and timm through the product's Trainer.

Both models train in ``bit_core.train.Trainer`` (fused SGD, the project's autocast and
channels_last handling, torch.compile as ``train.compile`` does it), one step per call on a fixed
in-memory batch, so the model is the only difference. The first step of each configuration warms
it up (compiles it) and checks its loss against the fp32 configuration of the same library; then
the configurations take turns, one step each per round.
"""

from __future__ import annotations

import time
from functools import partial

import torch
from torch.utils.data import TensorDataset

from bench.measure import CPU, LIBRARIES, NUM_CLASSES, best, build, interleaved, ratio, row
from bit_core.config import TrainConfig
from bit_core.train import Trainer

# Relative difference of the first step's loss from the library's fp32 run. At a random
# initialisation a deep network amplifies bf16 rounding (1-3% on this loss for both libraries;
# gradient cosines of ~0.5), so bf16 is judged by loss curves over training, not by one step.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2}


def configs(compile_precision: str | None) -> list[tuple[str, bool, bool]]:
    """(precision, channels_last, compiled) of every configuration, for each library."""
    out = [("fp32", False, False), ("fp32", True, False), ("bf16", True, False)]
    return out + [(compile_precision, True, True)] if compile_precision else out


def label(precision: str, channels_last: bool, compiled: bool) -> str:
    return precision + " channels_last" * channels_last + " compiled" * compiled


def trainer(library: str, batch: int, resolution: int, precision: str = "fp32",
            channels_last: bool = False, compiled: bool = False) -> Trainer:
    """A Trainer of `library`'s model on one fixed random batch (no loading cost)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1
    data = TensorDataset(images, torch.arange(batch) % NUM_CLASSES)
    cfg = TrainConfig(batch=batch, seed=0, schedule=[1, 10**6], mixup_alpha=0.0, workers=0,
                      precision=precision, channels_last=channels_last, compile=compiled)
    return Trainer(build(library), data, cfg, CPU)


def step(t: Trainer) -> float:
    """Seconds of one ``Trainer.fit`` step."""
    start = time.perf_counter()
    t.fit(until=t.state.step + 1)
    return time.perf_counter() - start


def profile(t: Trainer, rows: int = 8) -> list[dict]:
    """The ops with most self CPU time in one step (torch.profiler); shares of their sum."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(t)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:rows]]


def warm_up(settings, log) -> tuple[dict, dict]:
    """Every configuration's first step (compiling it, if compiled): its trainer and its row,
    with the parity check."""
    trainers, rows = {}, {}
    for lib in LIBRARIES:
        for precision, cl, compiled in configs(settings.compile_precision):
            name = f"{lib} {label(precision, cl, compiled)}"
            t = trainer(lib, settings.train_batch, settings.resolution, precision, cl, compiled)
            first = step(t)
            loss = t.state.history[0]["loss"]
            ref = rows.get(f"{lib} fp32", {"loss": loss})["loss"]
            diff = abs(loss - ref) / abs(ref)
            rows[name] = {"library": lib, "precision": precision, "channels_last": cl,
                          "compiled": compiled, "first_step_s": first, "loss": loss,
                          "loss_rel_diff": diff, "correct": diff <= TOLERANCE[precision]}
            trainers[name] = t
            log(f"  {name}: first step {first:.1f} s, loss rel. diff {diff:.1e}")
    return trainers, rows


def run(settings, log) -> dict:
    trainers, rows = warm_up(settings, log)
    log(f"  {len(trainers)} configurations x {settings.train_rounds} rounds")
    samples = interleaved({n: partial(step, t) for n, t in trainers.items()},
                          settings.train_rounds)
    for name, s in samples.items():
        rows[name] = row(s, settings.train_batch, **rows[name])
        log(f"  {name}: {rows[name]['img_s']:.1f} img/s")
    top = {lib: best(rows, library=lib) for lib in LIBRARIES}
    ratios = []
    for c in configs(settings.compile_precision):
        pair = [f"{lib} {label(*c)}" for lib in LIBRARIES]
        ratios.append(ratio(f"bit_core / timm, {label(*c)}", rows, *pair,
                            headline=c in (("fp32", False, False), ("bf16", True, False))))
    ratios.append(ratio("bit_core best / timm best", rows, top["bit_core"], top["timm"],
                        headline=True))
    return {"batch": settings.train_batch, "resolution": settings.resolution,
            "rounds": settings.train_rounds, "rows": rows, "best": top,
            "profiles": {name: profile(trainers[name]) for name in top.values() if name},
            "ratios": [r for r in ratios if r]}
