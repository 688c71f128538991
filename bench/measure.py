"""What the sections share: the two models, interleaved timing, rows and ratios; the `flops`
section (model FLOPs, the GEMM peak and the memory bandwidth of this machine, and the activations
GroupNorm normalises, which bound the non-matrix part of a training step)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MODEL, TIMM_MODEL, NUM_CLASSES = "BiT-M-R50x1", "resnetv2_50x1_bit", 10
LIBRARIES = ("bit_core", "timm")
CPU = torch.device("cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def create(library: str) -> nn.Module:
    """bit_core's BiT-M-R50x1 or timm's resnetv2_50x1_bit (the same network), untrained."""
    if library == "timm":
        import timm

        return timm.create_model(TIMM_MODEL, pretrained=False, num_classes=NUM_CLASSES)
    import bit_core

    return bit_core.create_model(MODEL, num_classes=NUM_CLASSES)


def build(library: str, seed: int = 0) -> nn.Module:
    """`create` with a seeded random head: bit_core zero-initialises a new head, which would make
    every logit 0 and every body gradient 0, so the parity checks would compare nothing."""
    torch.manual_seed(seed)
    model = create(library)
    head = model.get_classifier() if library == "timm" else model.fc
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator)
                          / head.weight[0].numel() ** 0.5)
    return model


def interleaved(fns: dict[str, Callable[[], float]], rounds: int,
                warmup: int = 0) -> dict[str, list[float]]:
    """Call every function once per round, rotating the order; each returns its own seconds.

    Round i of every variant runs at nearly the same moment, so a burst of load from other jobs
    slows all of them alike and their ratios stay meaningful on a shared machine. The first
    `warmup` rounds are dropped.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(float(fns[name]()))
    return {name: s[warmup:] for name, s in samples.items()}


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def row(samples: list[float], images: int | None = None, **fields) -> dict:
    """Fastest, median and slowest seconds and the samples; images/s of the fastest if `images`
    (per sample) is given. The fastest round is the reported value: other jobs on a shared
    machine only ever slow a call down, and they come and go within a round, so the fastest
    round is the closest to what the code costs; median and slowest show how loaded it was."""
    out = {**fields, "min_s": min(samples), "median_s": statistics.median(samples),
           "max_s": max(samples), "samples_s": samples}
    if images:
        out.update(images=images, img_s=images / out["min_s"])
    return out


def _per_round(r: dict, metric: str) -> list[float]:
    return [r["images"] / s if metric == "img_s" else s for s in r["samples_s"]]


def ratio(name: str, rows: dict, num: str | None, den: str | None, metric: str = "img_s",
          headline: bool = False) -> dict | None:
    """rows[num][metric] / rows[den][metric] and its range over the rounds (None if either row
    is missing)."""
    if num not in rows or den not in rows:
        return None
    a, b = rows[num], rows[den]
    pairs = [x / y for x, y in zip(_per_round(a, metric), _per_round(b, metric))]
    return {"name": name, "numerator": num, "denominator": den, "metric": metric,
            "numerator_value": a[metric], "denominator_value": b[metric],
            "value": a[metric] / b[metric], "per_round": [min(pairs), max(pairs)],
            "headline": headline}


def best(rows: dict, **match) -> str | None:
    """The fastest correct row whose fields equal `match`."""
    names = [n for n, r in rows.items() if r.get("correct", True)
             and all(r.get(k) == v for k, v in match.items())]
    return max(names, key=lambda n: rows[n]["img_s"], default=None)


def count_flops(library: str, resolution: int, train: bool) -> int:
    """FLOPs of one image (2 per multiply-add of convolutions and matrix products), counted on
    the meta device; `train` adds the backward of the loss."""
    with torch.device("meta"):
        model = create(library)
        with FlopCounterMode(display=False) as counter:
            logits = model(torch.empty(1, 3, resolution, resolution))
            if train:
                F.cross_entropy(logits, torch.zeros(1, dtype=torch.long)).backward()
    return int(counter.get_total_flops())


def gemm(n: int, precision: str, repeats: int) -> dict:
    """torch.mm of n x n matrices; GFLOP/s of the fastest call (the peak is what the hardware
    does at best; a shared machine's load only slows calls down)."""
    a, b = (torch.randn(n, n).to(DTYPES[precision]) for _ in range(2))
    torch.mm(a, b)
    out = row([timed(lambda: torch.mm(a, b))() for _ in range(repeats)], n=n,
              precision=precision)
    return {**out, "gflops": 2 * n**3 / out["min_s"] / 1e9}


def norm_elements(resolution: int) -> int:
    """Elements of bit_core's GroupNorm outputs for one image (counted on the meta device)."""
    counted = []
    with torch.device("meta"):
        model = create("bit_core")
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                module.register_forward_hook(lambda m, i, out: counted.append(out.numel()))
        model(torch.empty(1, 3, resolution, resolution))
    return sum(counted)


def copy_bandwidth(megabytes: int, repeats: int) -> dict:
    """GB/s of a bf16 tensor copy (bytes read plus bytes written), fastest call: what a
    memory-bound kernel that streams its data once can reach here."""
    src = torch.ones(megabytes * 2**19, dtype=torch.bfloat16)  # 2 bytes an element
    dst = torch.empty_like(src)
    dst.copy_(src)
    out = row([timed(lambda: dst.copy_(src))() for _ in range(repeats)], megabytes=megabytes)
    return {**out, "gbs": 2 * src.numel() * src.element_size() / out["min_s"] / 1e9}


def run(settings, log) -> dict:
    """The `flops` section."""
    res = settings.resolution
    flops = {lib: {"forward": count_flops(lib, res, False), "train": count_flops(lib, res, True)}
             for lib in LIBRARIES}
    rows = {f"torch.mm {p} {n}x{n}": gemm(n, p, settings.gemm_repeats) for p in DTYPES
            for n in settings.gemm_sizes}
    peak = {p: max(r["gflops"] for r in rows.values() if r["precision"] == p) for p in DTYPES}
    bandwidth = copy_bandwidth(settings.copy_megabytes, settings.gemm_repeats)
    log(f"  {MODEL} at {res} px: {flops['bit_core']['forward'] / 1e9:.2f} GFLOP forward, "
        f"{flops['bit_core']['train'] / 1e9:.2f} train; GEMM peak fp32 {peak['fp32']:.0f}, "
        f"bf16 {peak['bf16']:.0f} GFLOP/s; copy {bandwidth['gbs']:.1f} GB/s")
    return {"resolution": res, "flops_per_image": flops, "peak_gflops": peak, "rows": rows,
            "copy": bandwidth, "norm_elements_per_image": norm_elements(res), "ratios": []}
