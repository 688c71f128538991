"""Stage export: the fine-tuned checkpoint as ONNX (weight standardisation folded), parity-checked."""

from __future__ import annotations

import argparse
from pathlib import Path

from bit_core.config import Params
from bit_core.contracts import CHECKPOINT, ONNX_FILE, ExportReport, onnx_files
from bit_core.record import ModelRecord
from bit_core.export import check_parity, export_onnx, op_types, real_batch
from bit_core.io import atomic_dir
from bit_core.weights import load_trained
from tasks import tracking
from tasks.common import log, stage_main


def export(params: Params, checkpoint_dir: Path, data_root: Path, splits: Path, out: Path,
           report: Path) -> ExportReport:
    """Export, then fail unless ONNX Runtime matches PyTorch within export.atol and .rtol."""
    cfg = params.export
    model, checkpoint = load_trained(checkpoint_dir / CHECKPOINT)
    record = ModelRecord.of_checkpoint(checkpoint)
    resolution = record.resolution
    with atomic_dir(out) as tmp:  # published only once it passed: a failure keeps the old one
        path = export_onnx(model, tmp / ONNX_FILE, resolution=resolution, opset=cfg.opset,
                           simplify=cfg.simplify, metadata=record.onnx_metadata())
        parity = check_parity(model, path, batches=cfg.parity_batches, resolution=resolution,
                              atol=cfg.atol, rtol=cfg.rtol,
                              real_images=real_batch(data_root, splits, resolution))
        result = ExportReport(opset=cfg.opset,
                              onnx_bytes=sum(f.stat().st_size for f in onnx_files(path)),
                              op_types=sorted(op_types(path)), **parity)
    path = out / ONNX_FILE
    result.write(report)
    with tracking.appended_run(checkpoint_dir) as mlflow:
        if mlflow:
            mlflow.log_metrics({"onnx_max_abs_diff": result.max_abs_diff,
                                "onnx_max_diff_to_tolerance": result.max_diff_to_tolerance})
            for file in onnx_files(path):
                mlflow.log_artifact(str(file), "onnx")
    return result


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare output dir")
    parser.add_argument("--out", type=Path, required=True, help="directory for model.onnx")
    parser.add_argument("--report", type=Path, required=True, help="export metrics JSON")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Export to ONNX and check parity on ONNX Runtime."""
    result = export(params, args.checkpoint, args.data, args.splits, args.out, args.report)
    log.info("exported %s: max |onnx - torch| = %.2e", args.out / ONNX_FILE, result.max_abs_diff)


def main(argv=None) -> int:
    return stage_main("export", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
