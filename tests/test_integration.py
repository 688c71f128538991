"""Integration tier: `dvc repro` in a fresh copy of the repository, then the Prefect flow on it.

Tiny training settings keep it to about a minute per pipeline; the default experiment's own
numbers are what `make pipeline` shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from flows.dag import stages
from tests.conftest import BIN, REPO, TINY, make_clone, running_mlflow_server

pytestmark = pytest.mark.slow
STAGES = stages(REPO)
AFTER_WEIGHTS = STAGES[STAGES.index("finetune"):]


@pytest.fixture(scope="module")
def clone(tmp_path_factory, repo_root):
    return make_clone(repo_root, tmp_path_factory.mktemp("clone"), TINY)


def _env(repo: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("BIT_PARAMS", None)
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(repo), capture_output=True,
                          text=True, timeout=900)


def _ran(output: str) -> list[str]:
    """The stages DVC says it ran, in the order it ran them (any stage name, known or not)."""
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def first_repro(clone):
    result = _dvc(clone, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_repro_runs_every_stage(clone, first_repro):
    assert _ran(first_repro.stdout) == STAGES
    metrics = json.loads(_dvc(clone, "metrics", "show", "--json").stdout)
    flat = json.dumps(metrics)
    for key in ("val_top1", "max_abs_diff", "onnxruntime_top1", "torch_fp32_fps_bs1"):
        assert key in flat


def test_second_repro_is_a_no_op(clone, first_repro):
    start = time.perf_counter()
    result = _dvc(clone, "repro")
    seconds = time.perf_counter() - start
    assert result.returncode == 0 and _ran(result.stdout) == []
    assert "up to date" in result.stdout
    print(f"no-op dvc repro: {seconds:.2f} s")


def test_mlflow_run_is_complete(clone, first_repro):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((clone / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"val_top1", "onnx_max_abs_diff", "test_onnxruntime_top1"} <= set(run.data.metrics)
    # The hashes of this run's outputs, as dvc.lock holds them after the run: the clone starts
    # with the committed lock of another run, whose hashes these must not be.
    from tasks.tracking import dvc_out_hashes

    final = dvc_out_hashes(clone / "dvc.lock")
    tagged = {k: v for k, v in run.data.tags.items() if k.startswith("dvc.")}
    assert "dvc.finetune.models/finetuned" in tagged and "dvc.evaluate.reports/eval/fps.png" in tagged
    assert tagged == {k: v for k, v in final.items() if not k.startswith("dvc.register.")}


def test_plots_show_renders(clone, first_repro):
    result = _dvc(clone, "plots", "show", "--json")
    assert result.returncode == 0 and "reports/train/loss.csv" in result.stdout


def test_prefect_flow_reruns_only_what_a_train_param_change_touches(clone, first_repro,
                                                                    monkeypatch):
    """The flow brings the stages up to date in dvc.yaml's order; after a change of a training
    parameter, DVC reruns the fine-tune and what depends on it, and none of the data stages."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bit_finetune

    for key, value in _env(clone).items():
        monkeypatch.setenv(key, value)
    with prefect_test_harness(server_startup_timeout=120):
        result = bit_finetune(overrides=["train.seed=11"], device="cpu", repo=str(clone))
    ran = {r["stage"]: r["ran"] for r in result["stages"]}
    assert list(ran) == STAGES
    assert [stage for stage in STAGES if ran[stage]] == AFTER_WEIGHTS
    assert "seed: 11" in (clone / "params.yaml").read_text()
    assert result["mlflow_run_id"]
    after = _dvc(clone, "repro")  # the flow left dvc.lock matching the workspace
    assert after.returncode == 0 and _ran(after.stdout) == []


def test_run_read_back_through_mlflow_server(clone, first_repro):
    """`mlflow server` on the pipeline's store serves the run over its REST API."""
    import json as _json
    import urllib.request

    run_id = json.loads((clone / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    with running_mlflow_server(f"sqlite:///{clone / 'mlflow.db'}", clone) as base:
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as reply:
            run = _json.load(reply)["run"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val_top1", "onnx_max_abs_diff", "test_onnxruntime_top1"} <= metrics
        url = f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss"
        with urllib.request.urlopen(url) as reply:
            steps = [m["step"] for m in _json.load(reply)["metrics"]]
        assert steps == [1, 2]
