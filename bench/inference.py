"""Section 2: inference images/s at several batch sizes and batch-1 latency.

Every back-end is a numpy -> numpy predictor (:mod:`bit_core.evaluate`), timed by
``bit_core.evaluate.measure_speed`` one batch at a time, the back-ends taking turns. The first call
of each back-end at each batch size warms it up (and compiles it, for torch.compile) and checks
its logits against the fp32 eager model of its library (ONNX Runtime against bit_core's).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config as inductor_config

from bench import compile_probe, models
from bench.timing import interleaved, paired_ratio_range, profile_top_ops, summary
from bit_core import fold_weight_standardization
from bit_core.evaluate import measure_speed, onnx_predictor, torch_predictor
from bit_core.export import export_onnx, onnx_session

CPU = torch.device("cpu")
# Max |logits - reference| / max |reference| for a back-end to count as correct.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}
BIT_FP32 = "bit_core eager fp32"
TIMM_FP32 = "timm eager fp32"
ORT = "ONNX Runtime fp32"
ORT_SPIN = "ONNX Runtime fp32, spin-wait"


@dataclass(frozen=True)
class InferVariant:
    name: str
    library: str  # bit_core | timm | onnxruntime | candidate
    precision: str = "fp32"
    channels_last: bool = False
    folded: bool = False
    compiled: bool = False


def _batch(batch: int, resolution: int, seed: int = 0) -> np.ndarray:
    """The batch measure_speed times (same generator and seed)."""
    x = np.random.default_rng(seed).uniform(-1, 1, (batch, 3, resolution, resolution))
    return x.astype(np.float32)


def compiled_predictor(folded: torch.nn.Module, precision: str) -> Callable:
    """torch.compile of the folded model, channels_last, weights frozen into the graph
    (``torch._inductor.config.freezing``); one static graph per batch size."""
    model = folded.eval().to(memory_format=torch.channels_last)
    inner = torch_predictor(torch.compile(model, dynamic=False), CPU, precision,
                            channels_last=True)

    def predict(batch: np.ndarray) -> np.ndarray:
        with inductor_config.patch(freezing=True):
            return inner(batch)

    return predict


def build(settings, scratch: Path, log) -> tuple[dict[str, InferVariant], dict[str, Callable]]:
    bit = models.bit_model().eval()
    folded = fold_weight_standardization(bit)
    timm = models.timm_model().eval()
    specs: list[tuple[InferVariant, Callable[[], Callable]]] = [
        (InferVariant(BIT_FP32, "bit_core"), lambda: torch_predictor(copy.deepcopy(bit), CPU)),
        (InferVariant("bit_core folded fp32", "bit_core", folded=True),
         lambda: torch_predictor(copy.deepcopy(folded), CPU)),
        (InferVariant("bit_core folded fp32 channels_last", "bit_core", channels_last=True,
                      folded=True),
         lambda: torch_predictor(copy.deepcopy(folded), CPU, channels_last=True)),
        (InferVariant("bit_core folded bf16 channels_last", "bit_core", "bf16", True, True),
         lambda: torch_predictor(copy.deepcopy(folded), CPU, "bf16", channels_last=True)),
    ]
    if settings.compile:
        p = settings.compile_precision
        specs.append((InferVariant(f"bit_core compiled (frozen) {p} channels_last", "bit_core",
                                   p, True, True, compiled=True),
                      lambda: compiled_predictor(copy.deepcopy(folded), p)))
    specs += [
        (InferVariant("candidate eager fp32 (bit_core, layer_norm WS)", "candidate"),
         lambda: torch_predictor(models.candidate_model(bit), CPU)),
        (InferVariant(TIMM_FP32, "timm"), lambda: torch_predictor(copy.deepcopy(timm), CPU)),
        (InferVariant("timm eager fp32 channels_last", "timm", channels_last=True),
         lambda: torch_predictor(copy.deepcopy(timm), CPU, channels_last=True)),
        (InferVariant("timm eager bf16 channels_last", "timm", "bf16", True),
         lambda: torch_predictor(copy.deepcopy(timm), CPU, "bf16", channels_last=True)),
    ]
    start = time.perf_counter()
    onnx_path = export_onnx(bit, scratch / "model.onnx", resolution=settings.resolution)
    log(f"  exported ONNX in {time.perf_counter() - start:.1f} s "
        f"({onnx_path.stat().st_size / 1e6:.0f} MB)")
    specs += [
        (InferVariant(ORT, "onnxruntime", folded=True),
         lambda: onnx_predictor(onnx_session(onnx_path, settings.threads))),
        (InferVariant(ORT_SPIN, "onnxruntime", folded=True),
         lambda: onnx_predictor(onnx_session(onnx_path, settings.threads, spinning=True))),
    ]
    return {v.name: v for v, _ in specs}, {v.name: make() for v, make in specs}


def _ratio(name, rows, num, den, batch, samples) -> dict | None:
    key = str(batch)
    if num is None or den is None or key not in rows[num]["results"] \
            or key not in rows[den]["results"]:
        return None
    a, b = rows[num]["results"][key]["img_s"], rows[den]["results"][key]["img_s"]
    return {"name": f"{name}, batch {batch}", "batch": batch, "numerator": num,
            "denominator": den, "numerator_value": a, "denominator_value": b, "value": a / b,
            "metric": "img_s", "per_round_range": paired_ratio_range(samples[num], samples[den])}


def run(settings, log) -> dict:
    res = settings.resolution
    child_compile = compile_probe.prewarm("infer", list(settings.infer_batches), settings, log) \
        if settings.compile else {}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as scratch:
        specs, predictors = build(settings, Path(scratch), log)
        rows = {name: {**asdict(v), "results": {}, "parity": {}, "skipped": {}}
                for name, v in specs.items()}
        all_samples: dict[int, dict[str, list[float]]] = {}
        for batch in settings.infer_batches:
            x = _batch(batch, res)
            outputs, active = {}, {}
            for name, predict in predictors.items():
                if specs[name].compiled and isinstance(child_compile.get(batch), str):
                    rows[name]["skipped"][str(batch)] = child_compile[batch]
                    continue
                start = time.perf_counter()
                outputs[name] = predict(x)
                rows[name]["results"][str(batch)] = {"first_call_s": time.perf_counter() - start}
                if specs[name].compiled:
                    rows[name]["results"][str(batch)]["child_compile_s"] = child_compile[batch]
                active[name] = predict
            for name in active:
                ref = outputs[TIMM_FP32 if specs[name].library == "timm" else BIT_FP32]
                err = float(np.abs(outputs[name] - ref).max() / max(np.abs(ref).max(), 1e-12))
                tol = TOLERANCE[specs[name].precision]
                agree = float((outputs[name].argmax(1) == ref.argmax(1)).mean())
                rows[name]["parity"][str(batch)] = {"max_rel_err": err, "tolerance": tol,
                                                    "top1_agreement": agree,
                                                    "correct": err <= tol}
            rounds = settings.infer_repeats[batch] + settings.infer_warmup[batch]

            def timer(predict, b=batch):
                return lambda: measure_speed(predict, b, res, warmup=0, repeats=1)[
                    "latency_ms_p50"] / 1e3

            log(f"  batch {batch}: {len(active)} back-ends x {rounds} interleaved rounds")
            samples = interleaved({n: timer(p) for n, p in active.items()}, rounds)
            samples = {n: s[settings.infer_warmup[batch]:] for n, s in samples.items()}
            all_samples[batch] = samples
            for name, s in samples.items():
                entry = rows[name]["results"][str(batch)]
                entry.update(summary(s))
                entry["img_s"] = batch / entry["median_s"]
                entry["latency_ms"] = 1e3 * entry["median_s"]
                if specs[name].compiled:
                    entry["compile_s"] = max(entry["first_call_s"] - entry["median_s"], 0.0)
            for name in samples:
                entry = rows[name]["results"][str(batch)]
                for ref_name, key in ((TIMM_FP32, "vs_timm_fp32"), (BIT_FP32, "vs_bit_core_fp32")):
                    if ref_name in samples:
                        entry[key] = entry["img_s"] / rows[ref_name]["results"][str(batch)]["img_s"]
            log("    " + ", ".join(f"{n}: {rows[n]['results'][str(batch)]['img_s']:.1f}"
                                  for n in samples))

        best = {}
        for batch in settings.infer_batches:
            key = str(batch)
            for lib, allowed in (("bit_core", {"bit_core"}), ("timm", {"timm"}),
                                 ("onnxruntime", {"onnxruntime"})):
                names = [n for n, r in rows.items() if r["library"] in allowed
                         and key in r["results"] and "img_s" in r["results"][key]
                         and r["parity"][key]["correct"]]
                best.setdefault(lib, {})[key] = max(
                    names, key=lambda n: rows[n]["results"][key]["img_s"]) if names else None
        ratios = []
        for batch in settings.infer_batches:
            key, s = str(batch), all_samples[batch]
            ratios += [
                _ratio("bit_core best / timm best", rows, best["bit_core"][key],
                       best["timm"][key], batch, s),
                _ratio("bit_core best / timm eager fp32", rows, best["bit_core"][key],
                       TIMM_FP32, batch, s),
                _ratio("bit_core eager fp32 / timm eager fp32", rows, BIT_FP32, TIMM_FP32,
                       batch, s),
                _ratio("ONNX Runtime / PyTorch eager fp32 (bit_core)", rows, ORT, BIT_FP32,
                       batch, s),
                _ratio("ONNX Runtime spin-wait / PyTorch eager fp32 (bit_core)", rows,
                       ORT_SPIN, BIT_FP32, batch, s),
                _ratio("ONNX Runtime / bit_core folded fp32 (same graph in PyTorch)", rows, ORT,
                       "bit_core folded fp32", batch, s),
                _ratio("bit_core folded / bit_core eager fp32", rows, "bit_core folded fp32",
                       BIT_FP32, batch, s),
                _ratio("candidate (layer_norm WS) / bit_core eager fp32", rows,
                       "candidate eager fp32 (bit_core, layer_norm WS)", BIT_FP32, batch, s),
            ]
        profiles = {}
        if settings.profile:
            small, large = min(settings.infer_batches), max(settings.infer_batches)
            picks = [(BIT_FP32, small), (best["bit_core"][str(large)], large)]
            for name, batch in picks:
                if name:
                    log(f"  profiling {name} at batch {batch}")
                    x = _batch(batch, res)
                    profiles[f"{name}, batch {batch}"] = profile_top_ops(
                        lambda p=predictors[name], x=x: p(x))
        del predictors
    return {"model": models.MODEL, "timm_model": models.TIMM_MODEL, "resolution": res,
            "batches": list(settings.infer_batches), "variants": list(rows.values()),
            "best": best, "ratios": [r for r in ratios if r], "profiles": profiles}
