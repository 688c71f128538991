"""Which back-ends a host measures and serves with, chosen by its CPU's matrix units, and the
accuracy gates; the OpenVINO IR built, run and checked for real on a small exported model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bit_core.backends import (Backend, GATE_PP, fastest, fps_at, gate_miss, openvino_missing,
                               plan, serving_backend)
from bit_core.device import CpuUnits

AMX = CpuUnits("AMX host", frozenset({"avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
                                      "amx_bf16", "amx_int8"}))
AVX2 = CpuUnits("AVX2 host", frozenset({"avx2"}))
VNNI_ONLY = CpuUnits("VNNI host", frozenset({"avx512f", "avx512_vnni"}))
needs_openvino = pytest.mark.skipif(openvino_missing() is not None,
                                    reason=str(openvino_missing()))


@needs_openvino
def test_amx_host_plans_every_fast_path():
    host = plan("cpu", AMX)
    assert host.names() == ["torch_fp32", "torch_bf16", "torch_compiled_bf16", "onnxruntime",
                            "openvino_fp32", "openvino_bf16", "openvino_int8"]
    assert dict(host.skipped) == {}


@needs_openvino
def test_a_cpu_without_the_units_skips_those_rows_and_says_why():
    host = plan("cpu", AVX2)
    assert host.names() == ["torch_fp32", "torch_bf16", "onnxruntime", "openvino_fp32"]
    assert "no AMX-bf16 or avx512_bf16" in host.skipped["torch_compiled_bf16"]
    assert "no AMX-bf16 or avx512_bf16" in host.skipped["openvino_bf16"]
    assert "no AMX-int8 or VNNI" in host.skipped["openvino_int8"]
    vnni = plan("cpu", VNNI_ONLY)
    assert "openvino_int8" in vnni.names() and "openvino_bf16" not in vnni.names()


def test_what_the_compile_stage_did_not_build_is_skipped_with_its_reason():
    host = plan("cpu", AMX, openvino_ir="openvino.build is false", compiled=False)
    assert not any(b.runtime in ("openvino", "torch_compiled") for b in host.backends)
    assert host.skipped["torch_compiled"] == "evaluate.compiled is false"
    if openvino_missing() is None:
        assert host.skipped["openvino"] == "openvino.build is false"
        no_int8 = plan("cpu", AMX, int8_ir="openvino.int8 is false")
        assert no_int8.skipped["openvino_int8"] == "openvino.int8 is false"


def test_devices_choose_their_reduced_precision():
    assert "torch_compiled_fp16" in plan("cuda", AVX2, cuda_bf16=False).names()
    assert "torch_compiled_bf16" in plan("cuda", AVX2).names()
    npu = plan("npu", AMX, fast="fp16")
    assert "torch_fp16" in npu.names() and "Ascend" in npu.skipped["torch_compiled"]


def test_gates():
    int8, bf16 = Backend("openvino", "int8"), Backend("openvino", "bf16")
    assert GATE_PP["int8"] == 0.5 and GATE_PP["bf16"] == 0.1
    assert gate_miss(int8, 99.0, 99.4) == 0 and gate_miss(bf16, 99.3, 99.4) == 0
    assert gate_miss(int8, 98.4, 99.4) == pytest.approx(0.5)
    assert gate_miss(bf16, 99.9, 99.4) == pytest.approx(0.4)  # either way is a difference


def test_the_fastest_correct_back_end_is_chosen():
    ort, ov32, ov16 = (Backend("onnxruntime", "fp32"), Backend("openvino", "fp32"),
                       Backend("openvino", "bf16"))
    assert fastest([ort, ov32, ov16], {"onnxruntime": 90, "openvino_bf16": 240}) == ov16
    # not measured (outside its gate, or never evaluated) is never chosen over measured
    assert fastest([ort, ov16], {"onnxruntime": 90}) == ort
    assert fastest([ov16, ov32, ort], None) == ov32  # no evidence: the first fp32 one
    assert fastest([], {}) is None


def test_serving_uses_the_evaluation_at_the_nearest_batch_size():
    metrics = {"onnxruntime_fps_bs1": 50, "openvino_bf16_fps_bs1": 120,
               "onnxruntime_fps_bs32": 70, "openvino_bf16_fps_bs32": 40, "onnxruntime_top1": 99}
    assert fps_at(metrics, 30) == {"onnxruntime": 70, "openvino_bf16": 40}
    assert serving_backend(AMX, metrics, 32).name == "onnxruntime"
    assert serving_backend(AMX, metrics, 1).name == ("openvino_bf16" if openvino_missing()
                                                     is None else "onnxruntime")
    assert serving_backend(AVX2, metrics, 1).name == "onnxruntime"  # bf16 unproven here
    assert serving_backend(AMX, None, 32).name == "onnxruntime"
    assert serving_backend(AMX, None, 32, runtimes=("torch",)).name == "torch_fp32"


# --- the real OpenVINO -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A BiT model with non-trivial weights, exported as the export stage does (32 px)."""
    from bit_core import create_model
    from bit_core.export import export_onnx

    torch.manual_seed(0)
    model = create_model("BiT-S-R50x1", num_classes=10)
    with torch.no_grad():
        torch.nn.init.normal_(model.fc.weight, std=0.05)
    path = export_onnx(model.eval(), tmp_path_factory.mktemp("ov") / "model.onnx", resolution=32)
    return model, path


@needs_openvino
def test_ir_matches_pytorch_in_fp32_and_runs_bf16_and_int8(exported, tmp_path):
    from bit_core.export import compare_logits
    from bit_core.openvino_ir import (inference_precision, ir_predictor, quantize_int8, read_onnx,
                                      save_ir, top1_agreement)

    model, onnx_path = exported
    xml = save_ir(read_onnx(onnx_path), tmp_path / "model.xml")
    report = compare_logits(model, ir_predictor(xml, "f32"), "OpenVINO", "wrong",
                            batches=[1, 3], resolution=32, atol=1e-4, rtol=1e-4)
    assert 0 < report["max_diff_to_tolerance"] <= 1
    images = [np.tanh(np.random.default_rng(i).normal(size=(3, 32, 32))).astype(np.float32)
              for i in range(8)]
    int8 = save_ir(quantize_int8(onnx_path, images), tmp_path / "int8.xml")
    assert int8.with_suffix(".bin").stat().st_size < xml.with_suffix(".bin").stat().st_size / 2
    x = np.stack(images)
    expected = ir_predictor(xml, "f32")(x)
    for path, precision in ((xml, "bf16"), (int8, "int8")):
        got = ir_predictor(path, inference_precision(precision, AMX))(x)
        assert got.shape == expected.shape and np.isfinite(got).all()
        assert 0 <= top1_agreement(got, expected) <= 100
    assert inference_precision("int8", AVX2) == "f32" and inference_precision("bf16", AMX) == "bf16"


@needs_openvino
def test_openvino_reads_the_stem_padding_as_one_pad(exported):
    import openvino as ov

    from bit_core.openvino_ir import read_onnx, stem_pad_as_pad

    _, onnx_path = exported
    model = read_onnx(onnx_path)
    pool = next(op for op in model.get_ordered_ops() if op.get_type_name() == "MaxPool")
    pad = pool.input(0).get_source_output().get_node()
    assert pad.get_type_name() == "Pad"
    assert pad.input(0).get_source_output().get_node().get_type_name() == "Convolution"
    begins, ends = (pad.input(i).get_source_output().get_node().get_data() for i in (1, 2))
    assert list(begins) == list(ends) == [0, 0, 1, 1]
    assert not any(op.get_friendly_name().startswith("/root/pad/") and op.get_type_name() ==
                   "Concat" for op in model.get_ordered_ops())
    assert not stem_pad_as_pad(model)  # nothing left to rewrite
    assert stem_pad_as_pad(ov.Core().read_model(str(onnx_path)))


@needs_openvino
def test_openvino_reads_weights_stored_beside_the_graph(exported, tmp_path, monkeypatch):
    """A model over ~1.8 GB keeps its weights in <name>.data; OpenVINO reads the rewritten graph
    with those weights, and the IR gives the same logits as from the one-file export."""
    import onnx

    from bit_core import export
    from bit_core.openvino_ir import ir_predictor, read_onnx, save_ir

    _, onnx_path = exported
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1000)
    (tmp_path / "split").mkdir()
    split = export.save_onnx(onnx.load(str(onnx_path)), tmp_path / "split" / "model.onnx")
    assert (split.parent / "model.onnx.data").stat().st_size > split.stat().st_size
    whole = save_ir(read_onnx(onnx_path), tmp_path / "whole.xml")
    apart = save_ir(read_onnx(split), tmp_path / "apart.xml")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(ir_predictor(apart, "f32")(x), ir_predictor(whole, "f32")(x))


@needs_openvino
def test_a_batch_split_across_streams_gives_the_same_logits(exported, tmp_path):
    from bit_core.openvino_ir import ir_predictor, read_onnx, save_ir

    _, onnx_path = exported
    xml = save_ir(read_onnx(onnx_path), tmp_path / "model.xml")
    x = np.random.default_rng(2).uniform(-1, 1, (5, 3, 32, 32)).astype(np.float32)
    one_request = np.concatenate([ir_predictor(xml, "f32", threads=1)(x[i:i + 1])
                                  for i in range(len(x))])
    for threads in (None, 2):
        got = ir_predictor(xml, "f32", threads=threads)(x)
        np.testing.assert_allclose(got, one_request, rtol=0, atol=1e-5)
