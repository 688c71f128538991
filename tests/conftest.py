"""Shared test set-up: offline, telemetry off, small thread counts, and the repo root."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows import dag
from flows.overrides import apply_overrides
from tasks import environment
from tests.http_fixtures import http_server  # noqa: F401 (a fixture for every test module)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Tiny training settings: every stage runs in seconds; what is checked is the plumbing.
TINY = ["train.resolution=16", "train.precrop=20", "train.batch=8", "train.schedule=[1, 2]",
        "train.eval_every=1", "evaluate.batch_sizes=[1, 2]", "evaluate.repeats=1",
        "evaluate.warmup=0", "evaluate.compiled=false", "export.parity_batches=[1, 3]",
        "compile.batch_sizes=[1, 4]", "openvino.calibration_images=8"]

environment.apply()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm, in the bench's smoke test


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session", autouse=True)
def _dvc_site_cache_in_pytest_temp(tmp_path_factory):
    """DVC keeps an index and hash database per repository in its site cache (by default
    /var/tmp/dvc/repo/<hash of the path>, up to tens of MB each): the repositories the tests
    make keep theirs under pytest's temporary folder, which goes with them."""
    folder = tmp_path_factory.getbasetemp() / "dvc-site-cache"
    previous = os.environ.get("DVC_SITE_CACHE_DIR")
    os.environ["DVC_SITE_CACHE_DIR"] = str(folder)
    yield
    if previous is None:
        os.environ.pop("DVC_SITE_CACHE_DIR", None)
    else:
        os.environ["DVC_SITE_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _sys_path_kept():
    """Loading a registered model puts its code folder (a copy of bit_core's serving part) first
    on sys.path for the rest of the process: a process a later test spawns would import that copy
    instead of the package (seen when test_distributed followed test_register in one worker)."""
    saved = list(sys.path)
    yield
    sys.path[:] = saved


@pytest.fixture
def tracking_store(tmp_path, monkeypatch) -> str:
    """A new MLflow store on SQLite in tmp_path, no run active. A new store puts its artifacts
    under ./mlruns, so the test runs in tmp_path: nothing lands in the checkout."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


INPUT_STAGES = ("fetch_data", "prepare", "fetch_weights")


@pytest.fixture(scope="session")
def digits_inputs(tmp_path_factory) -> Path:
    """A directory holding params.yaml (the default experiment) and what the stages before
    finetune write there: the embedded digits in data/raw and data/prepared, and
    models/pretrained (no weights: digits train from scratch). Made by running the stages'
    dvc.yaml commands as separate processes, as `dvc repro` does."""
    work = tmp_path_factory.mktemp("digits")
    shutil.copyfile(REPO / "params.yaml", work / "params.yaml")
    env = {**os.environ, "BIT_PARAMS": str(work / "params.yaml")}
    for name in INPUT_STAGES:
        python, *args = dag.command(REPO, name).split()
        assert python == "python"
        subprocess.run([sys.executable, *args], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return work


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_onnx(path: Path) -> Path:
    """A model as the export stage writes it, with its record, that any CPU runs in a moment:
    classes a, b, c at 4 px; its logits are the channel means."""
    import onnx
    from onnx import TensorProto, helper

    from bit_core.record import ModelRecord

    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    record = ModelRecord(model_name="BiT-M-R50x1", classes=["a", "b", "c"], resolution=4,
                         precrop=5)
    helper.set_model_props(model, record.onnx_metadata())
    onnx.save(model, path)
    return path


def make_clone(root: Path, dest: Path, overrides: list[str] = TINY) -> Path:
    """The repository's tracked and unignored files, as a new git repo with one commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=root,
                           check=True, capture_output=True, text=True).stdout.split()
    dest.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    if overrides:
        apply_overrides(dest / "params.yaml", list(overrides))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest


def processes_with_env(key: str, value: str) -> list[int]:
    """Live (not zombie) processes whose environment has key=value."""
    found, needle = [], f"{key}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and \
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def command_lines(key: str, value: str) -> list[str]:
    """The command lines of the live processes whose environment has key=value."""
    return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            for pid in processes_with_env(key, value)]


def all_gone(key: str, value: str, seconds: float = 20) -> bool:
    """Wait up to `seconds` for every process whose environment has key=value to end (a group
    that had SIGTERM: a server passes it on to its workers, which take a moment)."""
    deadline = time.monotonic() + seconds
    while processes_with_env(key, value) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not processes_with_env(key, value)


def stop_group(process: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM the process group we started (its traps clean up), SIGKILL after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_server(command: list[str], ready: str, workdir: Path, name: str,
                   env: dict[str, str] | None = None, grace: float = 20) -> Iterator[None]:
    """Run a server command in its own process group until `ready` (a URL) answers; stop the
    group afterwards. Its output goes to `workdir`/<name>.log, quoted when it fails to start."""
    log_path = workdir / f"{name}.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env or environment.tool_env(),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(ready, timeout=2).close()
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise AssertionError(log_path.read_text()[-3000:]) from None
                    time.sleep(0.5)
            yield
        finally:
            stop_group(process, grace=grace)
    assert process.poll() is not None


@contextmanager
def running_mlflow_server(store: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1 over `store`, with proxied artifacts under
    `workdir` (what workers on other hosts talk to); yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    with running_server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--backend-store-uri", store,
                         "--artifacts-destination", str(workdir / "artifacts")],
                        f"{uri}/health", workdir, f"mlflow-server-{port}"):
        yield uri


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[str]:
    """A fresh `mlflow server` (SQLite store, proxied artifacts) for one test."""
    with running_mlflow_server(f"sqlite:///{tmp_path / 'm.db'}", tmp_path) as uri:
        yield uri


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible endpoint on 127.0.0.1 that checks credentials, with one bucket."""

    url: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        """What a worker sets for DVC's S3 remote (boto reads it)."""
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}


def _s3_user(url: str, bucket: str) -> tuple[str, str]:
    """Create an IAM user allowed everything on S3, its access key, and the bucket: the four
    requests moto serves before it starts checking credentials."""
    import json as _json

    import boto3

    boot = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="boot",
                aws_secret_access_key="boot")
    iam = boto3.client("iam", **boot)
    iam.create_user(UserName="worker")
    key = iam.create_access_key(UserName="worker")["AccessKey"]
    iam.put_user_policy(UserName="worker", PolicyName="s3", PolicyDocument=_json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    boto3.client("s3", **{**boot, "aws_access_key_id": key["AccessKeyId"],
                          "aws_secret_access_key": key["SecretAccessKey"]}
                 ).create_bucket(Bucket=bucket)
    return key["AccessKeyId"], key["SecretAccessKey"]


@contextmanager
def running_s3_server(workdir: Path) -> Iterator[S3Endpoint]:
    """moto's S3 server on a free port of 127.0.0.1, checking credentials after set-up; yields
    the endpoint."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**environment.tool_env(), "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    with running_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                        f"{url}/moto-api/", workdir, f"s3-server-{port}", env, grace=10):
        yield S3Endpoint(url, "bit-dvc", *_s3_user(url, "bit-dvc"))


@pytest.fixture
def s3_server(tmp_path) -> Iterator[S3Endpoint]:
    """A fresh S3-compatible endpoint (moto) with a bucket and a user's credentials."""
    with running_s3_server(tmp_path) as endpoint:
        yield endpoint


# The modules that take minutes, longest first, as a full `make test` measured them on a 2-core
# machine. `make test` hands whole modules to its processes in collection order
# (--no-loadscope-reorder), so these start first and no long one starts last while the other
# process idles. Other modules with slow tests follow, then the rest.
LONGEST_FIRST = ("test_multi_host", "test_prefect_server", "test_nodes", "test_integration",
                 "test_recipes", "test_bench", "test_stages", "test_stop", "test_register",
                 "test_train")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (rank.get(item.module.__name__.rpartition(".")[2], len(rank)),
                                 item.module.__name__ not in slow))
