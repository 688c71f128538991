"""MLflow: one run per pipeline execution, which the stages (separate processes) append to.

The fine-tune stage opens the run (or adopts ``MLFLOW_RUN_ID`` when a flow opened it) and writes
its id next to the checkpoint; export, evaluate and register read that id and append. The run is
tagged with the git commit, and by the last stage with the DVC hashes of this run's outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from bit_core.contracts import DATA_METRICS, MLFLOW_RUN, DataMetrics
from bit_core.errors import ContractError, Interrupted
from bit_core.redact import redact, redact_value
from tasks import environment
from tasks.common import log


def configure() -> str:
    """Telemetry off; default store sqlite:///mlflow.db in the working directory (repo root)."""
    environment.apply()
    uri = environment.tracking_uri()
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def dvc_out_hashes(lock: Path = Path("dvc.lock"), *, running: str | None = None
                   ) -> dict[str, str]:
    """{"dvc.<stage>.<out path>": md5} for every output recorded in dvc.lock so far.

    DVC writes a stage's lock entry as soon as that stage has run, so read from the last stage
    of a pipeline these are the hashes of the data and models this very run used and made. The
    `running` stage's own entry is still the previous run's, and is left out.
    """
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.{stage}.{out['path']}": out.get("md5", "")
            for stage, entry in stages.items() if stage != running
            for out in entry.get("outs", [])}


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def start_run(experiment: str, run_name: str | None = None,
              continue_run: str | None = None) -> str:
    """Open the pipeline's run and return its id; it stays active.

    Adopts ``MLFLOW_RUN_ID`` when a flow opened the run; else continues `continue_run` (an
    interrupted fine-tune's run) when the store still has it; else starts a new run.
    """
    import mlflow

    configure()
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]).info.run_id
    mlflow.set_experiment(experiment)
    if continue_run and _run_exists(continue_run):
        log.info("continuing MLflow run %s", continue_run)
        return mlflow.start_run(run_id=continue_run).info.run_id
    tags = {"git.commit": git_commit() or "unknown"}
    if continue_run:  # the interrupted run is gone from this store: link it at least
        tags["resumed_from_run"] = continue_run
    return mlflow.start_run(run_name=run_name, tags=tags).info.run_id


class TrainingRun:
    """The fine-tune's handle on its MLflow run: params, metrics, per-step records, artifacts."""

    def __init__(self, run_id: str, continued: bool):
        from mlflow.tracking import MlflowClient

        self.id, self.client = run_id, MlflowClient()
        self.logged = self.client.get_run(run_id).data.params if continued else {}
        self.steps = StepLogger(run_id)

    def log_params(self, params: dict) -> None:
        """Log params; on a continued run, a value that changed since (a setting that does not
        change what is computed, such as stop_after) is recorded as a ``resumed.<key>`` tag."""
        import mlflow

        params = {k: str(v) for k, v in redact_value(params).items()}
        changed = {k: v for k, v in params.items() if k in self.logged and self.logged[k] != v}
        mlflow.log_params({k: v for k, v in params.items() if k not in self.logged})
        if changed:
            mlflow.set_tags({f"resumed.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics(metrics, step=step)

    def log_step(self, record: dict) -> None:
        self.steps(record)

    def log_artifact(self, path: Path, directory: str) -> None:
        import mlflow

        mlflow.log_artifact(str(path), directory)


@contextmanager
def training_run(experiment: str, run_name: str, *, continue_from: Path | None,
                 record_in: Path | None) -> Iterator[TrainingRun]:
    """Open the fine-tune's run; end it FINISHED, KILLED (stopped by a signal) or FAILED.

    Args:
        experiment: the MLflow experiment.
        run_name: the name of a new run.
        continue_from: a directory whose run record names the run to continue (the resume
            directory of an interrupted fine-tune), or None for a new run.
        record_in: where to record this run's id, so that a run interrupted later is continued.
    """
    import mlflow

    previous = read_run_id(continue_from) if continue_from else None
    run_id = start_run(experiment, run_name, continue_run=previous)
    if record_in is not None:
        write_run_file(record_in, run_id)
    run = TrainingRun(run_id, continued=run_id == previous)
    try:
        yield run
    except BaseException as err:
        run.steps.flush()
        mlflow.end_run("KILLED" if isinstance(err, Interrupted) else "FAILED")
        raise
    run.steps.flush()
    mlflow.end_run()


def write_run_file(directory: Path, run_id: str) -> None:
    from bit_core.io import atomic_write_json

    atomic_write_json(Path(directory) / MLFLOW_RUN,
                      {"run_id": run_id,
                       "tracking_uri": redact(os.environ.get("MLFLOW_TRACKING_URI") or "")})


def read_run_id(directory: Path) -> str | None:
    path = Path(directory) / MLFLOW_RUN
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


@contextmanager
def appended_run(directory: Path) -> Iterator[object]:
    """Re-open the run recorded in `directory` (the fine-tune output) for a later stage.

    Yields the mlflow module with the run active, or None when no run was recorded (the
    stage then does its work without tracking).
    """
    run_id = os.environ.get("MLFLOW_RUN_ID") or read_run_id(directory)
    if run_id is None:
        yield None
        return
    import mlflow

    uri = configure()
    _check_open(run_id, uri, "MLFLOW_RUN_ID" if os.environ.get("MLFLOW_RUN_ID") else
                str(Path(directory) / MLFLOW_RUN))
    with mlflow.start_run(run_id=run_id):
        yield mlflow


def _check_open(run_id: str, uri: str, named_in: str) -> None:
    """ContractError in one line when the recorded run is not in the store or was deleted (the
    fine-tune's outputs, restored by DVC, can outlive the MLflow run they name)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        deleted = MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":  # the store failed to answer
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ContractError(redact(
                f"could not read MLflow run {run_id} from {uri} ({first[:300]}): check that "
                "the tracking store is reachable and MLFLOW_TRACKING_URI's credentials")) from None
        problem, fix = "is not in", "track to the store it was logged to (MLFLOW_TRACKING_URI)"
    else:
        if not deleted:
            return
        problem, fix = "was deleted from", f"mlflow runs restore --run-id {run_id}"
    raise ContractError(redact(
        f"MLflow run {run_id} of the fine-tuned model (named in {named_in}) {problem} "
        f"{uri}: {fix}, or train again with dvc repro --force finetune"))


def log_data_report(directory: Path, report: Path | None) -> None:
    """Add the prepare stage's data report to the run recorded in `directory` (the fine-tune
    output): its files as artifacts under ``data/``, its numbers as ``data.<name>`` metrics.

    The fine-tune opens the pipeline's run, so it carries the report of the data it trained on
    (DVC skips an unchanged prepare stage, which therefore cannot log to a new run itself).
    Only the first of several training processes (torchrun's RANK 0) logs.
    """
    if report is None or os.environ.get("RANK", "0") != "0":
        return
    numbers = DataMetrics.read(Path(report) / DATA_METRICS, "prepare")
    with appended_run(directory) as mlflow:
        if mlflow is None:
            return
        mlflow.log_metrics({f"data.{key}": value for key, value in numbers.values().items()})
        for path in sorted(Path(report).iterdir()):
            if path.is_file() and not path.name.startswith("."):  # not DVC's .gitignore
                mlflow.log_artifact(str(path), "data")


class StepLogger:
    """Buffers per-step metrics and sends them to MLflow in batches (one request per `every`)."""

    def __init__(self, run_id: str, every: int = 25):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.every, self.buffer = MlflowClient(), run_id, every, []

    def __call__(self, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["step"])
        self.buffer += [Metric(key, float(value), now, step) for key, value in record.items()
                        if key != "step"]
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self.buffer[start:start + 1000])
        self.buffer = []
