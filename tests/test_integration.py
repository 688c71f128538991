"""Integration tier: `dvc repro` in a fresh copy of the repository, then the Prefect flow on it.

After the first `dvc repro`, nightly retraining as the schedules start it: a nightly run with a
changed training parameter reruns the fine-tune and what follows it (none of the data stages)
and records a DVC experiment (`dvc exp save -n nightly-...`); a second nightly run, with nothing
changed, runs no stage and says it is up to date; a plain run then finds nothing to do and
records no experiment; and `dvc exp apply` brings the recorded experiment back.

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


@pytest.fixture(scope="module")
def flow_runs(clone, first_repro):
    """Through the Prefect flow, in order: a nightly run with train.seed=11 (timed), a second
    nightly run with nothing changed (timed), a plain run; then `dvc repro`."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bit_finetune

    runs, seconds = {}, {}
    env = _env(clone)
    with pytest.MonkeyPatch.context() as patch:  # this process's environment becomes `env`
        for key, value in env.items():
            patch.setenv(key, value)
        for key in set(os.environ) - set(env):
            patch.delenv(key)
        with prefect_test_harness(server_startup_timeout=120):
            for name, overrides, nightly in (("changed", ["train.seed=11"], True),
                                             ("unchanged", None, True), ("plain", None, False)):
                start = time.perf_counter()
                runs[name] = bit_finetune(overrides=overrides, device="cpu", repo=str(clone),
                                          nightly=nightly)
                seconds[name] = time.perf_counter() - start
            artifacts = _artifacts("bit-nightly")
    return runs, seconds, artifacts, _dvc(clone, "repro")


def _artifacts(key: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    return [str(artifact.data) for artifact in found]


def _experiments(repo: Path) -> list[str]:
    return _dvc(repo, "exp", "list", "--name-only").stdout.split()


def test_a_nightly_run_reruns_only_what_a_train_param_change_touches(clone, flow_runs):
    """The flow brings the stages up to date in dvc.yaml's order; after a change of a training
    parameter, DVC reruns the fine-tune and what depends on it, and none of the data stages."""
    runs, _, _, after = flow_runs
    first = runs["changed"]
    ran = {r["stage"]: r["ran"] for r in first["stages"]}
    assert list(ran) == STAGES
    assert [stage for stage in STAGES if ran[stage]] == AFTER_WEIGHTS
    assert not first["up_to_date"] and first["mlflow_run_id"]
    assert "seed: 11" in (clone / "params.yaml").read_text()
    assert after.returncode == 0 and _ran(after.stdout) == []  # dvc.lock matches the workspace


def test_the_nightly_run_records_the_experiment(clone, flow_runs):
    first = flow_runs[0]["changed"]
    name = first["experiment"]["name"]
    assert name.startswith("nightly-")
    assert name in _experiments(clone)
    rev = first["experiment"]["rev"]
    files = subprocess.run(["git", "show", "--name-only", "--format=%B", rev], cwd=clone,
                           capture_output=True, text=True, check=True).stdout
    assert first["mlflow_run_id"] in files  # the commit message names the MLflow run
    for path in ("dvc.lock", "params.yaml", "reports/eval/metrics.json",
                 "reports/train/metrics.json"):
        assert path in files.split(), files
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{clone / 'mlflow.db'}").get_run(first["mlflow_run_id"])
    assert run.data.tags["dvc.experiment"] == name
    assert run.data.tags["dvc.experiment_rev"] == rev


def test_a_second_nightly_is_up_to_date_and_fast(clone, flow_runs):
    runs, seconds, artifacts, _ = flow_runs
    first, second = runs["changed"], runs["unchanged"]
    assert second["up_to_date"] and second["experiment"] is None
    assert second["stages"] == []  # nothing refreshed, nothing trained
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert any("up to date" in text for text in artifacts), artifacts
    assert any(first["experiment"]["name"] in text for text in artifacts), artifacts
    print(f"up-to-date nightly run: {seconds['unchanged']:.1f} s")
    assert seconds["unchanged"] < 30


def test_a_plain_run_with_nothing_changed_runs_nothing_and_records_no_experiment(clone,
                                                                               flow_runs):
    runs = flow_runs[0]
    plain = runs["plain"]
    assert [r["stage"] for r in plain["stages"]] == STAGES
    assert not any(r["ran"] or r["restored"] for r in plain["stages"])
    assert plain["up_to_date"] and plain["experiment"] is None
    assert plain["mlflow_run_id"] == runs["changed"]["mlflow_run_id"]
    assert _experiments(clone) == [runs["changed"]["experiment"]["name"]]


def test_run_read_back_through_mlflow_server(clone, first_repro):
    """`mlflow server` on the pipeline's store serves the run over its REST API; the flow's
    preflight finds the server up and links the run in its UI."""
    import json as _json
    import urllib.request

    from flows.pipeline import check_tracking_server, mlflow_link

    run_id = json.loads((clone / "models/finetuned/mlflow_run.json").read_text())["run_id"]
    with running_mlflow_server(f"sqlite:///{clone / 'mlflow.db'}", clone) as base:
        assert check_tracking_server(base) is True
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}") as reply:
            run = _json.load(reply)["run"]
        assert run["info"]["status"] == "FINISHED"
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"val_top1", "onnx_max_abs_diff", "test_onnxruntime_top1"} <= metrics
        url = f"{base}/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss"
        with urllib.request.urlopen(url) as reply:
            steps = [m["step"] for m in _json.load(reply)["metrics"]]
        assert steps == [1, 2]
        experiment = run["info"]["experiment_id"]
        assert f"({base}/#/experiments/{experiment}/runs/{run_id})" in mlflow_link(base, run_id)


def test_the_recorded_experiment_reproduces(clone, flow_runs):
    """After later changes, `dvc exp apply` brings back the experiment's parameters and results.
    (Last in this module: it changes the clone.)"""
    from flows.overrides import apply_overrides

    name = flow_runs[0]["changed"]["experiment"]["name"]
    assert name in _dvc(clone, "exp", "show", "--json").stdout
    params, metrics = (clone / "params.yaml").read_text(), clone / "reports/eval/metrics.json"
    recorded = metrics.read_text()
    apply_overrides(clone / "params.yaml", ["train.seed=9"])
    metrics.unlink()
    assert _dvc(clone, "exp", "apply", name).returncode == 0
    assert (clone / "params.yaml").read_text() == params
    assert metrics.read_text() == recorded
    assert json.loads(_dvc(clone, "status", "--json").stdout or "{}") == {}
