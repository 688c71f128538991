"""Nightly retraining: retrain only when DVC sees a change, and record it as a DVC experiment.

In a temporary git copy of the repository with the tiny settings, a first nightly run trains and
saves the experiment (`dvc exp save -n nightly-...`); a second one, with nothing changed, runs no
stage and says it is up to date.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.pipeline import PreflightError, changing_sources, check_git_checkout
from tests.conftest import make_clone

BIN = Path(sys.executable).parent


def test_only_changeable_sources_are_refreshed():
    base = {"data": {"source": "digits"}, "weights": {"source": "none"}}
    assert changing_sources(base) == []
    assert changing_sources({**base, "data": {"source": "cifar10"},
                             "weights": {"source": "official"}}) == []
    assert changing_sources({"data": {"source": "imagefolder"},
                             "weights": {"source": "file"}}) == ["fetch_data", "fetch_weights"]


def test_nightly_needs_a_git_commit(tmp_path):
    with pytest.raises(PreflightError, match="git repository with a commit"):
        check_git_checkout(tmp_path)


@pytest.fixture(scope="module")
def clone(tmp_path_factory, repo_root):
    return make_clone(repo_root, tmp_path_factory.mktemp("nightly") / "repo")


@pytest.fixture(scope="module")
def nightly_runs(clone):
    """Two nightly runs in a row, as the gpu/npu schedules would start them."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bit_finetune

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{clone / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    saved = {key: os.environ.get(key) for key in (*env, "BIT_PARAMS", "MLFLOW_RUN_ID")}
    os.environ.update(env)
    os.environ.pop("BIT_PARAMS", None)
    os.environ.pop("MLFLOW_RUN_ID", None)
    try:
        with prefect_test_harness(server_startup_timeout=120):
            first = bit_finetune(device="cpu", repo=str(clone), nightly=True)
            start = time.perf_counter()
            second = bit_finetune(device="cpu", repo=str(clone), nightly=True)
            seconds = time.perf_counter() - start
            artifacts = _artifacts("bit-nightly")
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return first, second, seconds, artifacts


def _artifacts(key: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
    return [str(artifact.data) for artifact in found]


def _dvc(repo: Path, *args: str) -> str:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=repo, capture_output=True, text=True,
                          check=True, timeout=300).stdout


@pytest.mark.slow
def test_first_nightly_trains_and_records_the_experiment(clone, nightly_runs):
    first = nightly_runs[0]
    ran = {r["stage"]: r["ran"] for r in first["stages"]}
    assert not first["up_to_date"] and ran["finetune"] and ran["evaluate"]
    name = first["experiment"]["name"]
    assert name.startswith("nightly-")
    assert name in _dvc(clone, "exp", "list", "--name-only").split()
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


@pytest.mark.slow
def test_second_nightly_is_up_to_date_and_fast(clone, nightly_runs):
    first, second, seconds, artifacts = nightly_runs
    assert second["up_to_date"] and second["experiment"] is None
    assert second["stages"] == []  # nothing refreshed, nothing trained
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert any("up to date" in text for text in artifacts), artifacts
    assert any(first["experiment"]["name"] in text for text in artifacts), artifacts
    assert len(_dvc(clone, "exp", "list", "--name-only").split()) == 1
    print(f"up-to-date nightly run: {seconds:.1f} s")
    assert seconds < 30


@pytest.mark.slow
def test_recorded_experiment_reproduces(clone, nightly_runs):
    """After later changes, `dvc exp apply` brings back the experiment's parameters and results."""
    from flows.overrides import apply_overrides

    name = nightly_runs[0]["experiment"]["name"]
    assert name in _dvc(clone, "exp", "show", "--json")
    params, metrics = (clone / "params.yaml").read_text(), clone / "reports/eval/metrics.json"
    recorded = metrics.read_text()
    apply_overrides(clone / "params.yaml", ["train.seed=9"])
    metrics.unlink()
    _dvc(clone, "exp", "apply", name)
    assert (clone / "params.yaml").read_text() == params
    assert metrics.read_text() == recorded
    status = json.loads(_dvc(clone, "status", "--json") or "{}")
    # models/resume (the fine-tune stage's persist folder) is empty after a finished training;
    # `dvc exp apply` removes empty folders, which `dvc status` then reports as deleted.
    if status.get("finetune") == [{"changed outs": {"models/resume": "deleted"}}]:
        del status["finetune"]
    assert status == {}
