"""The `infer` section: inference images/s per batch size, bit_core against timm, ONNX Runtime
and OpenVINO (bf16 and int8 where the CPU has the units).

Every back-end is a numpy -> numpy predictor from :mod:`bit_core.evaluate`, called on the same
batch. Its first call at each batch size warms it up (compiles it, for torch.compile and
OpenVINO) and checks its logits against the eager fp32 model of its library (ONNX Runtime
against bit_core's); then the back-ends take turns, one batch each per round.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench.measure import CPU, best, build, interleaved, ratio, row, timed
from bit_core import fold_weight_standardization
from bit_core.evaluate import compiled_predictor, onnx_predictor, torch_predictor
from bit_core.export import export_onnx, onnx_session

# Max |logits - reference| / max |reference|. A random initialisation amplifies bf16 rounding:
# 0.1-0.25 for both libraries' bf16 rows, where a wrong computation is off by the order of 1.
TOLERANCE = {"fp32": 1e-3, "bf16": 0.3, "int8": 0.3}
REFERENCE = {"bit_core": "bit_core eager fp32", "timm": "timm eager fp32",
             "onnxruntime": "bit_core eager fp32"}


def openvino_rows(settings, onnx_path: Path, log) -> dict[str, tuple]:
    """bit_core's export on OpenVINO: bf16 where the CPU has the units (else fp32), and the
    int8 IR (NNCF, calibrated on random images: only its speed counts here) where it has int8
    dot products. What this CPU lacks is logged, not measured."""
    from bit_core.backends import openvino_missing
    from bit_core.device import cpu_units
    from bit_core.openvino_ir import (inference_precision, ir_predictor, quantize_int8, read_onnx,
                                      save_ir)

    if (missing := openvino_missing()) is not None:
        log(f"  OpenVINO not measured: {missing}")
        return {}
    units, rows = cpu_units(), {}
    xml = save_ir(read_onnx(onnx_path), onnx_path.with_name("model.xml"))
    p = "bf16" if units.fast_bf16 else "fp32"
    rows[f"bit_core OpenVINO {p}"] = ("bit_core", p, ir_predictor(
        xml, inference_precision(p, units), settings.threads))
    if not units.fast_int8:
        log(f"  OpenVINO int8 not measured: no AMX-int8 or VNNI ({units.describe()})")
        return rows
    images = [np.random.default_rng(i).uniform(-1, 1, (3, settings.resolution,
                                                       settings.resolution)).astype(np.float32)
              for i in range(8)]
    int8 = save_ir(quantize_int8(onnx_path, images), onnx_path.with_name("int8.xml"))
    rows["bit_core OpenVINO int8"] = ("bit_core", "int8", ir_predictor(
        int8, inference_precision("int8", units), settings.threads))
    return rows


def backends(settings, onnx_path: Path, bit: torch.nn.Module, log) -> dict[str, tuple]:
    """name -> (library, precision, predictor); each library's eager fp32 reference first."""
    timm, folded, fresh = build("timm").eval(), fold_weight_standardization(bit), copy.deepcopy
    out = {
        "bit_core eager fp32": ("bit_core", "fp32", torch_predictor(fresh(bit), CPU)),
        "bit_core folded fp32": ("bit_core", "fp32", torch_predictor(fresh(folded), CPU)),
        "bit_core folded bf16 channels_last": ("bit_core", "bf16", torch_predictor(
            fresh(folded), CPU, "bf16", channels_last=True)),
        "timm eager fp32": ("timm", "fp32", torch_predictor(fresh(timm), CPU)),
        "timm eager bf16 channels_last": ("timm", "bf16", torch_predictor(
            fresh(timm), CPU, "bf16", channels_last=True)),
        "ONNX Runtime fp32": ("onnxruntime", "fp32", onnx_predictor(
            onnx_session(onnx_path, settings.threads))),
    }
    p = settings.compile_precision
    if p:
        out[f"bit_core folded compiled {p} channels_last"] = (
            "bit_core", p, compiled_predictor(fresh(folded), CPU, p))
        out[f"timm compiled {p} channels_last"] = ("timm", p,
                                                   compiled_predictor(fresh(timm), CPU, p))
    return {**out, **openvino_rows(settings, onnx_path, log)}


def first_calls(predictors: dict, x: np.ndarray, rows: dict) -> dict[str, Callable]:
    """Warm every back-end up on `x` (compiling it, if compiled) and check its logits; add its
    row; return a timed call of each, by row name."""
    batch, outputs, calls = len(x), {}, {}
    for name, (library, precision, predict) in predictors.items():
        start = time.perf_counter()
        outputs[name] = predict(x)
        first = time.perf_counter() - start
        ref = outputs[REFERENCE[library]]
        err = float(np.abs(outputs[name] - ref).max() / np.abs(ref).max())
        key = f"{name}, batch {batch}"
        rows[key] = {"backend": name, "library": library, "precision": precision, "batch": batch,
                     "first_call_s": first, "max_rel_err": err,
                     "correct": err <= TOLERANCE[precision]}
        calls[key] = timed(lambda p=predict: p(x))
    return calls


def batch_ratios(rows: dict, batch: int) -> list[dict | None]:
    top = {lib: best(rows, library=lib, batch=batch) for lib in ("bit_core", "timm")}
    at = f", batch {batch}"
    return [ratio(f"bit_core / timm, eager fp32{at}", rows, f"bit_core eager fp32{at}",
                  f"timm eager fp32{at}"),
            ratio(f"bit_core best / timm best{at}", rows, top["bit_core"], top["timm"],
                  headline=True),
            ratio(f"ONNX Runtime / bit_core eager fp32{at}", rows, f"ONNX Runtime fp32{at}",
                  f"bit_core eager fp32{at}", headline=True),
            ratio(f"ONNX Runtime / bit_core best{at}", rows, f"ONNX Runtime fp32{at}",
                  top["bit_core"])]


def run(settings, log) -> dict:
    rows, ratios = {}, []
    bit = build("bit_core").eval()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        onnx_path = export_onnx(bit, Path(scratch) / "model.onnx", resolution=settings.resolution)
        predictors = backends(settings, onnx_path, bit, log)
        for batch in settings.infer_batches:
            x = np.random.default_rng(batch).uniform(
                -1, 1, (batch, 3, settings.resolution, settings.resolution)).astype(np.float32)
            calls = first_calls(predictors, x, rows)
            rounds = settings.infer_rounds[batch]
            log(f"  batch {batch}: {len(calls)} back-ends x {rounds} rounds")
            for key, s in interleaved(calls, rounds, settings.infer_warmup).items():
                rows[key] = row(s, batch, **rows[key])
                log(f"    {key}: {rows[key]['img_s']:.1f} img/s")
            ratios += batch_ratios(rows, batch)
    return {"resolution": settings.resolution, "batches": list(settings.infer_batches),
            "rows": rows, "ratios": [r for r in ratios if r]}
