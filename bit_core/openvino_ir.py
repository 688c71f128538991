"""OpenVINO on x86-64 CPUs: the exported ONNX as OpenVINO IR, fp32 and int8, and a predictor
running an IR at fp32, bf16 or int8.

OpenVINO reads the exported ONNX itself (``Core.read_model``) after one rewrite: the stem's zero
padding, which the export writes as concatenated zeros for ONNX Runtime's sake
(``bit_core.export.ConcatZeroPad``), goes back to one ``Pad``. OpenVINO keeps a ``Pad`` apart from
the max-pool after it, and the concatenation cost it a planar copy and three layout reorders of
the stem's output (about 15% of an int8 batch of 32 at 128 px). The int8 IR is NNCF's post-training
quantization of that model (``nncf.quantize``), calibrated on preprocessed training images.
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
from bit_core.evaluate import Predict, zero_padded

DEVICE = "CPU"
STEM_PAD_SCOPE = "/root/pad/"  # the exporter's node names for model.root.pad


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


def _padded_input(concat):
    """The one output outside the stem padding block that `concat` (its last node) pads, or
    None: the block's other inputs are its own nodes and constants."""
    found, seen, todo = set(), set(), [concat]
    while todo:
        node = todo.pop()
        for port in node.inputs():
            source = port.get_source_output()
            producer = source.get_node()
            if producer.get_friendly_name().startswith(STEM_PAD_SCOPE):
                if id(producer) not in seen:
                    seen.add(id(producer))
                    todo.append(producer)
            elif producer.get_type_name() != "Constant":
                found.add((producer.get_friendly_name(), source.get_index()))
                output = source
    return output if len(found) == 1 else None


def stem_pad_as_pad(model) -> bool:
    """In an OpenVINO model read from the export, feed the stem's max-pool from one constant
    zero ``Pad`` instead of the concatenated zeros (in place; the old nodes fall away). False,
    and `model` unchanged, when it has no such block."""
    import openvino.opset12 as ops

    for pool in model.get_ordered_ops():
        concat = pool.input(0).get_source_output().get_node() if pool.get_type_name() == \
            "MaxPool" else None
        if concat is None or concat.get_type_name() != "Concat" or \
                not concat.get_friendly_name().startswith(STEM_PAD_SCOPE):
            continue
        x = _padded_input(concat)
        if x is None or x.get_partial_shape().rank.get_length() != 4:
            return False
        padded, plain = concat.get_output_partial_shape(0), x.get_partial_shape()
        if not all(d.is_static for d in (*padded[2:], *plain[2:])):
            return False
        grow = [padded[i].get_length() - plain[i].get_length() for i in (2, 3)]
        if any(g < 0 or g % 2 for g in grow):
            return False
        ends = np.array([0, 0, grow[0] // 2, grow[1] // 2], np.int64)
        zero = ops.constant(np.zeros((), x.get_element_type().to_dtype()))
        pad = ops.pad(x, ends, ends, "constant", zero, name=STEM_PAD_SCOPE + "Pad")
        pool.input(0).replace_source_output(pad.output(0))
        model.validate_nodes_and_infer_types()
        return True
    return False


def read_onnx(onnx_path: Path):
    """The exported ONNX as an OpenVINO model (dynamic batch, as exported), its stem padding one
    ``Pad``. Weights stored beside the graph (``<name>.data``, large models) are read from there."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    stem_pad_as_pad(model)
    return model


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
    predictor for any batch size.

    Each batch size is compiled at its own static shape when it first comes, and kept until
    another size comes (a compiled model holds its own copy of the weights). The IR's batch axis
    is dynamic, and OpenVINO's CPU plug-in runs a static shape markedly faster (README, OpenVINO).

    A batch of one runs as one latency-oriented request on all the threads. A larger batch is
    cut into as many equal parts as OpenVINO's throughput mode has streams on this CPU (one per
    core or so; the last part padded with zeros), and the parts run at once, one per stream:
    each stream then runs whole layers on its own threads instead of all threads meeting after
    every layer. The logits are the same either way.
    """
    import openvino as ov

    core, config = ov.Core(), {"INFERENCE_PRECISION_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    model = core.read_model(str(xml_path))
    streams: list[int] = []  # the throughput mode's stream count, asked once
    kept: dict[tuple, list] = {}  # input shape -> its requests, one per part

    def stream_count() -> int:
        if not streams:
            probe = core.compile_model(model, DEVICE, {**config, "PERFORMANCE_HINT": "THROUGHPUT"})
            streams.append(max(int(probe.get_property("NUM_STREAMS")), 1))
        return streams[0]

    def requests(shape: tuple) -> list:
        if shape not in kept:
            kept.clear()
            batch = shape[0]
            parts = 1 if batch == 1 or threads == 1 else min(stream_count(), batch)
            size = -(-batch // parts)
            parts = -(-batch // size)
            static = model.clone()
            static.reshape({static.input(0): [size, *shape[1:]]})
            mode = {"PERFORMANCE_HINT": "LATENCY"} if parts == 1 else \
                {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": parts}
            compiled = core.compile_model(static, DEVICE, {**config, **mode})
            kept[shape] = [compiled.create_infer_request() for _ in range(parts)]
        return kept[shape]

    def predict(batch: np.ndarray) -> np.ndarray:
        runs, count = requests(batch.shape), len(batch)
        size = -(-count // len(runs))
        batch = zero_padded(batch, len(runs) * size)
        for i, run in enumerate(runs):
            run.start_async({0: np.ascontiguousarray(batch[i * size:(i + 1) * size])})
        for run in runs:
            run.wait()
        # a new array: each request reuses its output buffer
        return np.concatenate([run.get_output_tensor(0).data for run in runs])[:count]

    return predict


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows whose arg-max agrees, in percent."""
    return float(100.0 * (a.argmax(axis=1) == b.argmax(axis=1)).mean())
