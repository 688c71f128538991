"""Real servers: the flow through Prefect (server, work pool, deployment, worker), and the MLflow
preflight against a closed port and a live `mlflow server`.

The end-to-end test runs scripts/prefect_e2e.sh on a temporary git copy of the repository with
the tiny training settings (the run clones it, works in its own workspace and pushes its DVC
experiment back), then checks that nothing the script started is still running.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.pipeline import PreflightError, check_tracking_server, mlflow_link
from tests.http_fixtures import ArchiveServer
from tests.conftest import (BIN, all_gone, command_lines, free_port, make_clone, processes_with_env,
                            running_mlflow_server, stop_group)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prefect_e2e.sh"
E2E_TIMEOUT = 1800


# --- MLflow preflight --------------------------------------------------------------------------

def test_preflight_skips_local_stores():
    assert check_tracking_server(None) is False
    assert check_tracking_server("sqlite:///mlflow.db") is False
    assert check_tracking_server("file:///tmp/mlruns") is False


def test_preflight_fails_fast_on_a_closed_port():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(PreflightError) as err:
        check_tracking_server(uri, timeout=2)
    message = str(err.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message and uri in message
    assert "mlflow server" in message and "MLFLOW_TRACKING_URI" in message


@pytest.fixture
def no_mlflow_credentials(monkeypatch):
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_preflight_authenticates_with_the_credentials_mlflow_uses(
        http_server: ArchiveServer, no_mlflow_credentials, monkeypatch):
    http_server.add("/health", b"OK", basic=("ci", "s3cr@t"))
    base = http_server.base_url
    assert check_tracking_server(base.replace("://", "://ci:s3cr%40t@") + "/")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ci")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr@t")
    assert check_tracking_server(base)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    http_server.add("/health", b"OK", token="tok-77")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-77")
    assert check_tracking_server(base)
    assert http_server.authorizations("/health") == [_basic("ci", "s3cr@t")] * 2 + ["Bearer tok-77"]


def test_preflight_refused_credentials_one_line_without_the_password(
        http_server: ArchiveServer, no_mlflow_credentials):
    http_server.add("/health", b"OK", basic=("ci", "right"))
    uri = http_server.base_url.replace("://", "://ci:hunter2@")
    with pytest.raises(PreflightError) as err:
        check_tracking_server(uri, timeout=2)
    message = str(err.value)
    assert "HTTP 401" in message and "ci:***@127.0.0.1" in message and "\n" not in message
    assert "hunter2" not in message and "MLFLOW_TRACKING_PASSWORD" in message


def test_mlflow_link_to_a_server_with_credentials(http_server: ArchiveServer, no_mlflow_credentials):
    http_server.add("/api/2.0/mlflow/runs/get?run_id=abc123",
                    b'{"run": {"info": {"experiment_id": "7"}}}', basic=("ci", "hunter2"))
    base = http_server.base_url
    text = mlflow_link(base.replace("://", "://ci:hunter2@"), "abc123")
    assert text == f"MLflow run: [abc123]({base}/#/experiments/7/runs/abc123)"
    assert "hunter2" not in mlflow_link(base.replace("://", "://ci:hunter2@"), "gone")


@pytest.mark.slow
def test_flow_fails_at_preflight_before_any_stage(tmp_path, monkeypatch):
    """With the server down, the flow stops in its first task: params.yaml is untouched."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bit_finetune

    repo = make_clone(Path(__file__).resolve().parents[1], tmp_path / "clone")
    lock = repo / "dvc.lock"
    before = (repo / "params.yaml").read_text(), lock.read_text() if lock.exists() else None
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with prefect_test_harness(server_startup_timeout=120):
        start = time.perf_counter()
        with pytest.raises(PreflightError, match=uri):
            bit_finetune(overrides=["train.seed=4"], device="cpu", repo=str(repo))
        seconds = time.perf_counter() - start
    after = (repo / "params.yaml").read_text(), lock.read_text() if lock.exists() else None
    assert after == before and not (repo / "data" / "raw").exists()
    assert seconds < 30, seconds


def test_the_mlflow_server_runs_without_job_consumers(tmp_path, monkeypatch):
    """In the project's environment `mlflow server` is its web server alone (the mlflow CLI and
    one uvicorn worker): MLflow's job runner and its seven huey consumers are not started."""
    marker = ("BIT_TEST_SERVER", str(tmp_path))
    monkeypatch.setenv(*marker)
    with running_mlflow_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path):
        time.sleep(2)  # with jobs on, the runner starts its consumers by now
        commands = command_lines(*marker)
    assert all_gone(*marker)
    assert len(commands) == 2 and not any("huey" in c or "job" in c for c in commands), commands


# --- stopping a stage ----------------------------------------------------------------------------

def test_a_stopped_stage_ends_before_prefects_worker_kills_the_flow(monkeypatch):
    """A cancelled deployment run's process is SIGKILLed 30 s after its SIGTERM (Prefect's process
    worker; read from its source, so an upgrade that changes it fails here). The stage's grace
    is under that, and torchrun's agent gets 5 s less to stop its workers; a timeout the user set
    for the agent is kept."""
    import inspect
    import re

    from prefect.runner import _cancellation_manager

    from flows.pipeline import STOP_GRACE, stage_env, stop_grace

    (worker,) = re.findall(r"grace_seconds = ([\d.]+)", inspect.getsource(_cancellation_manager))
    monkeypatch.delenv("BIT_STOP_GRACE", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert stop_grace() == STOP_GRACE < float(worker)
    assert stage_env()["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(int(STOP_GRACE) - 5)
    monkeypatch.setenv("BIT_STOP_GRACE", "60")  # a checkout, where nothing kills the flow
    env = stage_env({"BIT_NODE_RANK": "1"})
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "55" and env["BIT_NODE_RANK"] == "1"
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "7")
    assert stage_env()["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "7"


def test_mlflow_link_for_a_local_store():
    text = mlflow_link("sqlite:////tmp/x/mlflow.db", "abc123")
    assert "`abc123`" in text and "sqlite:////tmp/x/mlflow.db" in text
    assert mlflow_link("sqlite:///m.db", None) == "MLflow run: none recorded"


# --- the whole flow through a Prefect server ---------------------------------------------------

@pytest.mark.slow
def test_prefect_e2e_script(tmp_path, repo_root):
    repo = make_clone(repo_root, tmp_path / "clone")
    work = tmp_path / "prefect"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_BIN": str(BIN), "RUN_TIMEOUT": str(E2E_TIMEOUT - 300)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "BIT_PARAMS", "PREFECT_API_URL"):
        env.pop(key, None)
    start = time.perf_counter()
    process = subprocess.Popen(["bash", str(SCRIPT), str(repo), str(work), "train.seed=5"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=E2E_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_group(process)
        output, _ = process.communicate()
        pytest.fail(f"prefect_e2e.sh did not finish in {E2E_TIMEOUT} s:\n{output[-4000:]}")
    seconds = time.perf_counter() - start
    print(f"prefect_e2e.sh: {seconds:.0f} s\n{output}")
    survivors = processes_with_env("PREFECT_HOME", str(work / "prefect-home"))
    started = dict(line.split() for line in (work / "pids").read_text().splitlines())
    for pid in survivors:  # clean up after a failure, then report it
        os.kill(pid, signal.SIGKILL)
    assert process.returncode == 0, output[-6000:]
    assert not survivors, f"processes left running: {survivors}"
    assert set(started) == {"server", "mlflow", "worker"}
    for pid in started.values():
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"

    result = json.loads((work / "result.json").read_text())
    assert result["state"] == "Completed"
    assert "bit-evaluation" in result["artifacts"]
    assert result["mlflow_run_id"] and "test_onnxruntime_top1" in result["metrics"]
    assert result["workspaces_left"] == []  # the run's clone went with the run
    assert result["nightly_schedules"] == {"cpu": [], "gpu": [{"nightly": True}],
                                           "npu": [{"nightly": True}]}
    # the server's scheduler turned the cron schedules into nightly runs (none for cpu)
    scheduled = result["scheduled_nightly_runs"]
    assert scheduled["gpu"] > 0 and scheduled["npu"] > 0 and scheduled["cpu"] == 0, scheduled
    # the run worked in its own clone and pushed its experiment back: the checkout is untouched
    (name,) = result["experiments"]
    ref = subprocess.run(["git", "for-each-ref", "--format=%(refname)", f"refs/exps/*/*/{name}"],
                         cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    params = subprocess.run(["git", "show", f"{ref}:params.yaml"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
    assert "seed: 5" in params  # the --params override arrived, in the run's own params.yaml
    assert "seed: 5" not in (repo / "params.yaml").read_text()
    assert "e2e: ok" in output
