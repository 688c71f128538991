"""Section 4: how the forward cost grows with batch size, resolution and model size.

Timed configuration: bit_core eager fp32 with weight standardisation folded (the inference form
of the model, no per-call kernel statistics). Model sizes are counted on the meta device (R152x4
would allocate 3.7 GB); only the smallest ones are timed.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from bench import models
from bench.compute import count_flops
from bench.timing import interleaved, summary
from bit_core import fold_weight_standardization
from bit_core.evaluate import measure_speed, torch_predictor
from bit_core.model import build_model, list_models

CPU = torch.device("cpu")


def _timer(predict, batch: int, resolution: int):
    return lambda: measure_speed(predict, batch, resolution, warmup=0, repeats=1)[
        "latency_ms_p50"] / 1e3


def _sweep(points: dict, warmup: int, repeats: int) -> dict[str, dict]:
    samples = interleaved(points, warmup + repeats)
    return {key: summary(s[warmup:]) for key, s in samples.items()}


def run(settings, log) -> dict:
    res = settings.resolution
    predict = torch_predictor(fold_weight_standardization(models.bit_model()), CPU)
    fwd = count_flops(lambda: build_model(models.MODEL, models.NUM_CLASSES), res)

    log(f"  batch sweep {settings.scaling_batches} at {res} px")
    stats = _sweep({str(b): _timer(predict, b, res) for b in settings.scaling_batches},
                   settings.scaling_warmup, settings.scaling_repeats)
    batch_rows = []
    for b in settings.scaling_batches:
        s = stats[str(b)]
        batch_rows.append({"batch": b, "resolution": res, "ms_per_batch": 1e3 * s["median_s"],
                           "ms_per_image": 1e3 * s["median_s"] / b,
                           "img_s": b / s["median_s"], "gflops": fwd * b / s["median_s"] / 1e9,
                           **s})

    b = settings.scaling_resolution_batch
    log(f"  resolution sweep {settings.scaling_resolutions} at batch {b}")
    stats = _sweep({str(r): _timer(predict, b, r) for r in settings.scaling_resolutions},
                   settings.scaling_warmup, settings.scaling_repeats)
    res_rows = []
    for r in settings.scaling_resolutions:
        s = stats[str(r)]
        flops = count_flops(lambda: build_model(models.MODEL, models.NUM_CLASSES), r)
        res_rows.append({"resolution": r, "batch": b, "gflop_per_image": flops / 1e9,
                         "ms_per_image": 1e3 * s["median_s"] / b, "img_s": b / s["median_s"],
                         "gflops": flops * b / s["median_s"] / 1e9, **s})
    del predict
    gc.collect()

    model_rows = []
    for name in [n for n in list_models() if n.startswith("BiT-M-")]:
        with torch.device("meta"):
            params = models.param_count(build_model(name, models.NUM_CLASSES))
        flops = count_flops(lambda n=name: build_model(n, models.NUM_CLASSES), res)
        model_rows.append({"model": name, "params": params, "weights_mb_fp32": params * 4 / 1e6,
                           "gflop_per_image": flops / 1e9, "resolution": res})
    timed = sorted(model_rows, key=lambda row: row["gflop_per_image"])[:settings.scaling_models]
    log(f"  timing {', '.join(r['model'] for r in timed)} at batch {b}, {res} px")
    predictors = {row["model"]: torch_predictor(
        fold_weight_standardization(models.bit_model(row["model"])), CPU) for row in timed}
    stats = _sweep({name: _timer(p, b, res) for name, p in predictors.items()},
                   settings.scaling_warmup, settings.scaling_repeats)
    for row in timed:
        s = stats[row["model"]]
        row.update({"batch": b, "ms_per_image": 1e3 * s["median_s"] / b,
                    "img_s": b / s["median_s"],
                    "gflops": row["gflop_per_image"] * b / s["median_s"], **s})
    del predictors
    gc.collect()

    # Exponent of a power law through the end points: cost ~ x^k.
    def exponent(xs, ys):
        return float(np.log(ys[-1] / ys[0]) / np.log(xs[-1] / xs[0])) if len(xs) > 1 else None

    return {
        "configuration": "bit_core eager fp32, weight standardisation folded",
        "batch": batch_rows, "resolution": res_rows, "models": model_rows,
        "fits": {
            "batch_time_exponent": exponent([r["batch"] for r in batch_rows],
                                            [r["ms_per_batch"] for r in batch_rows]),
            "resolution_time_exponent": exponent([r["resolution"] for r in res_rows],
                                                 [r["ms_per_image"] for r in res_rows]),
            "resolution_flops_exponent": exponent([r["resolution"] for r in res_rows],
                                                  [r["gflop_per_image"] for r in res_rows]),
        },
        "plot": "scaling.png",
    }
