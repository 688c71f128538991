"""The `train` section: training images/s of bit_core and timm through the product's Trainer.

Both models train in ``bit_core.train.Trainer`` (fused SGD, the project's autocast and
channels_last handling, torch.compile as ``train.compile`` does it) on the same images, so the
model is the only difference.

Correctness is judged by training, not by one step: every configuration first trains
``settings.curve_steps`` steps on real images (scikit-learn's handwritten digits, enlarged to
the bench's resolution), and its loss curve is compared with the fp32 curve of its library by the
seeds' alignment rule (:func:`bit_core.align.compare_curves`, MRE <= 0.05). One step at a random
initialisation would not do: a deep network amplifies bf16 rounding there (gradient cosines of
~0.5 against fp32 for timm and bit_core alike) while the curves over training agree. Those steps
also warm each configuration up (and compile it). Then the configurations take turns, one step
each per round.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from bench.measure import CPU, LIBRARIES, NUM_CLASSES, best, create, interleaved, ratio, row
from bit_core.align import compare_curves
from bit_core.config import TrainConfig, load_params
from bit_core.hyperrule import get_schedule
from bit_core.train import Trainer

REPO = Path(__file__).resolve().parents[1]


def configs(compile_precision: str | None) -> list[tuple[str, bool, bool]]:
    """(precision, channels_last, compiled) of every configuration, for each library; the fp32
    reference first."""
    out = [("fp32", False, False), ("fp32", True, False), ("bf16", True, False)]
    return out + [(compile_precision, True, True)] if compile_precision else out


def label(precision: str, channels_last: bool, compiled: bool) -> str:
    return precision + " channels_last" * channels_last + " compiled" * compiled


def digits(count: int, resolution: int) -> TensorDataset:
    """`count` of scikit-learn's 8x8 handwritten digits as RGB images of `resolution` px in
    [-1, 1], with their labels (10 classes)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images[:count].astype(np.float32) / 8 - 1)[:, None]
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear")
    return TensorDataset(images.expand(-1, 3, -1, -1).contiguous(),
                         torch.from_numpy(data.target[:count]) % NUM_CLASSES)


def trainer(library: str, batch: int, resolution: int, precision: str = "fp32",
            channels_last: bool = False, compiled: bool = False, images: int = 256) -> Trainer:
    """A Trainer of `library`'s model, initialised as the library does it (bit_core's head at
    zero), on `images` digits held in memory (no loading cost). Learning rate, warm-up,
    momentum and weight decay are the default experiment's (params.yaml); the schedule then
    stays at its peak."""
    data = digits(images, resolution)
    base = load_params(REPO / "params.yaml").train
    warm_up_steps = (base.schedule or get_schedule(len(data)))[0]
    cfg = TrainConfig(**{**base.model_dump(), "batch": batch, "batch_split": 1, "seed": 0,
                         "schedule": [warm_up_steps, 10**6], "mixup_alpha": 0.0,
                         "stop_after": None, "workers": 0, "processes": 1, "nodes": 1,
                         "rdzv_endpoint": None, "device": "cpu", "precision": precision,
                         "channels_last": channels_last, "compile": compiled})
    torch.manual_seed(0)
    return Trainer(create(library), data, cfg, CPU)


def step(t: Trainer) -> float:
    """Seconds of one ``Trainer.fit`` step."""
    start = time.perf_counter()
    t.fit(until=t.state.step + 1)
    return time.perf_counter() - start


# The kernels of a training step, by what they compute (torch.profiler op names).
KINDS = {"convolution": ("convolution", "conv2d"), "matrix product": ("mm", "addmm", "linear",
                                                                       "matmul", "bmm"),
         "group norm": ("group_norm",), "weight standardisation": ("layer_norm",),
         "optimizer": ("sgd",), "dtype and layout copies": ("copy_", "_to_copy", "clone"),
         "compiled kernels (inductor)": ("CompiledFxGraph", "cpp_fused")}


def kind(op: str) -> str:
    name = op.lower()
    return next((k for k, keys in KINDS.items() if any(key.lower() in name for key in keys)),
                "other (elementwise, pooling, loss, framework)")


def profile(t: Trainer, rows: int = 10) -> dict:
    """One step under torch.profiler: the ops with most self CPU time, and the step's time by
    kind of kernel (shares of the total self time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(t)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    kinds: dict[str, float] = {}
    for e in events:
        kinds[kind(e.key)] = kinds.get(kind(e.key), 0.0) + e.self_cpu_time_total
    return {"ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3,
                     "share": e.self_cpu_time_total / total, "calls": e.count}
                    for e in events[:rows]],
            "kinds": [{"kind": k, "self_ms": v / 1e3, "share": v / total}
                      for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]}


def warm_up(settings, log) -> tuple[dict, dict]:
    """Every configuration's first `curve_steps` steps (compiling it, if compiled): its trainer
    and its row, with its loss curve's alignment to its library's fp32 curve."""
    trainers, rows, reference = {}, {}, {}
    for lib in LIBRARIES:
        for precision, cl, compiled in configs(settings.compile_precision):
            name = f"{lib} {label(precision, cl, compiled)}"
            t = trainer(lib, settings.train_batch, settings.resolution, precision, cl, compiled)
            first = step(t)
            t.fit(until=settings.curve_steps)
            curve = {r["step"]: r["loss"] for r in t.state.history}
            reference.setdefault(lib, curve)
            align = compare_curves(curve, reference[lib])
            rows[name] = {"library": lib, "precision": precision, "channels_last": cl,
                          "compiled": compiled, "first_step_s": first, "curve": curve,
                          "loss_mre": align.mre, "correct": align.passed}
            trainers[name] = t
            log(f"  {name}: first step {first:.1f} s, loss {curve[1]:.3f} -> "
                f"{curve[max(curve)]:.3f} in {len(curve)} steps, MRE vs fp32 {align.mre:.4f}")
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
                            headline=c == ("fp32", False, False)))
    ratios.append(ratio("bit_core best / timm best", rows, top["bit_core"], top["timm"],
                        headline=True))
    return {"batch": settings.train_batch, "resolution": settings.resolution,
            "rounds": settings.train_rounds, "curve_steps": settings.curve_steps, "rows": rows,
            "best": top, "profiles": {name: profile(trainers[name]) for name in top.values()
                                      if name},
            "ratios": [r for r in ratios if r]}
