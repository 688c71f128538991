"""OpenVINO on x86-64 CPUs: the exported ONNX as OpenVINO IR, fp32 and int8, and a predictor
running an IR at fp32, bf16 or int8.

OpenVINO reads the exported ONNX itself (``Core.read_model``); the int8 IR is NNCF's
post-training quantization of it (``nncf.quantize``), calibrated on preprocessed training images.
bf16 is not a file: it is how OpenVINO's CPU plug-in runs the fp32 IR on a CPU with bf16 units
(``INFERENCE_PRECISION_HINT``), converting the weights when it compiles the model.

``openvino`` and ``nncf`` are the optional extra ``.[openvino]``; they are imported only here and
only when called.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bit_core.device import CpuUnits
from bit_core.evaluate import Predict

DEVICE = "CPU"


def inference_precision(precision: str, units: CpuUnits) -> str:
    """OpenVINO's INFERENCE_PRECISION_HINT for a row: f32, bf16, or for the int8 IR the
    precision of its layers left in floating point (bf16 where the CPU has bf16 units)."""
    if precision == "int8":
        return "bf16" if units.fast_bf16 else "f32"
    return {"fp32": "f32", "bf16": "bf16"}[precision]


def versions() -> dict[str, str]:
    """openvino's and nncf's versions, for the manifest."""
    found = {}
    for package in ("openvino", "nncf"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def read_onnx(onnx_path: Path):
    """The exported ONNX as an OpenVINO model (dynamic batch, as exported)."""
    import openvino as ov

    return ov.Core().read_model(str(onnx_path))


def save_ir(model, xml_path: Path) -> Path:
    """Write `model` as ``<name>.xml`` + ``<name>.bin`` with its weights as they are (fp32 stays
    fp32: an fp16-compressed IR would not meet the fp32 parity)."""
    import openvino as ov

    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    return Path(xml_path)


def quantize_int8(onnx_path: Path, calibration: Sequence[np.ndarray]):
    """NNCF post-training quantization of the exported model to int8, its activation ranges
    calibrated on `calibration` (preprocessed images, (3, H, W) float32 each)."""
    import nncf

    batches = [image[None].astype(np.float32, copy=False) for image in calibration]
    return nncf.quantize(read_onnx(onnx_path), nncf.Dataset(batches),
                         subset_size=len(batches))


def ir_predictor(xml_path: Path, hint: str, threads: int | None = None) -> Predict:
    """An IR compiled for this CPU at INFERENCE_PRECISION_HINT `hint`, as a numpy -> numpy
    predictor (any batch size; latency-oriented, one request at a time)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(xml_path), DEVICE, config)
    request, output = compiled.create_infer_request(), compiled.output(0)

    def predict(batch: np.ndarray) -> np.ndarray:
        return request.infer({0: batch})[output].copy()  # the request reuses its buffer

    return predict


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose arg-max agrees, in percent."""
    return float(100.0 * (a.argmax(axis=1) == b.argmax(axis=1)).mean())
