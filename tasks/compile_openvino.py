"""Stage compile_openvino: the exported ONNX as OpenVINO IR for x86-64 CPUs, fp32 and int8
(NNCF post-training quantization calibrated on training images), parity-checked against PyTorch.

Where OpenVINO cannot run (another architecture, the ``openvino`` extra not installed, or
``openvino.build: false``) the manifest says why and the pipeline goes on, as compile_om does
without ATC.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bit_core.backends import openvino_missing
from bit_core.config import Params
from bit_core.contracts import CHECKPOINT, IR_MANIFEST, IRManifest, IRStatus
from bit_core.data import ImageListDataset, eval_transform
from bit_core.device import cpu_units
from bit_core.export import compare_logits, real_batch
from bit_core.io import atomic_dir, file_digest
from bit_core.openvino_ir import (inference_precision, ir_predictor, quantize_int8, read_onnx,
                                  save_ir, top1_agreement, versions)
from bit_core.record import ModelRecord
from bit_core.splits import read_split
from bit_core.weights import load_trained
from tasks import tracking
from tasks.common import log, stage_main

FP32_IR, INT8_IR = "model.xml", "int8.xml"


def calibration_images(data_root: Path, splits: Path, resolution: int, count: int,
                       seed: int = 0) -> list[np.ndarray]:
    """`count` training images drawn at random (seeded), preprocessed as for evaluation."""
    samples = read_split(splits / "train.csv")
    order = np.random.default_rng(seed).permutation(len(samples))[:count]
    dataset = ImageListDataset(data_root, [samples[i] for i in order], eval_transform(resolution))
    return [dataset[i][0].numpy() for i in range(len(dataset))]


def _parity(model, directory: Path, files: dict[str, str], params: Params, real) -> dict:
    """fp32 IR against PyTorch within export.atol and .rtol (else ParityError); how far bf16 and the
    int8 IR are (reported; the evaluation's accuracy gates judge them)."""
    resolution = real.shape[-1]
    fp32 = ir_predictor(directory / files["fp32"], "f32")
    report = {"fp32_" + k: v for k, v in compare_logits(
        model, fp32, "The OpenVINO IR", "re-run compile_openvino, or report the OpenVINO "
        "version", batches=params.export.parity_batches, resolution=resolution,
        atol=params.export.atol, rtol=params.export.rtol, real_images=real).items()}
    expected = fp32(real.numpy())
    units = cpu_units()
    runs = {"bf16": files["fp32"]} if units.fast_bf16 else {}
    runs.update({"int8": files["int8"]} if "int8" in files else {})
    for precision, xml in runs.items():
        got = ir_predictor(directory / xml, inference_precision(precision, units))(real.numpy())
        report[f"{precision}_max_abs_diff_real"] = float(np.abs(got - expected).max())
        report[f"{precision}_top1_agreement_real"] = top1_agreement(got, expected)
    return report


def build(params: Params, onnx: Path, checkpoint_dir: Path, data_root: Path, splits: Path,
          directory: Path) -> tuple[dict[str, str], str | None, int, dict]:
    """Write the IR files into `directory`; return (files, why no int8, calibration images,
    parity)."""
    cfg = params.openvino
    resolution = ModelRecord.of_onnx(onnx).resolution
    files = {"fp32": save_ir(read_onnx(onnx), directory / FP32_IR).name}
    int8_reason, calibrated = "openvino.int8 is false", 0
    if cfg.int8:
        images = calibration_images(data_root, splits, resolution, cfg.calibration_images)
        files["int8"] = save_ir(quantize_int8(onnx, images), directory / INT8_IR).name
        int8_reason, calibrated = None, len(images)
    model, _ = load_trained(checkpoint_dir / CHECKPOINT)
    real = real_batch(data_root, splits, resolution)
    return files, int8_reason, calibrated, _parity(model, directory, files, params, real)


def compile_openvino(params: Params, onnx: Path, checkpoint_dir: Path, data_root: Path,
                     splits: Path, out: Path) -> IRManifest:
    """Build the IR into `out` (all or nothing) with its manifest, or a skipped manifest."""
    reason = openvino_missing() if params.openvino.build else "openvino.build is false"
    common = {"onnx_sha256": file_digest(onnx), "versions": versions()}
    with atomic_dir(out) as tmp:
        if reason:
            manifest = IRManifest(status=IRStatus.SKIPPED, reason=reason, files={},
                                  int8_reason=reason, calibration_images=0, parity={}, **common)
        else:
            files, int8_reason, calibrated, parity = build(params, onnx, checkpoint_dir,
                                                           data_root, splits, tmp)
            manifest = IRManifest(status=IRStatus.BUILT, reason=None, files=files,
                                  int8_reason=int8_reason, calibration_images=calibrated,
                                  parity=parity, **common)
        manifest.write(tmp / IR_MANIFEST)
    _log_run(checkpoint_dir, manifest, out)
    return manifest


def _log_run(checkpoint_dir: Path, manifest: IRManifest, out: Path) -> None:
    with tracking.appended_run(checkpoint_dir) as mlflow:
        if not mlflow:
            return
        mlflow.log_metrics({f"openvino_{k}": v for k, v in manifest.parity.items()})
        mlflow.log_artifacts(str(out), "openvino")


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", type=Path, required=True, help="exported model.onnx")
    parser.add_argument("--checkpoint", type=Path, required=True, help="finetune output dir")
    parser.add_argument("--data", type=Path, required=True, help="class-folder root")
    parser.add_argument("--splits", type=Path, required=True, help="prepare output dir")
    parser.add_argument("--out", type=Path, required=True, help="directory for the IR files")


def _run(args: argparse.Namespace, params: Params) -> None:
    """Build OpenVINO IR (fp32 and int8) and check it against PyTorch."""
    manifest = compile_openvino(params, args.onnx, args.checkpoint, args.data, args.splits,
                                args.out)
    if manifest.status is IRStatus.SKIPPED:
        log.info("OpenVINO IR not built: %s", manifest.reason)
    else:
        log.info("built %s in %s (fp32 IR max |ov - torch| = %.2e)",
                 ", ".join(manifest.files.values()), args.out, manifest.parity["fp32_max_abs_diff"])


def main(argv=None) -> int:
    return stage_main("compile_openvino", _args, _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
