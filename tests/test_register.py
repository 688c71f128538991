"""Champion / challenger in a real MLflow registry (SQLite store)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bit_core.config import load_params
from bit_core.contracts import EvaluationMetrics, ExportReport
from tasks import tracking
from tasks.register import (CHALLENGER, CHAMPION, Candidate, choose_champion, register,
                            settle_champion)
from tests.conftest import tiny_onnx


@pytest.fixture
def store(tmp_path, tracking_store, repo_root):
    tiny_onnx(tmp_path / "model.onnx")
    return tmp_path, load_params(repo_root / "params.yaml")


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def prepared_data(root, test_images: int):
    """A prepare stage output; data sets differ by their test split."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text('["a", "b", "c"]\n')
    for split, count in (("train", 6), ("val", 3), ("test", test_images)):
        rows = "".join(f"{split}/{i}.png,{i % 3}\n" for i in range(count))
        (root / f"{split}.csv").write_text("path,label\n" + rows)
    return root


def pipeline_run(tmp, params, name, top1, parity=1e-6, test_images=3):
    """The inputs the register stage reads, for a run already in the tracking store."""
    from mlflow.tracking import MlflowClient

    run_dir = tmp / name
    run_dir.mkdir()
    client = MlflowClient(tracking.configure())
    experiment = client.get_experiment_by_name("registry-test")
    experiment_id = experiment.experiment_id if experiment else \
        client.create_experiment("registry-test")
    tracking.write_run_file(run_dir, client.create_run(experiment_id, run_name=name).info.run_id)
    EvaluationMetrics(test_images=3, om_skipped="no ATC here", onnxruntime_top1=top1).write(
        run_dir / "metrics.json")
    ExportReport(opset=17, onnx_bytes=100, op_types=["Flatten"], max_abs_diff=parity,
                 max_diff_to_tolerance=parity / params.export.atol).write(run_dir / "export.json")
    prepared_data(run_dir / "prepared", test_images)
    return run_dir


def _pipeline_run(tmp, params, name, top1, parity=1e-6, test_images=3):
    run_dir = pipeline_run(tmp, params, name, top1, parity, test_images)
    return register(params, tmp / "model.onnx", run_dir, run_dir / "metrics.json",
                    run_dir / "export.json", run_dir / "prepared", run_dir / "registry.json")


def test_a_deleted_or_unknown_mlflow_run_is_one_line(store):
    """The fine-tune's outputs (restored by DVC) name an MLflow run that was deleted since, or
    that another store holds: a later stage says so in one line instead of MLflow's traceback."""
    from mlflow.tracking import MlflowClient

    from bit_core.errors import ContractError

    tmp, params = store
    run_dir = pipeline_run(tmp, params, "gone", 95.0)
    run_id = tracking.read_run_id(run_dir)
    MlflowClient(tracking.configure()).delete_run(run_id)
    args = (tmp / "model.onnx", run_dir, run_dir / "metrics.json", run_dir / "export.json",
            run_dir / "prepared", run_dir / "registry.json")
    for problem, fix in (("was deleted from", f"mlflow runs restore --run-id {run_id}"),
                         ("is not in", "MLFLOW_TRACKING_URI")):
        with pytest.raises(ContractError) as err:
            register(params, *args)
        message = str(err.value)
        assert "\n" not in message and problem in message and fix in message, message
        assert "dvc repro --force finetune" in message and "mlflow_run.json" in message
        tracking.write_run_file(run_dir, "0" * 32)  # a run no store here holds
    assert not (run_dir / "registry.json").exists()


def test_an_unreachable_tracking_server_is_not_called_a_missing_run(tmp_path, monkeypatch):
    from bit_core.errors import ContractError
    from tests.conftest import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking.write_run_file(tmp_path, "f" * 32)
    with pytest.raises(ContractError) as err:
        with tracking.appended_run(tmp_path):
            pass
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"could not read MLflow run {'f' * 32}")
    assert uri in message and "reachable" in message


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
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    assert client.get_model_version_by_alias("bit-classifier", CHAMPION).version == 3
    assert client.get_model_version_by_alias("bit-classifier", CHALLENGER).version == 4
    # The registered model takes images (bytes, or base64 text as JSON carries them) and
    # tensors, and answers with class names: the tiny model's logits are the channel means.
    pyfunc = mlflow.pyfunc.load_model("models:/bit-classifier@champion")
    tensor = np.stack([np.full((4, 4), v, np.float32) for v in (-1.0, 0.5, -0.5)]).tolist()
    images = pd.DataFrame({"image": [png((255, 0, 0)), base64.b64encode(png((0, 0, 255))).decode(),
                                     tensor]})
    out = pyfunc.predict(images, params={"top_k": 2})
    assert [row[0] for row in out["classes"]] == ["a", "c", "b"]
    assert all(len(row) == 2 and row[0] > row[1] for row in out["probabilities"])
    assert pyfunc.metadata.get_input_schema().input_names() == ["image"]
    onnx_inside = [a.path for a in client.list_artifacts(
        client.get_model_version("bit-classifier", "3").run_id, "model/artifacts")]
    # the ONNX file, still there for ATC and other runtimes, and the evaluation bit predict
    # chooses its back-end by
    assert onnx_inside == ["model/artifacts/metrics.json", "model/artifacts/model.onnx"]
    written = json.loads((tmp / "better" / "registry.json").read_text())
    assert written["alias"] == CHAMPION


def test_unknown_metric_is_a_clear_error(store):
    from bit_core.config import ConfigError

    tmp, params = store
    params = params.model_copy(update={"registry": params.registry.model_copy(
        update={"metric": "f1"})})
    with pytest.raises(ConfigError, match="registry.metric 'f1'"):
        _pipeline_run(tmp, params, "run", 90.0)


def test_a_champion_of_other_data_is_not_compared(store):
    """A digits model with a high top-1 does not dethrone a CIFAR-10 model: other test data."""
    from mlflow.tracking import MlflowClient

    tmp, params = store
    cifar = _pipeline_run(tmp, params, "cifar", 97.0, test_images=3)
    digits = _pipeline_run(tmp, params, "digits", 99.4, test_images=5)
    assert cifar["alias"] == CHAMPION
    assert digits["alias"] == CHALLENGER and digits["previous_champion"] is None
    assert "trained on other data" in digits["note"] and "registry.model_name" in digits["note"]
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("bit-classifier", CHAMPION).version) == 1
    tags = client.get_model_version("bit-classifier", "2").tags
    assert tags["data.fingerprint"] == digits["data_fingerprint"] != cifar["data_fingerprint"]


def test_the_champion_rule_is_the_sequential_one():
    versions = [Candidate(1, 95.0, True, "d"), Candidate(2, 94.0, True, "d"),
                Candidate(3, 96.5, True, "d"), Candidate(4, 99.0, False, "d"),
                Candidate(5, 96.6, True, "d")]
    assert choose_champion(versions, margin=0.0) == 5
    assert choose_champion(versions, margin=0.5) == 3  # 96.6 < 96.5 + 0.5
    assert choose_champion(list(reversed(versions)), margin=0.5) == 3  # order of listing
    assert choose_champion([Candidate(1, 99.0, False, "d")], margin=0.0) is None


def test_a_stale_alias_left_by_a_racing_register_is_corrected(store):
    """A register that decided on an old view (champion: v1) and wrote last leaves the alias on
    a worse version; the next settle moves it back to what the rule gives."""
    from mlflow.tracking import MlflowClient

    tmp, params = store
    _pipeline_run(tmp, params, "v1", 95.0)
    _pipeline_run(tmp, params, "v2", 96.0)
    third = _pipeline_run(tmp, params, "v3", 95.5)
    client = MlflowClient()
    client.set_registered_model_alias("bit-classifier", CHAMPION, "3")  # the stale write
    mine = Candidate(3, 95.5, True, third["data_fingerprint"])
    assert settle_champion(client, "bit-classifier", mine, 0.0) == (CHALLENGER, None)
    assert int(client.get_model_version_by_alias("bit-classifier", CHAMPION).version) == 2


@pytest.mark.slow
def test_two_registers_at_once_leave_the_right_champion(tmp_path, mlflow_server, repo_root):
    """The nightly gpu and npu runs register at the same moment through one MLflow server."""
    import os
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    tiny_onnx(tmp_path / "model.onnx")
    params = load_params(repo_root / "params.yaml")
    params = params.model_copy(update={"registry": params.registry.model_copy(
        update={"model_name": "raced"})})
    (tmp_path / "params.yaml").write_text(json.dumps(params.model_dump()))
    _pipeline_run(tmp_path, params, "old", 90.0)
    runs = [pipeline_run(tmp_path, params, name, top1) for name, top1 in
            (("gpu", 96.0), ("npu", 95.0))]
    env = {**os.environ, "BIT_PARAMS": str(tmp_path / "params.yaml")}
    env.pop("MLFLOW_RUN_ID", None)
    for round_ in range(2):  # twice, so that either may finish first
        procs = [subprocess.Popen(
            [sys.executable, "-m", "tasks.register", "--onnx", str(tmp_path / "model.onnx"),
             "--checkpoint", str(run), "--metrics", str(run / "metrics.json"),
             "--export-report", str(run / "export.json"), "--splits", str(run / "prepared"),
             "--out", str(run / f"registry{round_}.json")], env=env, cwd=repo_root,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for run in (runs if round_ == 0 else runs[::-1])]
        try:
            outputs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:  # each register this test started is gone when it leaves
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert [p.returncode for p in procs] == [0, 0], outputs
        client = MlflowClient(mlflow_server)
        champion = client.get_model_version_by_alias("raced", CHAMPION)
        assert champion.tags["test_metric"] == "96.0", outputs


def test_a_model_with_its_weights_beside_the_graph_is_registered_whole(tmp_path,
                                                                        tracking_store,
                                                                        repo_root):
    """A model over ~1.8 GB (BiT-*-R152x4) keeps its weights in model.onnx.data: the registered
    model carries that file beside the graph, and answers from it."""
    import mlflow
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from bit_core.record import ModelRecord

    swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], np.float32)  # logits b, a, c
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "swap"], ["logits"])], "apart",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(swap, "swap")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    helper.set_model_props(model, ModelRecord(model_name="BiT-M-R50x1", classes=["a", "b", "c"],
                                              resolution=4, precrop=5).onnx_metadata())
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    params = load_params(repo_root / "params.yaml")
    assert _pipeline_run(tmp_path, params, "apart", 95.0)["alias"] == CHAMPION

    pyfunc = mlflow.pyfunc.load_model("models:/bit-classifier@champion")
    out = pyfunc.predict(pd.DataFrame({"image": [png((255, 0, 0))]}), params={"top_k": 1})
    assert list(out["classes"][0]) == ["b"]  # red: channel a, swapped to b by the weights
