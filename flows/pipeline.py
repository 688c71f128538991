"""The `bit-finetune` Prefect flow: the DVC stages in order, one Prefect task per stage.

The flow never re-implements a stage. It writes the run's overrides into params.yaml (as
``dvc exp run -S`` does) and runs ``dvc repro --single-item <stage>`` for each stage, so DVC
still decides what is up to date and dvc.lock stays true.

Before any stage runs, a preflight task checks what would otherwise fail late: an MLflow
tracking server named by ``MLFLOW_TRACKING_URI`` that does not answer (the fine-tune stage would
only find out after loading data and building the model), and, for nightly runs, a checkout
where the experiment could not be recorded.

Nightly runs (``nightly=True``, what the gpu/npu schedules in prefect.yaml pass):

1. Refresh the inputs whose source can change without anything DVC tracks changing: the fetch
   stages are re-run with ``dvc repro --force`` only for ``data.source: imagefolder`` (a folder
   people add images to) and ``weights.source: file`` (a local file that can be replaced).
   Every other source is pinned by what DVC already tracks (digits ship inside the installed
   package, CIFAR and ImageNet are fixed archives, official weights are named and checksummed
   in params.yaml), so forcing them would re-extract gigabytes only to get the same hash.
   ``dvc update`` does not apply: it refreshes ``dvc import`` stages, and this pipeline has none.
   A forced fetch that produced the same files leaves data/raw's hash, and so everything
   downstream, unchanged.
2. Ask DVC what changed (``dvc status``). Nothing: finish at once, saying so in a log line and
   in the ``bit-nightly`` artifact.
3. Otherwise run the pipeline, then record the result with ``dvc exp save -n nightly-<UTC time>``.
   An experiment ref (``refs/exps/...``) holds params.yaml, dvc.lock and the metrics files on
   top of the checkout's commit, while the model files go to the DVC cache: ``dvc exp list`` /
   ``dvc exp show`` find it, ``dvc exp apply <name>`` restores it (outputs from the cache) and
   ``dvc exp push <remote> <name>`` shares it. Unlike committing dvc.lock to a branch, it never
   moves HEAD, switches branches or commits in a worker's checkout, and it needs no git
   identity. The MLflow run is tagged with the experiment's name and commit, and the commit
   message names the MLflow run, so either leads to the other.

Stopping: each stage runs in its own process group. When the flow is cancelled or its process
is told to stop (SIGTERM, Ctrl-C), the stage gets SIGTERM and up to ``BIT_STOP_GRACE`` seconds
(default 60): the fine-tune stage then writes a checkpoint under its ``persist`` resume folder,
which the next run continues from. The flow never forces or cleans the fine-tune stage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from bit_core.download import basic_auth
from bit_core.redact import redact, split_credentials
from flows import dag
from flows.overrides import apply_overrides
from tasks import environment

REPO = Path(__file__).resolve().parents[1]
IO_STAGES = {"fetch_data", "fetch_weights"}  # network or disk reads worth retrying
TRAIN_STAGE = "finetune"
# The fine-tune task's tag, per device: a tag concurrency limit of 1 on it
# (`prefect concurrency-limit create bit-gpu-training 1`) allows one training per pool at a time.
POOLS = {"cpu": "bit-cpu", "cuda": "bit-gpu", "npu": "bit-npu"}
HEALTH_TIMEOUT = 5.0


class PreflightError(RuntimeError):
    """Something the flow needs is missing; raised before any stage runs."""


def training_tag(device: str) -> str:
    """The tag of the fine-tune task: one name per accelerator pool (bit-gpu-training, ...)."""
    return f"{POOLS.get(device, f'bit-{device}')}-training"


def _tracking_request(url: str) -> urllib.request.Request:
    """A GET of `url` on the MLflow server with the credentials MLflow itself sends.

    In MLflow's order: the URL's ``user:password@`` (removed from the request URL, which urllib
    would otherwise take for part of the host), else ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``, else ``MLFLOW_TRACKING_TOKEN`` as a bearer token.
    """
    bare, userinfo = split_credentials(url)
    request = urllib.request.Request(bare)
    env = os.environ
    if userinfo is not None:
        header = basic_auth(userinfo[0], userinfo[1] or "")
    elif env.get("MLFLOW_TRACKING_USERNAME") and env.get("MLFLOW_TRACKING_PASSWORD"):
        header = basic_auth(env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    elif env.get("MLFLOW_TRACKING_TOKEN"):
        header = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
    else:
        header = None
    if header:  # unredirected: a redirect to another host never sees it
        request.add_unredirected_header("Authorization", header)
    return request


def check_tracking_server(uri: str | None, timeout: float = HEALTH_TIMEOUT) -> bool:
    """When `uri` is an http(s) MLflow server, check that ``<uri>/health`` answers OK.

    The request carries the credentials of :func:`_tracking_request`. Returns False for other
    stores (nothing to check), True when the server answered. Raises PreflightError with one
    line naming the URI (redacted) and the fix otherwise.
    """
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return False
    url = uri.rstrip("/") + "/health"
    fix = ("start it (mlflow server --host 127.0.0.1 --port <port> --backend-store-uri "
           "sqlite:///mlflow.db), set MLFLOW_TRACKING_URI to a running one, or unset it to "
           "track in sqlite:///mlflow.db")
    try:
        with urllib.request.urlopen(_tracking_request(url), timeout=timeout) as response:
            if response.status == 200:
                return True
            problem = f"GET {url} answered HTTP {response.status}"
    except urllib.error.HTTPError as err:
        problem = f"GET {url} answered HTTP {err.code}"
        if err.code in (401, 403):
            fix = ("check the credentials: user:password in MLFLOW_TRACKING_URI, "
                   "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                   "MLFLOW_TRACKING_TOKEN")
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        problem = f"GET {url} failed: {reason or type(err).__name__}"
    raise PreflightError(redact(f"MLflow tracking server {uri} is unusable ({problem}); {fix}"))


def check_git_checkout(repo: str | Path) -> str:
    """The checkout's HEAD commit; PreflightError when `dvc exp save` could not record there."""
    result = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise PreflightError(
            f"nightly runs record each retraining with `dvc exp save`, which needs {repo} to be "
            "a git repository with a commit: git init && git add -A && git commit -m baseline")
    return result.stdout.strip()


@task(name="preflight")
def preflight(repo: str, nightly: bool) -> dict:
    """Fail in seconds, before any stage, when the tracking server or the checkout is unusable."""
    logger = get_run_logger()
    uri = environment.tracking_uri(repo)
    if check_tracking_server(uri):
        logger.info("MLflow tracking server %s is up", redact(uri))
    head = check_git_checkout(repo) if nightly else None
    return {"tracking_uri": redact(uri), "commit": head}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the stage's process group (the trainer checkpoints), then SIGKILL what is left.

    Signals that arrive meanwhile (Prefect repeats SIGTERM when cancelling) do not cut the
    wait short: the stage's checkpoint is what a re-run resumes from.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if process.poll() is not None and not _group_alive(process.pid):
                    return
                time.sleep(0.5)
            except BaseException:  # noqa: BLE001 - a repeated signal: keep waiting
                continue
    process.poll()


def _follow(path: Path, process: subprocess.Popen):
    """Yield the lines written to `path` while `process` runs, then the rest."""
    with path.open(errors="replace") as reader:
        pending = ""
        while True:
            done = process.poll() is not None
            chunk = reader.read()
            pending += chunk
            *lines, pending = pending.split("\n")
            yield from lines
            if done and not chunk:
                break
            if not chunk:
                time.sleep(0.2)
        if pending:
            yield pending


def dvc(repo: str, *args: str, log: bool = True) -> tuple[int, str]:
    """Run `dvc <args>` in `repo` in its own process group; stream its output to the run's log.

    The output goes through a file, not a pipe, so that a stage outlives the flow's process
    (killed after a cancel) long enough to write its checkpoint instead of dying of a broken
    pipe. The stage's ``python`` is this interpreter's (its directory goes first on PATH), so a
    worker whose PATH lacks the venv still runs the stages with the packages it has.
    """
    logger = get_run_logger()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bit-dvc-") as tmp:
        output = Path(tmp) / "output.log"
        with output.open("w") as writer:
            process = subprocess.Popen([environment.tool("dvc"), *args], cwd=repo,
                                       env=environment.tool_env(),
                                       stdout=writer, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            for line in _follow(output, process):
                line = redact(line.rstrip())  # what is logged and what errors quote
                lines.append(line)
                if log and line:
                    logger.info(line)
            process.wait()
        except BaseException:  # cancelled, SIGTERM (Prefect's TerminationSignal), Ctrl-C
            _stop(process, float(os.environ.get("BIT_STOP_GRACE", "60")))
            raise
    return process.returncode, "\n".join(lines)


def stage_status(repo: str, stage: str) -> dict:
    """What DVC says changed for `stage` alone (``dvc status --json <stage>``); {} when it is up
    to date and ``dvc repro`` would skip it."""
    code, output = dvc(repo, "status", "--json", stage, log=False)
    if code != 0:
        raise RuntimeError(f"dvc status {stage} failed: {output[-300:]}")
    return _json_line(output) or {}


def _run_stage(stage: str, repo: str, force: bool = False) -> dict:
    """Run one DVC stage (skipped by DVC when up to date); return whether it ran."""
    changed = force or bool(stage_status(repo, stage))
    code, output = dvc(repo, "repro", "--single-item", *(["--force"] if force else []), stage)
    if code != 0:
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        raise RuntimeError(f"stage {stage} failed: {(errors or [output[-300:]])[-1]}")
    return {"stage": stage, "ran": changed}


@task(name="run-stage", task_run_name="{stage}")
def run_stage(stage: str, repo: str) -> dict:
    return _run_stage(stage, repo)


@task(name="run-io-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10)
def run_io_stage(stage: str, repo: str, force: bool = False) -> dict:
    return _run_stage(stage, repo, force)


@task(name="apply-overrides")
def apply_params(repo: str, overrides: list[str]) -> dict:
    """Write overrides into params.yaml and return the validated parameters."""
    return apply_overrides(Path(repo) / "params.yaml", overrides).model_dump()


def _json_line(output: str) -> dict | None:
    """The JSON object a `dvc ... --json` command printed (warnings may share the output)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def changing_sources(params: dict) -> list[str]:
    """The fetch stages whose source can change while everything DVC tracks stays the same."""
    refresh = []
    if params["data"]["source"] == "imagefolder":
        refresh.append("fetch_data")
    if params["weights"]["source"] == "file":
        refresh.append("fetch_weights")
    return refresh


@task(name="dvc-status")
def pipeline_status(repo: str) -> dict:
    """`dvc status`: {stage: what changed}; empty when every stage is up to date."""
    code, output = dvc(repo, "status", "--json", log=False)
    if code != 0:
        raise RuntimeError(f"dvc status failed: {output[-300:]}")
    return _json_line(output) or {}


def _untracked_results(repo: str) -> list[str]:
    """Untracked files an experiment should hold: dvc.lock, DVC's .gitignores, uncached outputs."""
    declared = {"dvc.lock", *dag.outputs(repo, cached=False)}
    listed = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed
            if name in declared or Path(name).name == ".gitignore"
            or any(name.startswith(f"{path}/") for path in declared)]


@task(name="record-experiment")
def record_experiment(repo: str, run_id: str | None) -> dict:
    """`dvc exp save -n nightly-<UTC time>`; tag the MLflow run with the experiment."""
    logger = get_run_logger()
    name = "nightly-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    include = [arg for path in _untracked_results(repo) for arg in ("-I", path)]
    code, output = dvc(repo, "exp", "save", "--json", "-n", name, "-m",
                       f"{name}: MLflow run {run_id}", *include, log=False)
    if code != 0:
        raise RuntimeError(f"dvc exp save failed: {output[-300:]}")
    rev = (_json_line(output) or {}).get("ref")
    logger.info("recorded experiment %s (%s): dvc exp apply %s reproduces it", name, rev, name)
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(environment.tracking_uri(repo))
            client.set_tag(run_id, "dvc.experiment", name)
            client.set_tag(run_id, "dvc.experiment_rev", rev or "")
        except Exception as err:  # the experiment is recorded; the tag is a convenience
            logger.warning("could not tag MLflow run %s with the experiment: %s", run_id,
                           redact(str(err)))
    return {"name": name, "rev": rev}


def mlflow_link(uri: str, run_id: str | None) -> str:
    """Markdown pointing at the run: a UI link for an http server, else the id and the store.

    The link and the text never hold credentials (the browser asks for them).
    """
    if not run_id:
        return "MLflow run: none recorded"
    if uri.lower().startswith(("http://", "https://")):
        base = uri.rstrip("/")
        shown = split_credentials(base)[0]
        try:  # the REST API, with a short timeout (MlflowClient retries for minutes)
            query = _tracking_request(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}")
            with urllib.request.urlopen(query, timeout=HEALTH_TIMEOUT) as response:
                experiment = json.load(response)["run"]["info"]["experiment_id"]
        except (OSError, ValueError, KeyError):  # gone since training: still name the run
            return f"MLflow run: `{run_id}` on {shown}"
        return f"MLflow run: [{run_id}]({shown}/#/experiments/{experiment}/runs/{run_id})"
    return redact(f"MLflow run: `{run_id}` in `{uri}` (browse it with `bit ui`)")


def _summary(repo: Path) -> tuple[str, str | None]:
    table = repo / dag.EVAL_TABLE
    run_file = repo / dag.RUN_RECORD
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    text = table.read_text() if table.is_file() else "(no evaluation table)"
    train = repo / dag.TRAIN_METRICS
    if train.is_file():
        metrics = json.loads(train.read_text())
        text += "\n\nTraining: " + ", ".join(f"{k} {v}" for k, v in metrics.items())
    return text, run_id


@flow(name="bit-finetune", log_prints=True)
def bit_finetune(overrides: list[str] | None = None, device: str = "auto",
                 processes: int | None = None, repo: str | None = None,
                 nightly: bool = False) -> dict:
    """Fine-tune, export, compile and evaluate BiT through the DVC pipeline.

    Args:
        overrides: ``section.key=value`` changes to params.yaml (like ``dvc exp run -S``).
        device: ``auto | cpu | cuda | npu`` for training and evaluation.
        processes: data-parallel training processes per host (e.g. 8 for 8 NPUs).
        repo: the checkout to run in (default: the one this flow was loaded from).
        nightly: refresh changeable inputs, retrain only when DVC sees a change, and record
            the retraining as a DVC experiment (``dvc exp save``); see the module docstring.
    """
    environment.apply()
    logger = get_run_logger()
    repo = str(Path(repo or os.environ.get("BIT_PIPELINE_REPO") or REPO).resolve())
    checked = preflight(repo, nightly)
    changes = list(overrides or [])
    if device != "auto":
        changes += [f"train.device={device}", f"evaluate.device={device}"]
    if processes:
        changes.append(f"train.processes={processes}")
    params = apply_params(repo, changes)
    results = []
    if nightly:
        for stage in changing_sources(params):
            results.append(run_io_stage.with_options(task_run_name=f"{stage} (refresh)")(
                stage, repo, force=True))
        changed = pipeline_status(repo)
        if not changed:
            when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            message = "up to date: no input, parameter or code changed since the last training"
            logger.info(message)
            create_markdown_artifact(key="bit-nightly", description="nightly retraining", markdown=(
                f"## BiT nightly {when}\n\n{message} (commit `{checked['commit']}`); "
                "nothing retrained.\n"))
            return {"stages": results, "up_to_date": True, "experiment": None,
                    "mlflow_run_id": _summary(Path(repo))[1]}
        logger.info("changed since the last training: %s", ", ".join(changed))
    train_tag = training_tag(params["train"]["device"])
    for stage in dag.stages(repo):
        if stage in IO_STAGES:
            results.append(run_io_stage(stage, repo))
        elif stage == TRAIN_STAGE:
            results.append(run_stage.with_options(tags={train_tag})(stage, repo))
        else:
            results.append(run_stage(stage, repo))
    table, run_id = _summary(Path(repo))
    link = mlflow_link(environment.tracking_uri(repo), run_id)
    create_markdown_artifact(key="bit-evaluation", markdown=(
        f"## BiT evaluation\n\n{table}\n\n{link}\n"), description="top-1/FPS")
    experiment = None
    if nightly:
        experiment = record_experiment(repo, run_id)
        create_markdown_artifact(key="bit-nightly", description="nightly retraining", markdown=(
            f"## BiT nightly: retrained\n\nRecorded as DVC experiment `{experiment['name']}` "
            f"(`{experiment['rev']}`): `dvc exp show`, `dvc exp apply {experiment['name']}`."
            f"\n\n{link}\n"))
    return {"stages": results, "mlflow_run_id": run_id, "up_to_date": False,
            "experiment": experiment}


if __name__ == "__main__":
    bit_finetune()
