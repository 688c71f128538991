"""Stage evaluate: top-1/top-5 on the test split and images/s per batch size for every back-end."""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bit_core.config import Params
from bit_core.contracts import (CHECKPOINT, OM_MANIFEST, EvaluationMetrics, OMManifest, OMStatus,
                                metric_key)
from bit_core.record import ModelRecord
from bit_core.data import ImageListDataset, eval_transform
from bit_core.device import resolve_device
from bit_core.evaluate import (confusion_matrix, measure_speed, onnx_predictor, predict_all,
                               topk_accuracy, torch_predictor)
from bit_core.errors import ParityError
from bit_core.export import onnx_session
from bit_core.io import atomic_write_json, atomic_write_text
from bit_core.model import fold_weight_standardization
from bit_core.om import AIS_BENCH_HINT, read_ais_outputs, run_ais_bench
from bit_core.plots import plot_confusion, plot_fps
from bit_core.splits import read_classes, read_split
from bit_core.weights import load_trained
from tasks import tracking
from tasks.common import log, stage_main

TOP1_TOLERANCE_PP = 0.1  # ONNX Runtime must agree with PyTorch fp32 to this many points


def fast_precision(device: torch.device) -> str:
    """The reduced precision used for the fast PyTorch path on this device."""
    return "bf16" if device.type in ("cpu", "cuda") else "fp16"


def _backends(model, onnx_path: Path, device: torch.device, threads: int | None):
    """name -> predictor for every back-end available here."""
    folded = fold_weight_standardization(model)
    fast = fast_precision(device)
    return {
        "torch_fp32": torch_predictor(folded, device),
        f"torch_{fast}": torch_predictor(fold_weight_standardization(model), device, fast,
                                         channels_last=True),
        "onnxruntime": onnx_predictor(onnx_session(onnx_path, threads)),
    }


def om_results(om_dir: Path, images: np.ndarray, labels: np.ndarray, cfg, scratch: Path
               ) -> tuple[dict | None, list[dict], str | None]:
    """Accuracy and speed of the compiled OM models through ais_bench, or why not measured.

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
    padded = -len(images) % batch
    full = np.concatenate([images, np.zeros((padded, *images.shape[1:]), images.dtype)])
    for i in range(0, len(full), batch):
        np.save(inputs / f"{i // batch:06d}.npy", full[i:i + batch])
    run_ais_bench(static[batch], batch=batch, loop=1, output_dir=scratch / "accuracy",
                  input_path=inputs)
    logits = np.concatenate(read_ais_outputs(scratch / "accuracy"))[:len(images)]
    return topk_accuracy(logits, labels), speed, None


def _grid(title: str, rows: list[str], batches: list[int], cell) -> list[str]:
    lines = [f"| {title} | " + " | ".join(f"bs{b}" for b in batches) + " |",
             "|" + "---|" * (1 + len(batches))]
    return lines + [f"| {row} | " + " | ".join(cell(row, b) for b in batches) + " |"
                    for row in rows]


def markdown_table(accuracy: dict[str, dict], speed: list[dict]) -> str:
    """Top-1/top-5 per back-end, then images/s and p50/p99 latency per back-end and batch size."""
    batches = sorted({row["batch"] for row in speed})
    backends = list(dict.fromkeys([*accuracy, *(row["backend"] for row in speed)]))
    by = {(row["backend"], row["batch"]): row for row in speed}

    def fps(backend, batch):
        row = by.get((backend, batch))
        return f"{row['fps']:.1f}" if row else "–"

    def latency(backend, batch):
        row = by.get((backend, batch))
        if not row or row.get("latency_ms_p50") is None:
            return "–"
        p99 = row.get("latency_ms_p99")
        return f"{row['latency_ms_p50']:.1f} / {p99:.1f}" if p99 is not None else \
            f"{row['latency_ms_p50']:.1f}"

    lines = ["| back-end | top-1 % | top-5 % |", "|---|---|---|"]
    lines += [f"| {b} | {a['top1']:.2f} | {a['top5']:.2f} |" for b, a in accuracy.items()]
    lines += ["", *_grid("images/s", backends, batches, fps), "",
              *_grid("latency ms p50 / p99", backends, batches, latency)]
    return "\n".join(lines) + "\n"


def _measure(backends: dict, loader: DataLoader, resolution: int, cfg) -> tuple:
    """(accuracy, speed rows, logits, labels) of every back-end on the test split."""
    accuracy, speed, logits_by, labels = {}, [], {}, None
    for name, predict in backends.items():
        logits_by[name], labels = predict_all(predict, loader)
        accuracy[name] = topk_accuracy(logits_by[name], labels)
        for batch in cfg.batch_sizes:
            row = measure_speed(predict, batch, resolution, warmup=cfg.warmup,
                                repeats=cfg.repeats)
            speed.append({"backend": name, **row})
        log.info("%s: %s", name, accuracy[name])
    return accuracy, speed, logits_by, labels


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
        for name in ("metrics.json", "fps.json", "fps.md", "fps.png", "confusion.png"):
            mlflow.log_artifact(str(out / name), "evaluation")
        for path in (om_dir / OM_MANIFEST, *sorted(om_dir.glob("*.om"))):
            if path.is_file():
                mlflow.log_artifact(str(path), "om")


def evaluate(params: Params, checkpoint_dir: Path, onnx_path: Path, om_dir: Path,
             data_root: Path, splits: Path, out: Path) -> EvaluationMetrics:
    """Measure every back-end; write metrics.json, fps.json, fps.md, fps.png, confusion.png."""
    cfg = params.evaluate
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, checkpoint = load_trained(checkpoint_dir / CHECKPOINT)
    resolution = ModelRecord.of_checkpoint(checkpoint).resolution
    test_set = ImageListDataset(data_root, read_split(splits / "test.csv"),
                                eval_transform(resolution))
    loader = DataLoader(test_set, batch_size=64, num_workers=params.train.workers)
    backends = _backends(model, onnx_path, resolve_device(cfg.device), cfg.threads)
    accuracy, speed, logits_by, labels = _measure(backends, loader, resolution, cfg)
    images = np.concatenate([x.numpy() for x, _ in loader]).astype(np.float32)
    with tempfile.TemporaryDirectory() as scratch:
        om_accuracy, om_speed, om_skipped = om_results(om_dir, images, labels, cfg, Path(scratch))
    if om_accuracy:
        accuracy["om"] = om_accuracy
    speed += om_speed
    if om_skipped:
        log.info("OM not evaluated: %s", om_skipped)
    _check_onnx_agrees(accuracy)
    metrics = EvaluationMetrics(
        test_images=len(test_set), om_skipped=om_skipped or "",
        **{metric_key(b, k): v for b, acc in accuracy.items() for k, v in acc.items()},
        **{metric_key(r["backend"], f"fps_bs{r['batch']}"): round(r["fps"], 2) for r in speed})
    metrics.write(out / "metrics.json")
    atomic_write_json(out / "fps.json", speed)
    table = markdown_table(accuracy, speed)
    atomic_write_text(out / "fps.md", table)
    plot_fps(speed, out / "fps.png")
    classes = read_classes(splits)
    plot_confusion(confusion_matrix(logits_by["torch_fp32"], labels, len(classes)), classes,
                   out / "confusion.png")
    _log_run(checkpoint_dir, metrics, out, om_dir)
    print(table)
    return metrics


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--om", type=Path, required=True, help="compile_om output dir")
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare output dir")
    parser.add_argument("--out", type=Path, required=True, help="directory for the reports")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Evaluate PyTorch and ONNX Runtime: accuracy and throughput."""
    metrics = evaluate(params, args.checkpoint, args.onnx, args.om, args.data, args.splits,
                       args.out)
    log.info("wrote %s", json.dumps({k: v for k, v in metrics.values().items() if "top" in k}))


def main(argv=None) -> int:
    return stage_main("evaluate", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
