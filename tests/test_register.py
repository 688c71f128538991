"""Champion / challenger in a real MLflow registry (SQLite store)."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from bit_core.config import load_params
from tasks import tracking
from tasks.register import CHALLENGER, CHAMPION, register


def _tiny_onnx(path):
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


@pytest.fixture
def store(tmp_path, monkeypatch, repo_root):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    _tiny_onnx(tmp_path / "model.onnx")
    return tmp_path, load_params(repo_root / "params.yaml")


def _pipeline_run(tmp, params, name, top1, parity=1e-6):
    import mlflow

    run_dir = tmp / name
    run_dir.mkdir()
    run_id = tracking.start_run("registry-test", run_name=name)
    mlflow.end_run()
    tracking.write_run_file(run_dir, run_id)
    (run_dir / "metrics.json").write_text(json.dumps({"onnxruntime_top1": top1,
                                                      "resolution": 4}))
    (run_dir / "export.json").write_text(json.dumps({"max_abs_diff": parity}))
    return register(params, tmp / "model.onnx", run_dir, run_dir / "metrics.json",
                    run_dir / "export.json", run_dir / "registry.json")


def test_champion_moves_only_for_a_better_model(store):
    tmp, params = store
    first = _pipeline_run(tmp, params, "first", 95.0)
    assert first["alias"] == CHAMPION and first["version"] == 1
    worse = _pipeline_run(tmp, params, "worse", 94.0)
    assert worse["alias"] == CHALLENGER and worse["previous_champion"] == 95.0
    better = _pipeline_run(tmp, params, "better", 96.5)
    assert better["alias"] == CHAMPION and better["version"] == 3
    broken = _pipeline_run(tmp, params, "broken", 99.0, parity=1e-2)
    assert broken["alias"] == CHALLENGER  # parity failed: never champion

    import mlflow
    import numpy as np
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    assert client.get_model_version_by_alias("bit-classifier", CHAMPION).version == 3
    assert client.get_model_version_by_alias("bit-classifier", CHALLENGER).version == 4
    model = mlflow.onnx.load_model("models:/bit-classifier@champion")
    assert [o.name for o in model.graph.output] == ["logits"]
    pyfunc = mlflow.pyfunc.load_model("models:/bit-classifier@champion")
    out = pyfunc.predict(np.ones((2, 3, 4, 4), np.float32))
    assert np.asarray(out["logits"]).shape == (2, 3)
    written = json.loads((tmp / "better" / "registry.json").read_text())
    assert written["alias"] == CHAMPION


def test_unknown_metric_is_a_clear_error(store):
    from bit_core.config import ConfigError

    tmp, params = store
    params = params.model_copy(update={"registry": params.registry.model_copy(
        update={"metric": "f1"})})
    with pytest.raises(ConfigError, match="registry.metric 'f1'"):
        _pipeline_run(tmp, params, "run", 90.0)
