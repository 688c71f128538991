"""The `bit-finetune` Prefect flow: the DVC stages in order, one Prefect task per stage.

The flow never re-implements a stage. It writes the run's overrides into params.yaml (as
``dvc exp run -S`` does) and runs ``dvc repro --single-item <stage>`` for each stage, so DVC
still decides what is up to date and dvc.lock stays true.

Before any stage runs, a preflight task checks what would otherwise fail late: an MLflow
tracking server named by ``MLFLOW_TRACKING_URI`` that does not answer (the fine-tune stage would
only find out after loading data and building the model), and, for nightly runs, a checkout
where the experiment could not be recorded.

Shared runs (``shared=True``, what the deployments of prefect.yaml pass) run in a workspace of
their own, a clone made by the deployment's pull steps, and share their work with the runs of
every host through DVC (flows/workspace.py): the workspace uses the host's DVC cache and the DVC
remote; a run made before from the same commit with the same parameters (a DVC experiment on the
git remote) is restored whole; before each stage the remote's run cache is fetched, so DVC
restores a stage computed anywhere with the same inputs (``dvc repro --pull``); after each stage
its run and outputs are pushed; at the end the run is saved as a DVC experiment and pushed, data
first. MLflow must then be a server, since the workspace goes when the run ends.

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
3. Otherwise run the pipeline, then record the result with
   ``dvc exp save -n nightly-<UTC time>-<flow run>`` (pushed when shared).
   An experiment ref (``refs/exps/...``) holds params.yaml, dvc.lock and the metrics files on
   top of the checkout's commit, while the model files go to the DVC cache: ``dvc exp list`` /
   ``dvc exp show`` find it, ``dvc exp apply <name>`` restores it (outputs from the cache) and
   ``dvc exp push <remote> <name>`` shares it. Unlike committing dvc.lock to a branch, it never
   moves HEAD, switches branches or commits in a worker's checkout, and it needs no git
   identity. The MLflow run is tagged with the experiment's name and commit, and the commit
   message names the MLflow run, so either leads to the other.

Stopping: each stage runs in its own process group. When the flow is cancelled or its process
is told to stop (SIGTERM, Ctrl-C), the stage gets SIGTERM and up to ``BIT_STOP_GRACE`` seconds
(default 25, see STOP_GRACE): the fine-tune stage then writes a checkpoint to its resume folder
(``--resume-dir``, which DVC leaves alone), and the next run continues from it. The flow never
forces or cleans the fine-tune stage.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bit_core.download import basic_auth
from bit_core.redact import redact, split_credentials
from flows import dag, workspace
from flows import nodes as node_runs
from flows.overrides import apply_overrides
from tasks import environment

REPO = Path(__file__).resolve().parents[1]
IO_STAGES = {"fetch_data", "fetch_weights"}  # network or disk reads worth retrying
TRAIN_STAGE = "finetune"
# The fine-tune task's tag, per device: a tag concurrency limit of 1 on it
# (`prefect concurrency-limit create bit-gpu-training 1`) allows one training per pool at a time.
POOLS = {"cpu": "bit-cpu", "cuda": "bit-gpu", "npu": "bit-npu"}
HEALTH_TIMEOUT = 5.0
# How long a stopped stage may take to end (the trainer: finish its step, write its checkpoint)
# before it is killed (BIT_STOP_GRACE overrides it). Under 30 s: Prefect's process worker kills a
# cancelled flow run's process 30 s after its SIGTERM, and the flow still has to hand the
# checkpoint to the host's cache. torchrun's agent gets 5 s less to stop its workers
# (TORCH_ELASTIC_SHUTDOWN_TIMEOUT), so that it is still alive to kill those that overrun.
STOP_GRACE = 25.0
GRACE_ENV = "BIT_STOP_GRACE"


class PreflightError(RuntimeError):
    """Something the flow needs is missing; raised before any stage runs."""


class StageError(RuntimeError):
    """A stage's command failed; the message is the stage's own error line when it gave one."""


def stop_grace() -> float:
    """Seconds a stopped stage may take to end: BIT_STOP_GRACE, else STOP_GRACE."""
    value = os.environ.get(GRACE_ENV) or str(STOP_GRACE)
    try:
        grace = float(value)
    except ValueError:
        grace = -1.0
    if not 0 < grace < math.inf:
        raise PreflightError(f"{GRACE_ENV}={value} is not a number of seconds above 0: unset it "
                             f"(default {STOP_GRACE:g}) or set e.g. {GRACE_ENV}=25")
    return grace


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a stage's command: the tools' settings, `extra`, and torchrun's
    shutdown timeout (unless already set) 5 s under the flow's grace (see STOP_GRACE)."""
    env = {**environment.tool_env(), **(extra or {})}
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(max(1, int(stop_grace()) - 5)))
    return env


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
    if not environment.is_server(uri):
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


def check_shared_run(repo: str | Path, tracking_uri: str) -> None:
    """PreflightError unless a shared run can leave its results with the servers: MLflow must
    be a server (the default store is inside the workspace, which is removed at the end), and
    the workspace must be the clean clone the pull steps made."""
    if not environment.is_server(tracking_uri):
        raise PreflightError(redact(
            f"a shared run logs to an MLflow server, not to {tracking_uri}, which would go with "
            "its workspace: set MLFLOW_TRACKING_URI=http://<host>:<port> on the worker (mlflow "
            "server --artifacts-destination ... serves the artifacts too)"))
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                             text=True).stdout.split("\n")[0]
    if changed:
        raise PreflightError(
            f"workspace {repo} is not a fresh clone ({changed.strip()} changed): give each run "
            "its own workspace (a kept working_dir of an earlier run cannot be reused)")


@task(name="preflight")
def preflight(repo: str, nightly: bool, shared: bool = False) -> dict:
    """Fail in seconds, before any stage, when the tracking server or the checkout is unusable."""
    logger = get_run_logger()
    stop_grace()  # a bad BIT_STOP_GRACE would only show when the run is stopped
    uri = environment.tracking_uri(repo)
    if shared:
        check_shared_run(repo, uri)
    if check_tracking_server(uri):
        logger.info("MLflow tracking server %s is up", redact(uri))
    head = check_git_checkout(repo) if nightly or shared else None
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


def dvc(repo: str, *args: str, log: bool = True, env: dict[str, str] | None = None
        ) -> tuple[int, str]:
    """Run `dvc <args>` in `repo` (see :func:`command`); its exit code and output."""
    return command(repo, [environment.tool("dvc"), *args], log=log, env=env)


def command(repo: str, argv: list[str], log: bool = True, env: dict[str, str] | None = None
            ) -> tuple[int, str]:
    """Run `argv` in `repo` in its own process group, with `env` added to the tools'
    environment; stream its output to the run's log. Its exit code and output (redacted).

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
            process = subprocess.Popen(argv, cwd=repo, env=stage_env(env),
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
            _stop(process, stop_grace())
            raise
    return process.returncode, "\n".join(lines)


def stage_status(repo: str, stage: str) -> dict:
    """What DVC says changed for `stage` alone (``dvc status <stage>``, through DVC's API); {}
    when it is up to date and ``dvc repro`` would skip it."""
    return workspace.status(repo, stage)


def _restorable(repo: str, stage: str, sharing: workspace.Sharing | None) -> workspace.Restore:
    """Whether ``dvc repro`` will restore `stage`'s outputs instead of running it: a run with its
    current inputs is recorded (dvc.lock, or the run cache, the remote's fetched first when
    shared) and its files are at hand (fetched from the remote when shared)."""
    if sharing:
        workspace.fetch_run_cache(repo, sharing)
    return workspace.restorable(repo, stage, pull=bool(sharing and sharing.remote))


def _run_stage(stage: str, repo: str, force: bool = False, shared: bool = False,
               env: dict[str, str] | None = None,
               known: workspace.Restore | None = None) -> dict:
    """Bring one DVC stage up to date; return whether its command ran or DVC restored its
    outputs (a run with the same inputs in the run cache, on this host or, when shared, on the
    DVC remote). A shared run pushes the stage's outputs at once, for the other hosts, and keeps
    a stopped fine-tune's checkpoint on the host for the next run (its workspace goes).

    `known`: what :func:`_restorable` answered for the changed stage just before, not asked
    again (it fetches the remote's run cache and walks the stage's dependencies)."""
    sharing = workspace.Sharing.from_env() if shared else None
    changed = force or known is not None or bool(stage_status(repo, stage))
    if force or not changed:
        restore = workspace.Restore(False)
    else:
        restore = known if known is not None else _restorable(repo, stage, sharing)
    pull = ["--pull"] if sharing and sharing.remote else []
    kept = dag.resume_folders(repo, stage) if sharing and changed and not restore else []
    with workspace.checkpoints_kept(repo, sharing, stage, kept, restore.key) if kept else \
            nullcontext():
        code, output = dvc(repo, "repro", "--single-item", *(["--force"] if force else []),
                           *pull, stage, env=env)
        if code != 0:  # the stage's own one-line error (stage_main's), else DVC's
            lines = output.splitlines()
            own = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
            errors = own or [line for line in lines if "error" in line.lower()]
            raise StageError(f"stage {stage} failed: {(errors or [output[-300:]])[-1]}")
    if sharing and changed:
        workspace.share_run(repo, stage, sharing)
    return {"stage": stage, "ran": changed and not restore, "restored": restore.restored}


@task(name="run-stage", task_run_name="{stage}")
def run_stage(stage: str, repo: str, shared: bool = False, env: dict[str, str] | None = None,
              known: workspace.Restore | None = None) -> dict:
    return _run_stage(stage, repo, shared=shared, env=env, known=known)


@task(name="run-io-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10)
def run_io_stage(stage: str, repo: str, force: bool = False, shared: bool = False) -> dict:
    return _run_stage(stage, repo, force, shared)


@task(name="apply-overrides")
def apply_params(repo: str, overrides: list[str]) -> dict:
    """Write overrides into params.yaml and return the validated parameters."""
    return apply_overrides(Path(repo) / "params.yaml", overrides).model_dump()


def refresh_sources(repo: str, params: dict, shared: bool = False) -> list[dict]:
    """Read the user's folder or file again where this host has it (DVC cannot see into them,
    :func:`flows.dag.changing_sources`); a stage's result only when what it wrote changed, so
    a run with the same images is still up to date."""
    results = []
    for stage in dag.changing_sources(params, repo):
        before = dag.locked_outputs(repo, stage)
        refreshed = run_io_stage.with_options(task_run_name=f"{stage} (refresh)")(
            stage, repo, force=True, shared=shared)
        if dag.locked_outputs(repo, stage) != before:
            results.append(refreshed)
    return results


@task(name="dvc-status")
def pipeline_status(repo: str) -> dict:
    """`dvc status`: {stage: what changed}; empty when every stage is up to date."""
    return workspace.status(repo)


@task(name="prepare-workspace")
def prepare_workspace(repo: str) -> dict:
    """A shared run's workspace: its git history complete, the host's DVC cache and the DVC
    remote configured, the remote checked (and its run cache fetched). Raises WorkspaceError
    with one line."""
    logger = get_run_logger()
    sharing = workspace.Sharing.from_env()
    workspace.prepare(repo, sharing)
    logger.info("workspace %s at commit %s; DVC cache %s; DVC remote %s", repo,
                workspace.head(repo), sharing.cache, sharing.remote_shown)
    if not sharing.remote:
        logger.warning("%s is not set: data and models stay in this host's DVC cache",
                       workspace.REMOTE_ENV)
    return {"cache": str(sharing.cache), "remote": sharing.remote_shown}


@task(name="restore-experiment")
def restore_experiment(repo: str) -> str | None:
    """Restore the newest experiment on the git remote made from this commit with these
    parameters (by any host), so that DVC finds its stages up to date. Returns its name."""
    name = workspace.matching_experiment(repo)
    if not name:
        return None
    if not workspace.restore_experiment(repo, name, workspace.Sharing.from_env()):
        get_run_logger().warning(
            "experiment %s (same commit and parameters) has outputs that are neither in this "
            "host's DVC cache nor on the DVC remote (a run without %s made it): the stages "
            "restore them from the run cache or run again", name, workspace.REMOTE_ENV)
        return None
    get_run_logger().info("restored experiment %s: same commit and parameters", name)
    return name


def experiment_name(nightly: bool) -> str:
    """nightly-<UTC time>-<flow run> or run-<UTC time>-<flow run>: unique across hosts."""
    from prefect.runtime import flow_run

    when = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    suffix = f"-{str(flow_run.id)[:8]}" if flow_run.id else ""
    return f"{'nightly' if nightly else 'run'}-{when}{suffix}"


@task(name="record-experiment")
def record_experiment(repo: str, run_id: str | None, nightly: bool = True,
                      shared: bool = False, logged: bool = True) -> dict:
    """`dvc exp save` (a shared run then pushes its data to the DVC remote and the experiment
    to the git remote); tag the MLflow run with the experiment, unless this flow run logged
    nothing to it (`logged` False: no stage that logs to MLflow ran) and it is tagged already."""
    logger = get_run_logger()
    name = experiment_name(nightly)
    rev = workspace.save_experiment(repo, name, f"{name}: MLflow run {run_id}")
    if shared:
        workspace.push_experiment(repo, workspace.Sharing.from_env(), name)
        logger.info("pushed experiment %s (%s) to git remote %s: dvc exp pull %s %s && "
                    "dvc exp apply %s", name, rev, workspace.GIT_REMOTE, workspace.GIT_REMOTE,
                    name, name)
    else:
        logger.info("recorded experiment %s (%s): dvc exp apply %s reproduces it", name, rev,
                    name)
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(environment.tracking_uri(repo))
            earlier = client.get_run(run_id).data.tags.get("dvc.experiment")
            if earlier and not logged:  # restored whole: it stays with the experiment it made
                logger.info("MLflow run %s stays tagged with experiment %s: every stage was "
                            "restored, and its results are that experiment's", run_id, earlier)
            else:
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
    if environment.is_server(uri):
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


def run_changes(overrides: list[str] | None, device: str, processes: int | None,
             nodes: int | None = None) -> list[str]:
    """The run's overrides, with the device, process and node counts as params.yaml values."""
    changes = list(overrides or [])
    if device != "auto":
        changes += [f"train.device={device}", f"evaluate.device={device}"]
    if processes:
        changes.append(f"train.processes={processes}")
    if nodes:
        changes.append(f"train.nodes={nodes}")
    return changes


def _run_pipeline(repo: str, params: dict, shared: bool,
                  plan: node_runs.NodePlan | None = None) -> list[dict]:
    """Every stage of dvc.yaml in order, each a task; the fine-tune carries its pool's tag, and
    with a node plan trains together with the other nodes it starts (flows/nodes.py)."""
    train_tag = training_tag(params["train"]["device"])
    results = []
    for stage in dag.stages(repo):
        if stage in IO_STAGES:
            results.append(run_io_stage(stage, repo, shared=shared))
        elif stage == TRAIN_STAGE:
            train = run_stage.with_options(tags={train_tag})
            if plan is None or not stage_status(repo, stage):
                results.append(train(stage, repo, shared=shared))  # no other node needed
                continue
            known = _restorable(repo, stage, workspace.Sharing.from_env() if shared else None)
            if known:
                results.append(train(stage, repo, shared=shared, known=known))
                continue
            with node_runs.other_nodes(params, plan) as env:
                results.append(train(stage, repo, shared=shared, env=env, known=known))
        else:
            results.append(run_stage(stage, repo, shared=shared))
    return results


def _stage_table(results: list[dict]) -> None:
    """The bit-stages artifact: what became of each stage (ran, restored by DVC, up to date)."""
    rows = [{"stage": r["stage"], "outcome": "ran" if r["ran"] else
             "restored" if r["restored"] else "up to date"} for r in results]
    create_table_artifact(key="bit-stages", table=rows or [{"stage": "-", "outcome": "none"}],
                          description="ran: the stage's command ran; restored: DVC restored its "
                          "outputs from a run with the same inputs (run cache, host cache, remote)")


def _up_to_date(repo: str, commit: str | None, restored: str | None, results: list) -> dict:
    """A nightly run with nothing to do: say so in the log and the bit-nightly artifact."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    message = "up to date: no input, parameter or code changed since the last training"
    if restored:
        message += (f"; its results are experiment {restored}, restored from the remotes "
                    "(trained by an earlier run, on this host or another)")
    get_run_logger().info(message)
    _stage_table(results)
    create_markdown_artifact(key="bit-nightly", description="nightly retraining", markdown=(
        f"## BiT nightly {when}\n\n{message} (commit `{commit}`); nothing retrained.\n"))
    return {"stages": results, "up_to_date": True, "experiment": None, "restored": restored,
            "mlflow_run_id": _summary(Path(repo))[1], "workspace": repo, "commit": commit}


def _provenance(experiment: dict | None, restored: str | None, shared: bool) -> str:
    """Where the results are kept, for the artifacts: the DVC experiment and how to get it."""
    if experiment and shared:
        name, origin = experiment["name"], workspace.GIT_REMOTE
        return (f"DVC experiment `{name}` (`{experiment['rev']}`), pushed to git remote "
                f"{origin} and the DVC remote: `dvc exp pull {origin} {name}`, "
                f"`dvc exp apply {name}`.")
    if experiment:
        return (f"Recorded as DVC experiment `{experiment['name']}` (`{experiment['rev']}`): "
                f"`dvc exp show`, `dvc exp apply {experiment['name']}`.")
    if restored:
        return (f"Restored DVC experiment `{restored}` (same commit and parameters); no stage "
                "had to run.")
    return ""


def _publish(repo: str, results: list[dict], commit: str | None, restored: str | None,
             nightly: bool, shared: bool) -> dict:
    """Record the run as a DVC experiment when it made something new (a nightly run always,
    pushed when shared), then publish the bit-evaluation (and bit-nightly) artifacts."""
    table, run_id = _summary(Path(repo))
    link = mlflow_link(environment.tracking_uri(repo), run_id)
    worked = any(r["ran"] or r["restored"] for r in results)
    experiment = None
    if nightly or (shared and (worked or not restored)):
        tracked = dag.tracked_stages(repo)
        experiment = record_experiment(repo, run_id, nightly=nightly, shared=shared,
                                       logged=any(r["ran"] and r["stage"] in tracked
                                                  for r in results))
    where = _provenance(experiment, restored, shared)
    _stage_table(results)
    create_markdown_artifact(key="bit-evaluation", description="top-1/FPS", markdown=(
        f"## BiT evaluation\n\n{table}\n\n{link}\n\n{where}\n"))
    if nightly:
        ran = [r["stage"] for r in results if r["ran"]]
        outcome = "retrained" if TRAIN_STAGE in ran else (
            f"model not retrained (its inputs did not change); re-ran {', '.join(ran)}" if ran
            else "nothing retrained: every stage was restored from a run with the same inputs "
                 "(DVC's run cache)")
        create_markdown_artifact(key="bit-nightly", description="nightly retraining", markdown=(
            f"## BiT nightly: {outcome}\n\n{where}\n\n{link}\n"))
    return {"stages": results, "mlflow_run_id": run_id, "up_to_date": not worked,
            "experiment": experiment, "restored": restored, "workspace": repo,
            "commit": commit}


@flow(name="bit-finetune", log_prints=True)
def bit_finetune(overrides: list[str] | None = None, device: str = "auto",
                 processes: int | None = None, repo: str | None = None,
                 nightly: bool = False, shared: bool = False, nodes: int | None = None) -> dict:
    """Fine-tune, export, compile and evaluate BiT through the DVC pipeline.

    Args:
        overrides: ``section.key=value`` changes to params.yaml (like ``dvc exp run -S``).
        device: ``auto | cpu | cuda | npu`` for training and evaluation.
        processes: data-parallel training processes per host (e.g. 8 for 8 NPUs).
        repo: the checkout to run in (default: the one this flow was loaded from).
        nightly: refresh changeable inputs, retrain only when DVC sees a change, and record
            the retraining as a DVC experiment (``dvc exp save``); see the module docstring.
        shared: the run is one of many, on any host, in a workspace of its own (what the
            deployments of prefect.yaml pass): it uses the host's DVC cache and the DVC remote
            (``BIT_DVC_CACHE``, ``BIT_DVC_REMOTE``), restores what an earlier run computed, and
            is pushed as a DVC experiment; see flows/workspace.py.
        nodes: hosts to fine-tune on (``train.nodes``); with 2 or more, this shared run starts
            the others as flow runs of ``bit-node/<its deployment>``; see flows/nodes.py.
    """
    environment.apply()
    repo = str(Path(repo or os.environ.get("BIT_PIPELINE_REPO") or REPO).resolve())
    if nodes and nodes > 1 and not shared:
        raise PreflightError(f"nodes={nodes} runs on several hosts, each in a workspace of its "
                             "own: start it from a deployment of prefect.yaml (shared runs)")
    commit = preflight(repo, nightly, shared)["commit"]
    changes = run_changes(overrides, device, processes, nodes)
    plan = node_runs.plan_nodes(changes, commit) if nodes and nodes > 1 else None
    if shared:
        prepare_workspace(repo)
    params = apply_params(repo, changes)
    restored = restore_experiment(repo) if shared else None
    results = refresh_sources(repo, params, shared)
    if nightly:
        changed = pipeline_status(repo)
        if not changed:
            return _up_to_date(repo, commit, restored, results)
        get_run_logger().info("changed since the last training: %s", ", ".join(changed))
    results += _run_pipeline(repo, params, shared, plan)
    return _publish(repo, results, commit, restored, nightly, shared)


if __name__ == "__main__":
    bit_finetune()
