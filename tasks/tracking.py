"""MLflow: one run per pipeline execution, which the stages (separate processes) append to.

The fine-tune stage opens the run (or adopts ``MLFLOW_RUN_ID`` when a flow opened it) and writes
its id next to the checkpoint; export, compile and evaluate read that id and append. The run is
tagged with the git commit and the DVC hashes of the data and weights it was trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from bit_core.contracts import MLFLOW_RUN

def configure() -> str:
    """Telemetry off; default store sqlite:///mlflow.db in the working directory (repo root)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
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


def dvc_out_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """{"dvc.<stage>.<out path>": md5} for every output recorded in dvc.lock so far."""
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return {f"dvc.{stage}.{out['path']}": out.get("md5", "")
            for stage, entry in stages.items() for out in entry.get("outs", [])}


def start_run(experiment: str, run_name: str | None = None) -> str:
    """Open (or adopt MLFLOW_RUN_ID) the pipeline's run; return its id. Leaves it active."""
    import mlflow

    configure()
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"]).info.run_id
    mlflow.set_experiment(experiment)
    tags = {"git.commit": git_commit() or "unknown", **dvc_out_hashes()}
    return mlflow.start_run(run_name=run_name, tags=tags).info.run_id


def write_run_file(directory: Path, run_id: str) -> None:
    from bit_core.io import atomic_write_json

    atomic_write_json(Path(directory) / MLFLOW_RUN,
                      {"run_id": run_id, "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")})


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

    configure()
    with mlflow.start_run(run_id=run_id):
        yield mlflow


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
