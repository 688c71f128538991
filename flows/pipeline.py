"""The `bit-finetune` Prefect flow: the DVC stages in order, one Prefect task per stage.

The flow never re-implements a stage. It writes the run's overrides into params.yaml (as
``dvc exp run -S`` does) and runs ``dvc repro --single-item <stage>`` for each stage, so DVC
still decides what is up to date and dvc.lock stays true.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.overrides import apply_overrides

REPO = Path(__file__).resolve().parents[1]
IO_STAGES = {"fetch_data", "fetch_weights"}  # network or disk reads worth retrying
TELEMETRY_OFF = {"MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
                 "TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}


def stages(repo: Path) -> list[str]:
    """Stage names in dvc.yaml order (which is the pipeline's order)."""
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


def dvc_command(repo: Path) -> list[str]:
    """`dvc` from the interpreter's environment (a worker's PATH may not have the venv)."""
    local = Path(sys.executable).with_name("dvc")
    return [str(local) if local.exists() else "dvc"]


def _run_stage(stage: str, repo: str) -> dict:
    """Run one DVC stage (skipped by DVC when up to date); return whether it ran."""
    logger = get_run_logger()
    env = {**os.environ, **TELEMETRY_OFF}
    result = subprocess.run([*dvc_command(Path(repo)), "repro", "--single-item", stage], cwd=repo,
                            env=env, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    for line in output.splitlines()[-40:]:
        logger.info(line)
    if result.returncode != 0:
        errors = [line for line in output.splitlines() if "error" in line.lower()]
        raise RuntimeError(f"stage {stage} failed: {(errors or [output[-300:]])[-1]}")
    ran = "didn't change, skipping" not in output
    return {"stage": stage, "ran": ran}


@task(name="run-stage", task_run_name="{stage}")
def run_stage(stage: str, repo: str) -> dict:
    return _run_stage(stage, repo)


@task(name="run-io-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10)
def run_io_stage(stage: str, repo: str) -> dict:
    return _run_stage(stage, repo)


@task(name="apply-overrides")
def apply_params(repo: str, overrides: list[str]) -> dict:
    """Write overrides into params.yaml and return the validated parameters."""
    return apply_overrides(Path(repo) / "params.yaml", overrides).model_dump()


def _summary(repo: Path) -> tuple[str, str | None]:
    table = repo / "reports" / "eval" / "fps.md"
    run_file = repo / "models" / "finetuned" / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    text = table.read_text() if table.is_file() else "(no evaluation table)"
    return text, run_id


@flow(name="bit-finetune", log_prints=True)
def bit_finetune(overrides: list[str] | None = None, device: str = "auto",
                 processes: int | None = None, repo: str | None = None) -> dict:
    """Fine-tune, export, compile and evaluate BiT through the DVC pipeline.

    Args:
        overrides: ``section.key=value`` changes to params.yaml (like ``dvc exp run -S``).
        device: ``auto | cpu | cuda | npu`` for training and evaluation.
        processes: data-parallel training processes per host (e.g. 8 for 8 NPUs).
        repo: the checkout to run in (default: the one this flow was loaded from).
    """
    repo = str(Path(repo or os.environ.get("BIT_PIPELINE_REPO") or REPO).resolve())
    changes = list(overrides or [])
    if device != "auto":
        changes += [f"train.device={device}", f"evaluate.device={device}"]
    if processes:
        changes.append(f"train.processes={processes}")
    apply_params(repo, changes)
    results = []
    for stage in stages(Path(repo)):
        runner = run_io_stage if stage in IO_STAGES else run_stage
        results.append(runner(stage, repo))
    table, run_id = _summary(Path(repo))
    create_markdown_artifact(key="bit-evaluation", markdown=(
        f"## BiT evaluation\n\n{table}\n\nMLflow run: `{run_id}`\n"), description="top-1/FPS")
    return {"stages": results, "mlflow_run_id": run_id}


if __name__ == "__main__":
    bit_finetune()
