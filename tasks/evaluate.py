"""Stage evaluate: top-1/top-5 on the test split and images/s per batch size for every back-end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bit_core.backends import (GATE_PP, OM, REFERENCE, Backend, Plan, fastest, gate_miss,
                               plan)
from bit_core.config import Params
from bit_core.contracts import (CHECKPOINT, EVALUATION, IR_MANIFEST, OM_MANIFEST,
                                EvaluationMetrics, IRManifest, IRStatus, OMManifest, OMStatus,
                                metric_key)
from bit_core.data import ImageListDataset, check_loader_workers, eval_transform
from bit_core.device import CpuUnits, cpu_units, resolve_device
from bit_core.errors import ContractError, ParityError
from bit_core.evaluate import (Predict, compiled_predictor, confusion_matrix, cpu_used_elsewhere,
                               measure_speed, onnx_predictor, padded_predictor, predict_all,
                               topk_accuracy, torch_predictor)
from bit_core.export import onnx_session
from bit_core.io import atomic_write_json, atomic_write_text
from bit_core.model import fold_weight_standardization
from bit_core.om import AIS_BENCH_HINT, read_ais_outputs, run_ais_bench
from bit_core.openvino_ir import inference_precision, ir_predictor
from bit_core.record import ModelRecord
from bit_core.plots import plot_confusion, plot_fps
from bit_core.splits import read_classes, read_split
from bit_core.weights import load_trained
from tasks import tracking
from tasks.common import log, stage_main

TOP1_TOLERANCE_PP = 0.1  # ONNX Runtime must agree with PyTorch fp32 to this many points
ACCURACY_BATCH = 64  # test images per call in the accuracy pass


def fast_precision(device: torch.device) -> str:
    """The reduced precision used for the fast PyTorch path on this device."""
    return "bf16" if device.type in ("cpu", "cuda") else "fp16"


def host_plan(cfg, device: torch.device, units: CpuUnits, ir_dir: Path) -> Plan:
    """The back-ends to measure here: by the device, the CPU's units and what compile_openvino
    built (its manifest)."""
    manifest = IRManifest.read(ir_dir / IR_MANIFEST, "compile_openvino")
    built = manifest.status is IRStatus.BUILT
    return plan(device.type, units, fast=fast_precision(device), compiled=cfg.compiled,
                cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
                openvino_ir=None if built else manifest.reason,
                int8_ir=None if "int8" in manifest.files else manifest.int8_reason)


def _factories(host: Plan, model, onnx_path: Path, ir_dir: Path, device: torch.device,
               units: CpuUnits, threads: int | None) -> dict[str, Callable[[], Predict]]:
    """name -> a function building that back-end's predictor (built one at a time: a compiled
    model holds its own copy of the weights)."""
    manifest = IRManifest.read(ir_dir / IR_MANIFEST, "compile_openvino") \
        if any(b.runtime == "openvino" for b in host.backends) else None

    def make(b: Backend) -> Callable[[], Predict]:
        if b.runtime == "torch":
            return lambda: torch_predictor(fold_weight_standardization(model), device,
                                           b.precision, channels_last=b.precision != "fp32")
        if b.runtime == "torch_compiled":
            return lambda: compiled_predictor(fold_weight_standardization(model), device,
                                              b.precision)
        if b.runtime == "onnxruntime":
            return lambda: onnx_predictor(onnx_session(onnx_path, threads))
        return lambda: ir_predictor(manifest.ir(ir_dir, b.precision),
                                    inference_precision(b.precision, units), threads)

    return {b.name: make(b) for b in host.backends}


def write_om_inputs(batches: Iterable[np.ndarray], batch: int, folder: Path) -> int:
    """Write images, as they come batch by batch, as ais_bench's input files: float32 .npy files
    of exactly `batch` images each (the OM's static batch), the last padded with zeros. One
    file's worth is held at a time, whatever the size of the test split. Returns the number of
    images."""
    buffer, filled, files, count = None, 0, 0, 0
    for images in batches:
        images = np.asarray(images, np.float32)
        if buffer is None:
            buffer = np.zeros((batch, *images.shape[1:]), np.float32)
        start = 0
        while start < len(images):
            take = min(batch - filled, len(images) - start)
            buffer[filled:filled + take] = images[start:start + take]
            filled, start = filled + take, start + take
            if filled == batch:
                np.save(folder / f"{files:06d}.npy", buffer)
                filled, files = 0, files + 1
        count += len(images)
    if filled:
        buffer[filled:] = 0
        np.save(folder / f"{files:06d}.npy", buffer)
    return count


def om_results(om_dir: Path, batches: Iterable[np.ndarray], labels: np.ndarray, cfg,
               scratch: Path) -> tuple[dict | None, list[dict], str | None]:
    """Accuracy and speed of the compiled OM models through ais_bench, or why not measured.
    `batches`, the test images batch by batch, are read only when the OM is measured.

    Returns (accuracy or None, speed rows, reason when skipped).
    """
    manifest = OMManifest.read(om_dir / OM_MANIFEST, "compile_om")
    if manifest.status is OMStatus.SKIPPED:
        return None, [], manifest.reason
    if importlib.util.find_spec("ais_bench") is None:
        return None, [], f"ais_bench is not installed: {AIS_BENCH_HINT}"
    static = manifest.static_models(om_dir)
    if not static:
        return None, [], "only a dynamic-batch OM was built: add static batch sizes to compile"
    speed = []
    for batch, om in sorted(static.items()):
        bench = run_ais_bench(om, batch=batch, loop=max(cfg.repeats, 10),
                              output_dir=scratch / f"speed_bs{batch}")
        speed.append({"backend": "om", "batch": batch, "fps": bench["fps"],
                      "latency_ms_p50": bench["latency_ms_p50"],
                      "latency_ms_p99": bench["latency_ms_p99"]})
    batch = max(static)
    inputs = scratch / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    count = write_om_inputs(batches, batch, inputs)
    run_ais_bench(static[batch], batch=batch, loop=1, output_dir=scratch / "accuracy",
                  input_path=inputs)
    logits = np.concatenate(read_ais_outputs(scratch / "accuracy"))[:count]
    return topk_accuracy(logits, labels), speed, None


def _grid(title: str, rows: list[str], batches: list[int], cell) -> list[str]:
    lines = [f"| {title} | " + " | ".join(f"bs{b}" for b in batches) + " |",
             "|" + "---|" * (1 + len(batches))]
    return lines + [f"| {row} | " + " | ".join(cell(row, b) for b in batches) + " |"
                    for row in rows]


def _accuracy_lines(accuracy: dict[str, dict], metrics: EvaluationMetrics) -> list[str]:
    reference = accuracy.get(REFERENCE, {}).get("top1")
    lines = ["| back-end | top-1 % | top-5 % | top-1 vs fp32 | gate |", "|---|---|---|---|---|"]
    for name, acc in accuracy.items():
        delta = "–" if reference is None or name == REFERENCE else \
            f"{acc['top1'] - reference:+.2f}"
        gate = "reference" if name == REFERENCE else \
            f"missed by {metrics.gate_missed[name]}" if name in metrics.gate_missed else "kept"
        lines.append(f"| {name} | {acc['top1']:.2f} | {acc['top5']:.2f} | {delta} | {gate} |")
    return lines


def markdown_table(accuracy: dict[str, dict], speed: list[dict],
                   metrics: EvaluationMetrics | None = None) -> str:
    """The host, top-1/top-5 per back-end with its accuracy gate, then images/s (with the
    fastest back-end per batch size) and p50/p99 latency per back-end and batch size, then the
    back-ends not measured here and why."""
    metrics = metrics or EvaluationMetrics(test_images=0, om_skipped="")
    batches = sorted({row["batch"] for row in speed})
    backends = list(dict.fromkeys([*accuracy, *(row["backend"] for row in speed)]))
    backends = [b for b in backends if b not in metrics.gate_missed]
    by = {(row["backend"], row["batch"]): row for row in speed}

    def fps(backend, batch):
        if backend == "fastest":
            return metrics.fastest.get(f"bs{batch}", "–")
        row = by.get((backend, batch))
        return f"{row['fps']:.1f}" if row else "–"

    def latency(backend, batch):
        row = by.get((backend, batch))
        if not row or row.get("latency_ms_p50") is None:
            return "–"
        p99 = row.get("latency_ms_p99")
        return f"{row['latency_ms_p50']:.1f} / {p99:.1f}" if p99 is not None else \
            f"{row['latency_ms_p50']:.1f}"

    lines = ([f"Host CPU: {metrics.cpu}. Accuracy gates (top-1 against {REFERENCE}): "
              + ", ".join(f"{p} {pp} pt" for p, pp in GATE_PP.items())
              + "; a back-end outside its gate gets no speed rows.", ""] if metrics.cpu else [])
    if metrics.cpu_used_elsewhere_pct is not None:
        lines += [f"While the speeds were measured, {metrics.cpu_used_elsewhere_pct:.0f}% of the "
                  "host's CPU time went to other processes (or other guests of its hypervisor): "
                  "they slow every row, PyTorch's most.", ""]
    lines += _accuracy_lines(accuracy, metrics)
    lines += ["", *_grid("images/s", [*backends, "fastest"] if metrics.fastest else backends,
                         batches, fps), "",
              *_grid("latency ms p50 / p99", backends, batches, latency)]
    if metrics.skipped:
        lines += ["", "Not measured on this host:", ""]
        lines += [f"- {name}: {why}" for name, why in metrics.skipped.items()]
    return "\n".join(lines) + "\n"


def _measure(factories: dict, loader: DataLoader, one_shape: set[str]) -> tuple:
    """(accuracy, logits, labels) of every back-end on the test split; images/s are measured
    afterwards, for those within their gate. The back-ends in `one_shape` (compiled graphs) get
    every batch padded to the loader's batch size, so the split's shorter last batch is not a
    second graph to compile; their speed is measured at each batch size itself."""
    accuracy, logits_by, labels = {}, {}, None
    for name, factory in factories.items():
        predict = padded_predictor(factory(), ACCURACY_BATCH) if name in one_shape else factory()
        logits_by[name], labels = predict_all(predict, loader)
        accuracy[name] = topk_accuracy(logits_by[name], labels)
        log.info("%s: %s", name, accuracy[name])
    return accuracy, logits_by, labels


def _speed(factories: dict, kept: list[str], resolution: int, cfg) -> list[dict]:
    speed = []
    for name in kept:
        predict = factories[name]()
        for batch in cfg.batch_sizes:
            row = measure_speed(predict, batch, resolution, warmup=cfg.warmup,
                                repeats=cfg.repeats)
            speed.append({"backend": name, **row})
        del predict
    return speed


def gates(accuracy: dict[str, dict], host: Plan) -> dict[str, str]:
    """name -> how far its top-1 missed its gate, for the back-ends outside it."""
    backends = {b.name: b for b in (*host.backends, OM)}
    reference = accuracy[REFERENCE]["top1"]
    missed = {}
    for name, acc in accuracy.items():
        miss = gate_miss(backends[name], acc["top1"], reference)
        if name != REFERENCE and miss > 0:
            missed[name] = (f"{miss:.2f} pt (top-1 {acc['top1']:.2f} against {reference:.2f}, "
                            f"gate {backends[name].gate_pp} pt)")
    return missed


def fastest_by_batch(host: Plan, kept: list[str], speed: list[dict]) -> dict[str, str]:
    """"bs<N>" -> the fastest kept back-end at batch N (:func:`bit_core.backends.fastest`)."""
    backends = {b.name: b for b in (*host.backends, OM)}
    out = {}
    for batch in sorted({row["batch"] for row in speed}):
        fps = {row["backend"]: row["fps"] for row in speed if row["batch"] == batch}
        best = fastest([backends[name] for name in kept], fps)
        if best is not None:
            out[f"bs{batch}"] = best.name
    return out


def _check_onnx_agrees(accuracy: dict) -> None:
    delta = abs(accuracy["onnxruntime"]["top1"] - accuracy["torch_fp32"]["top1"])
    if delta > TOP1_TOLERANCE_PP:
        raise ParityError(f"ONNX Runtime top-1 differs from PyTorch fp32 by {delta:.2f} points "
                          f"(> {TOP1_TOLERANCE_PP}): re-run the export stage and inspect it")


def _log_run(checkpoint_dir: Path, metrics: EvaluationMetrics, out: Path, om_dir: Path) -> None:
    with tracking.appended_run(checkpoint_dir) as mlflow:
        if not mlflow:
            return
        mlflow.log_metrics({f"test_{k}" if "top" in k else k: v
                            for k, v in metrics.values().items()})
        mlflow.set_tags({f"eval.fastest.{batch}": name for batch, name in metrics.fastest.items()})
        for name in (EVALUATION, "fps.json", "fps.md", "fps.png", "confusion.png"):
            mlflow.log_artifact(str(out / name), "evaluation")
        for path in (om_dir / OM_MANIFEST, *sorted(om_dir.glob("*.om"))):
            if path.is_file():
                mlflow.log_artifact(str(path), "om")


def _test_loader(params: Params, data_root: Path, splits: Path, resolution: int) -> DataLoader:
    check_loader_workers(params.train.workers)
    test_set = ImageListDataset(data_root, read_split(splits / "test.csv"),
                                eval_transform(resolution))
    return DataLoader(test_set, batch_size=ACCURACY_BATCH, num_workers=params.train.workers)


def _images(loader: DataLoader) -> Iterator[np.ndarray]:
    """The loader's images, batch by batch; nothing is read until the first is asked for."""
    for images, _ in loader:
        yield images.numpy()


def _om(om_dir: Path, loader: DataLoader, labels: np.ndarray, cfg, accuracy: dict,
        skipped: dict) -> list[dict]:
    """Add the OM row's accuracy (or why it was skipped); return its speed rows."""
    with tempfile.TemporaryDirectory() as scratch:
        om_accuracy, om_speed, om_skipped = om_results(om_dir, _images(loader), labels, cfg,
                                                       Path(scratch))
    if om_accuracy:
        accuracy["om"] = om_accuracy
    if om_skipped:
        skipped["om"] = om_skipped
        log.info("OM not evaluated: %s", om_skipped)
    return om_speed


def _check_inputs_agree(record: ModelRecord, onnx_path: Path, splits: Path) -> None:
    """ContractError unless the checkpoint, the ONNX export and the test split belong together:
    one model's classes and input, and the split's classes (a 2-class model scored on 10-class
    labels gives chance-level numbers, not an error)."""
    from bit_core.splits import read_classes

    classes = read_classes(splits)
    if record.classes != classes:
        raise ContractError(f"the checkpoint's {len(record.classes)} classes are not the "
                            f"{len(classes)} of {splits}: fine-tune on these splits, or give "
                            "the splits it was trained on")
    exported = ModelRecord.of_onnx(onnx_path)
    if (exported.classes, exported.resolution) != (record.classes, record.resolution):
        raise ContractError(f"{onnx_path} was exported from another checkpoint ("
                            f"{len(exported.classes)} classes at {exported.resolution} px, the "
                            f"checkpoint {len(record.classes)} at {record.resolution} px): "
                            "re-run the export stage")


def evaluate(params: Params, checkpoint_dir: Path, onnx_path: Path, om_dir: Path,
             data_root: Path, splits: Path, out: Path, ir_dir: Path,
             units: CpuUnits | None = None) -> EvaluationMetrics:
    """Measure every back-end this host runs fast (`units`: its CPU's, by default read from
    it); write metrics.json, fps.json, fps.md, fps.png, confusion.png."""
    cfg, units = params.evaluate, units or cpu_units()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, checkpoint = load_trained(checkpoint_dir / CHECKPOINT)
    record = ModelRecord.of_checkpoint(checkpoint)
    _check_inputs_agree(record, onnx_path, splits)
    resolution = record.resolution
    loader = _test_loader(params, data_root, splits, resolution)
    device = resolve_device(cfg.device)
    host = host_plan(cfg, device, units, ir_dir)
    factories = _factories(host, model, onnx_path, ir_dir, device, units, cfg.threads)
    accuracy, logits_by, labels = _measure(
        factories, loader, {b.name for b in host.backends if b.runtime == "torch_compiled"})
    skipped = dict(host.skipped)
    om_speed = _om(om_dir, loader, labels, cfg, accuracy, skipped)
    _check_onnx_agrees(accuracy)
    missed = gates(accuracy, host)
    kept = [name for name in accuracy if name not in missed]
    elsewhere = cpu_used_elsewhere()
    speed = _speed(factories, [k for k in kept if k in factories], resolution, cfg)
    busy = round(elsewhere(), 1)
    speed += om_speed if "om" in kept else []
    metrics = EvaluationMetrics(
        test_images=len(labels), om_skipped=skipped.get("om", ""),
        cpu=f"{units.model} ({units.describe()})", skipped=skipped, gate_missed=missed,
        fastest=fastest_by_batch(host, kept, speed), cpu_used_elsewhere_pct=busy,
        **{metric_key(b, k): v for b, acc in accuracy.items() for k, v in acc.items()},
        **{metric_key(r["backend"], f"fps_bs{r['batch']}"): round(r["fps"], 2) for r in speed})
    _write_reports(metrics, accuracy, speed, logits_by, labels, splits, out)
    _log_run(checkpoint_dir, metrics, out, om_dir)
    return metrics


def _write_reports(metrics: EvaluationMetrics, accuracy: dict, speed: list[dict],
                   logits_by: dict, labels: np.ndarray, splits: Path, out: Path) -> None:
    metrics.write(out / EVALUATION)
    atomic_write_json(out / "fps.json", speed)
    table = markdown_table(accuracy, speed, metrics)
    atomic_write_text(out / "fps.md", table)
    plot_fps(speed, out / "fps.png")
    classes = read_classes(splits)
    plot_confusion(confusion_matrix(logits_by[REFERENCE], labels, len(classes)), classes,
                   out / "confusion.png")
    print(table)


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--om", type=Path, required=True, help="compile_om output dir")
    parser.add_argument("--openvino", type=Path, required=True,
                        help="compile_openvino output dir")
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare output dir")
    parser.add_argument("--out", type=Path, required=True, help="directory for the reports")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Evaluate every back-end this host runs fast: accuracy, images/s, the fastest."""
    metrics = evaluate(params, args.checkpoint, args.onnx, args.om, args.data, args.splits,
                       args.out, args.openvino)
    log.info("wrote %s", json.dumps({k: v for k, v in metrics.values().items() if "top" in k}))


def main(argv=None) -> int:
    return stage_main("evaluate", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
