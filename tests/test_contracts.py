"""The records stages hand each other: written by one side, read and validated by the other."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from onnx import TensorProto, helper

from bit_core.contracts import OMManifest
from bit_core.record import ModelRecord
from bit_core.errors import ContractError
from bit_core.export import save_onnx


def _onnx(path: Path, metadata: dict[str, str] | None = None) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["logits"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 24, 24])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 24, 24])])
    model = helper.make_model(graph)
    if metadata:
        helper.set_model_props(model, metadata)
    return save_onnx(model, path)


def test_the_model_record_travels_from_checkpoint_to_onnx(tmp_path):
    checkpoint = {"model_name": "BiT-M-R50x1", "classes": ["cat", "dog"], "resolution": 24,
                  "precrop": 26, "num_classes": 2, "model": {}}
    record = ModelRecord.of_checkpoint(checkpoint)
    path = _onnx(tmp_path / "m.onnx", record.onnx_metadata())
    again = ModelRecord.of_onnx(path)
    assert again == record and again.resolution == 24 and again.mean == (0.5, 0.5, 0.5)


def test_a_model_without_its_record_says_which_stage_to_run(tmp_path):
    with pytest.raises(ContractError, match="carries no model record: re-run the export_onnx"):
        ModelRecord.of_onnx(_onnx(tmp_path / "bare.onnx"))
    (tmp_path / "broken.onnx").write_bytes(b"not onnx")
    with pytest.raises(ContractError, match="cannot read ONNX model .*re-run the export_onnx"):
        ModelRecord.of_onnx(tmp_path / "broken.onnx")
    with pytest.raises(ContractError, match="checkpoint has no 'precrop': re-run the finetune"):
        ModelRecord.of_checkpoint({"model_name": "x", "classes": [], "resolution": 8})


def test_a_manifest_from_other_code_is_one_line(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"status": "ok", "models": []}))  # the old spelling of "built"
    with pytest.raises(ContractError) as err:
        OMManifest.read(path, "compile_om")
    assert "\n" not in str(err.value) and "re-run the compile_om stage" in str(err.value)
    assert "(status: Input should be 'built' or 'skipped' (and " in str(err.value)  # the field
    with pytest.raises(ContractError, match="missing: run the compile_om stage"):
        OMManifest.read(tmp_path / "absent.json", "compile_om")
