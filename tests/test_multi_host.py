"""Workers on two hosts, each run in its own workspace, sharing work through the remotes.

Everything is real and on 127.0.0.1: a Prefect server; a bare git repository holding the project
(the tiny settings committed), which the deployments' pull steps clone; a DVC remote on an
S3-compatible endpoint (moto, checking credentials); an `mlflow server` with proxied artifacts.
Two workers stand in for two hosts: each has its own folder (temporary files, where the
process worker makes the runs' workspaces), its own DVC cache and Prefect home, and its own pool
(bit-cpu and bit-gpu, both training on the CPU here).

Run A starts first; run B starts once A's data stages are on the remote, and the two then run
at the same time with different seeds. Checked: both complete, each with its own parameters; B
restored the data stages instead of running them; both workspaces are gone; both runs are
readable through the MLflow server alone (loss curve, metrics, ONNX model, a registered version
that loads); both experiments are listed from a third clone and one is reproduced there; a
nightly run on the other host with A's commit and parameters restores everything and trains
nothing, and so does one after a commit that changes no stage's input; a run cancelled during
its fine-tune leaves its checkpoint in the host's cache. Then the bad inputs:
each ends the run early with one line, leaves no experiment and no workspace, and no password
reaches a log. Every process started here is stopped here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bit_core.contracts import NODE_RANK_ENV
from flows.workspace import KEPT_DIR
from tasks import environment
from tests.conftest import (BIN, free_port, make_clone, processes_with_env, running_mlflow_server,
                            running_s3_server, running_server, stop_group)

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 1500  # seconds a flow run may take on a loaded 2-core machine
REMOTE = "s3://bit-dvc/dvc"
MARKER = "BIT_TEST_HOSTS"  # in the environment of every process this module starts
# Long enough to stop a run midway (a periodic checkpoint every 2 steps), short enough to finish.
LONG = ["train.schedule=[2, 20, 30]", "train.eval_every=100", "train.checkpoint_every=2",
        "train.peer_timeout=20"]


@dataclass
class Cluster:
    root: Path
    origin: Path  # the bare git repository
    api: str  # the Prefect server's API
    mlflow: str
    s3_env: dict[str, str]
    hosts: dict[str, Path]  # host name -> its folder
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        """What a command of this module runs with: the tools' settings, the servers, the remote."""
        env = {**environment.tool_env(), "PREFECT_API_URL": self.api, "NO_COLOR": "1",
               "MLFLOW_TRACKING_URI": self.mlflow, **self.s3_env, MARKER: str(self.root),
               "PREFECT_HOME": str(self.root / "prefect-home"), **extra}
        for key in ("MLFLOW_RUN_ID", "BIT_PARAMS", "BIT_PIPELINE_REPO", "PREFECT_PROFILE"):
            env.pop(key, None)
        return env

    def prefect(self, *args: str, cwd: Path | None = None) -> str:
        result = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd or self.root,
                                env=self.env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result.stdout

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path) -> None:
        with (self.root / f"{name}.log").open("w") as log:
            self.processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api}):
            return get_client(sync_client=True)


def _deploy(cluster: Cluster, checkout: Path) -> None:
    """What the README's server-host steps do: pools, the git URL variable, the deployments."""
    for pool in ("bit-cpu", "bit-gpu", "bit-npu"):
        cluster.prefect("work-pool", "create", pool, "--type", "process")
    cluster.prefect("variable", "set", "bit_git_url", f"file://{cluster.origin}")
    cluster.prefect("--no-prompt", "deploy", "--all", cwd=checkout)


def _start_worker(cluster: Cluster, host: str, pool: str) -> None:
    """A worker host: its own temporary folder (the runs' workspaces), DVC cache and Prefect
    home; the shared remote and servers."""
    folder = cluster.hosts[host]
    for sub in ("tmp", "dvc-cache", "prefect", "cache"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    env = cluster.env(BIT_DVC_REMOTE=REMOTE, BIT_DVC_CACHE=str(folder / "dvc-cache"),
                      TMPDIR=str(folder / "tmp"), PREFECT_HOME=str(folder / "prefect"),
                      XDG_CACHE_HOME=str(folder / "cache"), PREFECT_WORKER_QUERY_SECONDS="2",
                      OMP_NUM_THREADS="1",  # two hosts share 2 cores: no thread oversubscription
                      PREFECT_WORKER_PREFETCH_SECONDS="5")
    cluster.start(f"worker-{host}", [str(BIN / "prefect"), "worker", "start", "--pool", pool,
                                     "--limit", "1", "--name", host], env, folder)


def _stop_workers(cluster: Cluster) -> None:
    for process in reversed(cluster.processes):
        stop_group(process, grace=15)


def _nothing_left(root: Path) -> None:
    """After every server and worker stopped: no process of this module still runs."""
    left = processes_with_env(MARKER, str(root))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, repo_root):
    root = tmp_path_factory.mktemp("hosts")
    checkout = make_clone(repo_root, root / "checkout")
    origin = root / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(checkout), str(origin)], check=True)
    with ExitStack() as stack:  # stopped in reverse: workers, Prefect, MLflow, S3; then checked
        stack.callback(_nothing_left, root)
        s3 = stack.enter_context(running_s3_server(root))
        mlflow = stack.enter_context(running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}",
                                                           root))
        port = free_port()
        cluster = Cluster(root, origin, f"http://127.0.0.1:{port}/api", mlflow, s3.env(),
                          {"host-a": root / "host-a", "host-b": root / "host-b"})
        stack.enter_context(running_server(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--analytics-off"], f"{cluster.api}/health", root, "prefect-server",
            env=cluster.env(PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")))  # no 02:00 runs
        stack.callback(_stop_workers, cluster)
        _deploy(cluster, checkout)
        _start_worker(cluster, "host-a", "bit-cpu")
        _start_worker(cluster, "host-b", "bit-gpu")
        yield cluster


# --- reading runs back through the Prefect API ----------------------------------------------------

def _run(cluster: Cluster, deployment: str, seed: int | None = None, **extra) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    parameters = {"device": "cpu", **({"overrides": [f"train.seed={seed}"]} if seed else {}),
                  **extra.pop("parameters", {})}
    with temporary_settings({PREFECT_API_URL: cluster.api}):
        run = run_deployment(f"bit-finetune/{deployment}", parameters=parameters, timeout=0,
                             **extra)
    return str(run.id)


def _state(cluster: Cluster, run_id: str):
    with cluster.client() as client:
        return client.read_flow_run(run_id).state


def _wait_final(cluster: Cluster, run_id: str, seconds: float = RUN_TIMEOUT):
    deadline = time.monotonic() + seconds
    while not (state := _state(cluster, run_id)) or not state.is_final():
        assert time.monotonic() < deadline, f"flow run {run_id} not done in {seconds} s: {state}"
        time.sleep(3)
    return state


def _wait_task(cluster: Cluster, run_id: str, name: str, seconds: float = RUN_TIMEOUT) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + seconds
    while True:
        with cluster.client() as client:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[run_id])))
        if any(t.name == name and t.state and t.state.is_completed() for t in tasks):
            return
        state = _state(cluster, run_id)
        assert not (state and state.is_final()), f"{run_id} ended {state} before {name}"
        assert time.monotonic() < deadline, f"task {name} of {run_id} not done in {seconds} s"
        time.sleep(3)


def _artifact(cluster: Cluster, run_id: str, key: str):
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId,
                                                ArtifactFilterKey)

    with cluster.client() as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
            key=ArtifactFilterKey(any_=[key])))
    assert found, f"flow run {run_id} published no {key} artifact"
    data = found[0].data
    return json.loads(data) if isinstance(data, str) and data[:1] in "[{" else data


def _logs(cluster: Cluster, run_id: str) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with cluster.client() as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[run_id])))


def _outcomes(cluster: Cluster, run_id: str) -> dict[str, str]:
    return {row["stage"]: row["outcome"] for row in _artifact(cluster, run_id, "bit-stages")}


def _in_hosts_tmp(cluster: Cluster, relative: str) -> list[Path]:
    """Files ending in `relative` under the hosts' temporary folders, which the workers are
    creating and deleting meanwhile: a folder that vanishes mid-walk is skipped (os.walk
    ignores it, where Path.rglob raises), and git's object stores are not entered."""
    found = []
    for folder in cluster.hosts.values():
        for dirpath, dirnames, filenames in os.walk(folder / "tmp"):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            found += [Path(dirpath, name) for name in filenames
                      if Path(dirpath, name).as_posix().endswith("/" + relative)]
    return found


def _workspaces(cluster: Cluster) -> list[Path]:
    """Clones of the project left in the hosts' temporary folders."""
    return [p.parent for p in _in_hosts_tmp(cluster, "dvc.yaml")]


def _exp_refs(cluster: Cluster) -> dict[str, str]:
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)",
                          "refs/exps"], cwd=cluster.origin, capture_output=True, text=True,
                         check=True).stdout
    return {ref.rsplit("/", 1)[1]: sha for ref, sha in (line.split() for line in
                                                        out.splitlines())}


# --- two hosts at the same time ----------------------------------------------------------------

@pytest.fixture(scope="module")
def two_runs(cluster):
    """Run A (seed 1) on host-a; once its data stages are pushed, run B (seed 2) on host-b."""
    start = time.perf_counter()
    a = _run(cluster, "cpu", seed=1)
    _wait_task(cluster, a, "fetch_weights")
    b = _run(cluster, "gpu", seed=2)
    states = {"a": _wait_final(cluster, a), "b": _wait_final(cluster, b)}
    print(f"two runs on two hosts: {time.perf_counter() - start:.0f} s")
    return {"a": a, "b": b, "states": states}


def test_both_runs_complete(cluster, two_runs):
    for name, state in two_runs["states"].items():
        assert state.is_completed(), f"run {name}: {state.name}: {state.message}"


def test_the_second_host_restores_the_data_stages(cluster, two_runs):
    a, b = _outcomes(cluster, two_runs["a"]), _outcomes(cluster, two_runs["b"])
    data = ("fetch_data", "prepare", "fetch_weights")
    assert [a[stage] for stage in data] == ["ran"] * 3, a
    assert [b[stage] for stage in data] == ["restored"] * 3, b
    assert a["finetune"] == b["finetune"] == "ran"


def test_the_workspaces_are_removed(cluster, two_runs):
    deadline = time.monotonic() + 60  # the worker removes a workspace once the run's process ends
    while _workspaces(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert _workspaces(cluster) == []


@pytest.fixture(scope="module")
def tracked(cluster, two_runs):
    """Each run's MLflow run, found through the server by its DVC experiment's tag."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow)
    experiment = client.get_experiment_by_name("bit-pipeline").experiment_id
    runs = {}
    for name in ("a", "b"):
        evaluation = _artifact(cluster, two_runs[name], "bit-evaluation")
        exp = next(n for n in _exp_refs(cluster) if n in evaluation)
        (run,) = client.search_runs([experiment], f"tags.`dvc.experiment` = '{exp}'")
        runs[name] = (exp, run)
    return client, runs


def test_each_run_has_its_own_parameters(cluster, tracked):
    _, runs = tracked
    assert runs["a"][1].data.params["train.seed"] == "1"
    assert runs["b"][1].data.params["train.seed"] == "2"


def test_both_runs_are_readable_through_the_mlflow_server(cluster, two_runs, tracked,
                                                          tmp_path):
    import mlflow

    client, runs = tracked
    assert _workspaces(cluster) == []  # nothing left on the workers' disks
    for _, run in runs.values():
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
        assert "test_onnxruntime_top1" in run.data.metrics
        assert {"checkpoint", "onnx", "plots"} <= {a.path for a in
                                                   client.list_artifacts(run.info.run_id)}
        version = int(run.data.tags["registry.version"])
        mlflow.set_tracking_uri(cluster.mlflow)
        (tmp_path / str(version)).mkdir()
        model = mlflow.pyfunc.load_model(f"models:/bit-classifier/{version}",
                                         dst_path=str(tmp_path / str(version)))
        assert model.metadata.run_id == run.info.run_id


def test_bit_predict_reads_a_version_through_the_server_and_keeps_no_copy(
        cluster, tracked, tmp_path, monkeypatch):
    """`bit predict --model <version>` on a host whose store is the team's server downloads the
    version's ONNX and IR (some 200 MB for BiT-M R50x1), classifies with them, and leaves no
    copy behind in the temp folder."""
    import tempfile

    from PIL import Image

    from tasks.predict import open_model

    _, runs = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.mlflow)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    classifier = open_model(runs["a"][1].data.tags["registry.version"], None)
    assert list(scratch.iterdir()) == []
    (prediction,) = classifier.classify([Image.new("RGB", (40, 30), (200, 40, 10))], top_k=3)
    assert set(prediction.classes) <= set(classifier.classes)
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert 0 < sum(prediction.probabilities) <= 1 + 1e-6


def _dvc(root: Path, env: dict, *args: str) -> str:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_a_third_clone_lists_and_reproduces_the_experiments(cluster, tracked):
    _, runs = tracked
    third = cluster.root / "third"
    subprocess.run(["git", "clone", "-q", f"file://{cluster.origin}", str(third)], check=True)
    env = cluster.env()
    _dvc(third, env, "remote", "add", "--local", "--default", "bit", REMOTE)
    listed = _dvc(third, env, "exp", "list", "-A", "origin", "--name-only").split()
    assert {runs["a"][0], runs["b"][0]} <= set(listed)
    name = runs["a"][0]
    _dvc(third, env, "exp", "pull", "origin", name)
    _dvc(third, env, "exp", "apply", name)
    _dvc(third, env, "pull")
    assert json.loads(_dvc(third, env, "status", "--json")) == {}
    assert yaml.safe_load((third / "params.yaml").read_text())["train"]["seed"] == 1
    metrics = json.loads((third / "reports/eval/metrics.json").read_text())
    assert metrics["onnxruntime_top1"] == runs["a"][1].data.metrics["test_onnxruntime_top1"]
    assert (third / "models/onnx/model.onnx").stat().st_size > 0


def test_a_nightly_run_on_the_other_host_restores_and_trains_nothing(cluster, tracked):
    """A's commit and parameters, on host-b, with the workspace kept on request."""
    _, runs = tracked
    before = _exp_refs(cluster)
    kept = cluster.root / "kept"
    kept.mkdir()
    run = _run(cluster, "gpu", seed=1, parameters={"nightly": True},
               job_variables={"working_dir": str(kept)})
    state = _wait_final(cluster, run)
    assert state.is_completed(), state.message
    nightly = _artifact(cluster, run, "bit-nightly")
    assert "up to date" in nightly and runs["a"][0] in nightly and "nothing retrained" in nightly
    assert _exp_refs(cluster) == before  # nothing new to record
    (workspace,) = [p.parent for p in kept.rglob("dvc.yaml")]  # kept, as asked
    assert yaml.safe_load((workspace / "params.yaml").read_text())["train"]["seed"] == 1
    assert json.loads(_dvc(workspace, cluster.env(), "status", "--json")) == {}



def test_after_a_commit_that_changes_no_input_a_nightly_run_restores_every_stage(cluster,
                                                                               tracked):
    """A new commit that only edits the README: host-b's nightly run with A's parameters finds
    no experiment of that commit, and DVC's run cache restores every stage, the fine-tune
    included; nothing trains, and A's MLflow run keeps the tag of the experiment that made it."""
    client, runs = tracked
    edit = cluster.root / "docs-edit"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "clone", "-q", f"file://{cluster.origin}", str(edit)], check=True)
    with (edit / "README.md").open("a") as readme:
        readme.write("\nA line about nothing the pipeline reads.\n")
    for args in (["commit", "-qam", "docs only"], ["push", "-q", "origin", "HEAD"]):
        subprocess.run([*git, *args], cwd=edit, check=True, capture_output=True)
    run = _run(cluster, "gpu", seed=1, parameters={"nightly": True})
    state = _wait_final(cluster, run)
    assert state.is_completed(), state.message
    outcomes = _outcomes(cluster, run)
    assert set(outcomes.values()) == {"restored"}, outcomes
    assert "nothing retrained" in _artifact(cluster, run, "bit-nightly")
    trained = client.get_run(runs["a"][1].info.run_id).data.tags
    assert trained["dvc.experiment"] == runs["a"][0]


def test_a_cancelled_run_hands_its_checkpoint_to_the_host_cache(cluster, two_runs):
    """`prefect flow-run cancel` during the fine-tune: the trainer writes its checkpoint, the flow
    moves the resume folder into host-a's DVC cache before the worker kills the flow's process
    and removes the workspace, and the run ends Cancelled."""
    run = _run(cluster, "cpu", seed=10, parameters={"overrides": ["train.seed=10", *LONG]})
    deadline = time.monotonic() + RUN_TIMEOUT
    while not _in_hosts_tmp(cluster, "models/resume/checkpoint.pt"):
        assert not _state(cluster, run).is_final(), _state(cluster, run).message
        assert time.monotonic() < deadline, "no periodic checkpoint"
        time.sleep(0.2)
    cluster.prefect("flow-run", "cancel", run)
    state = _wait_final(cluster, run, seconds=120)
    assert state.is_cancelled(), state.name
    kept = list((cluster.hosts["host-a"] / "dvc-cache" / KEPT_DIR).rglob("checkpoint.pt"))
    assert [p.relative_to(p.parents[2]).as_posix() for p in kept] == [
        "models/resume/checkpoint.pt"], kept
    deadline = time.monotonic() + 60
    while _workspaces(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert _workspaces(cluster) == []

# --- bad input: one line, nothing half-done, no password in a log ----------------------------------

def _failed_early(cluster: Cluster, run_id: str, needle: str, *secrets: str) -> None:
    state = _wait_final(cluster, run_id, seconds=600)
    assert not state.is_completed()
    logs = _logs(cluster, run_id)
    lines = [line for log in logs for line in log.message.splitlines()]
    named = [line for line in lines + [state.message or ""] if needle in line]
    assert named, f"no line names {needle!r}:\n" + "\n".join(lines[-40:])
    print(f"bad input, {state.name}: {named[0]}")
    for secret in secrets:
        assert not any(secret in line for line in lines + [state.message or ""]), secret
    assert _tasks(cluster, run_id) <= {"preflight", "prepare-workspace"}  # no stage started


def _tasks(cluster: Cluster, run_id: str) -> set[str]:
    """The names of a flow run's task runs (their prefix, without Prefect's suffix)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with cluster.client() as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run_id])))
    return {t.name.rsplit("-", 1)[0] if t.name[-4:-3] == "-" else t.name for t in tasks}


def test_bad_input_ends_the_run_early_in_one_line(cluster, two_runs):
    refs = _exp_refs(cluster)
    closed = free_port()
    git_url = f"http://ci:g1t-s3cr3t@127.0.0.1:{closed}/bit-pipeline.git"
    cluster.prefect("variable", "set", "bit_git_url", git_url, "--overwrite")
    try:
        _failed_early(cluster, _run(cluster, "cpu"), f"127.0.0.1:{closed}", "g1t-s3cr3t")
        cluster.prefect("--no-prompt", "variable", "unset", "bit_git_url")
        _failed_early(cluster, _run(cluster, "cpu"), "bit_git_url")
    finally:
        cluster.prefect("variable", "set", "bit_git_url", f"file://{cluster.origin}",
                        "--overwrite")

    secret = cluster.s3_env["AWS_SECRET_ACCESS_KEY"]
    cases = {  # a job's env is laid over the worker's
        "DVC remote": {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
        f"DVC remote {REMOTE}": {"AWS_SECRET_ACCESS_KEY": "wr0ng-s3cr3t"},
        "MLflow tracking server": {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
    }
    started = [(needle, _run(cluster, deployment, job_variables={"env": env}))
               for (needle, env), deployment in zip(cases.items(), ("cpu", "gpu", "cpu"))]
    for needle, run_id in started:
        _failed_early(cluster, run_id, needle, "wr0ng-s3cr3t", secret)
    assert _exp_refs(cluster) == refs  # no experiment, whole or half
    deadline = time.monotonic() + 60
    while _workspaces(cluster) and time.monotonic() < deadline:
        time.sleep(1)
    assert _workspaces(cluster) == []  # nor a workspace with its DVC lock


# --- one model on two hosts: nodes=2 ---------------------------------------------------------------

@pytest.fixture(scope="module")
def node_hosts(cluster):
    """A second worker host in pool bit-cpu (host-c), from here on: the pool has host-a and
    host-c, each taking one flow run at a time."""
    cluster.hosts["host-c"] = cluster.root / "host-c"
    _start_worker(cluster, "host-c", "bit-cpu")
    return cluster


def _node_runs(cluster: Cluster, run_id: str) -> list:
    """The flow runs of the other nodes that run `run_id` started (named after it)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with cluster.client() as client:
        name = client.read_flow_run(run_id).name
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(like_=f"{name}-node-")))


def _worker_of(cluster: Cluster, run_id: str) -> str:
    """The host whose worker submitted flow run `run_id`.

    Two idle workers may both start to submit the same run; the server lets one move it to
    Pending and the other logs that it aborted its submission.
    """
    def took_it(host: str) -> bool:
        log = (cluster.root / f"worker-{host}.log").read_text()
        return (f"submitting flow run '{run_id}'" in log
                and f"Aborted submission of flow run '{run_id}'" not in log)

    (host,) = [host for host in cluster.hosts if took_it(host)]
    return host


def _mlflow_runs(cluster: Cluster, seed: int) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow)
    experiment = client.get_experiment_by_name("bit-pipeline").experiment_id
    return client.search_runs([experiment], f"params.`train.seed` = '{seed}'")


@pytest.fixture(scope="module")
def two_node_run(node_hosts):
    cluster = node_hosts
    run = _run(cluster, "cpu", seed=7, parameters={"nodes": 2})
    return run, _wait_final(cluster, run)


def test_two_nodes_train_one_model_from_one_flow_run(node_hosts, two_node_run):
    from mlflow.tracking import MlflowClient

    cluster, (run, state) = node_hosts, two_node_run
    assert state.is_completed(), state.message
    (node,) = _node_runs(cluster, run)
    assert node.state.is_completed(), node.state.message
    assert {_worker_of(cluster, run), _worker_of(cluster, str(node.id))} == {"host-a", "host-c"}
    (tracked,) = _mlflow_runs(cluster, seed=7)  # one MLflow run, logged by rank 0 alone
    assert tracked.data.params["train.nodes"] == "2"
    assert tracked.data.params["plan.processes"] == "2"
    assert len(MlflowClient(cluster.mlflow).get_metric_history(tracked.info.run_id, "loss")) == 2
    versions = MlflowClient(cluster.mlflow).search_model_versions(
        f"run_id = '{tracked.info.run_id}'")
    assert len(versions) == 1  # one registered version
    assert _outcomes(cluster, run)["finetune"] == "ran"


def test_losing_a_node_ends_the_run_in_one_line_and_a_retry_resumes(node_hosts, two_node_run):
    cluster = node_hosts
    run = _run(cluster, "cpu", seed=8, parameters={"nodes": 2, "overrides": [
        "train.seed=8", *LONG]})
    deadline = time.monotonic() + RUN_TIMEOUT
    while not _in_hosts_tmp(cluster, "models/resume/checkpoint.pt"):
        assert not _state(cluster, run).is_final(), _state(cluster, run).message
        assert time.monotonic() < deadline, "no periodic checkpoint"
        time.sleep(0.2)
    lost = processes_with_env(NODE_RANK_ENV, "1")  # node 1's fine-tune and its processes
    assert lost
    for pid in lost:
        os.kill(pid, signal.SIGKILL)
    state = _wait_final(cluster, run, seconds=300)
    assert state.is_failed(), state.name
    lines = [line for log in _logs(cluster, run) for line in log.message.splitlines()]
    named = [line for line in lines + [state.message or ""] if "lost node 1 (host" in line]
    assert named, "\n".join(lines[-30:])
    # node 1's ranks, or the job's store when the rendezvous put it on node 1's host
    assert ("rank 1)" in named[0] or "with the job's store)" in named[0]) and \
        "resumes from the last checkpoint" in named[0], named[0]

    cluster.prefect("flow-run", "retry", run)
    state = _wait_final(cluster, run)
    assert state.is_completed(), state.message
    lines = [line for log in _logs(cluster, run) for line in log.message.splitlines()]
    assert any("resuming from step" in line for line in lines)
    (tracked,) = _mlflow_runs(cluster, seed=8)  # the retry continued the run
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(cluster.mlflow).get_metric_history(
        tracked.info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, 31))


def test_nodes_without_a_free_worker_end_the_run_in_one_line(node_hosts, two_node_run):
    """Pool bit-gpu has one worker host (host-b): the other node is never started."""
    cluster = node_hosts
    run = _run(cluster, "gpu", seed=9, parameters={"nodes": 2, "overrides": [
        "train.seed=9", "train.join_timeout=20"]})
    state = _wait_final(cluster, run, seconds=600)
    assert state.is_failed(), state.name
    lines = [line for log in _logs(cluster, run) for line in log.message.splitlines()]
    assert any("1 node(s) not started by a worker of pool bit-gpu within 20 s" in line
               for line in lines + [state.message or ""]), "\n".join(lines[-30:])
    (node,) = _node_runs(cluster, run)
    assert node.state.is_final() and not node.state.is_completed()  # cancelled, never run
    assert not _mlflow_runs(cluster, seed=9)
