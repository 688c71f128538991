"""Stopping the fine-tune stage with SIGTERM while DataLoader workers or several training
processes run: it writes a checkpoint, exits with one line, and the next run resumes to the
same weights as a run that never stopped.

The stage runs as a real process in its own session, as the flow starts it; the signal goes
where the flow or an operator would send it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from tests.finetune_runs import Stage, finish, wait_for

# Ends at stop_after: the schedule is long, so a stop never lands at its end by chance.
SETTINGS = ["train.device=cpu", "train.resolution=16", "train.precrop=20", "train.batch=8",
            "train.schedule=[2, 30, 40]", "train.stop_after=6", "train.eval_every=100",
            "train.checkpoint_every=2"]
FIRST_CHECKPOINT, LAST_STEP = 2, 6


def _ranks(process: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes torchrun started for the stage, by rank."""
    ranks = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RANK" in (env := child.environ()) and "tasks.finetune" in child.cmdline():
                ranks[int(env["RANK"])] = child
    return ranks


def _stop(stage: Stage, run: Path, overrides: list[str], send_stop,
          exit_code: int = 2) -> tuple[dict, list[str]]:
    """Stop the stage with `send_stop(process)` after its first periodic checkpoint and check
    that it stopped cleanly; the checkpoint it left and its error lines."""
    resume = run / "resume/checkpoint.pt"
    with stage.start(run, overrides) as process:
        wait_for(resume.is_file, process, "periodic checkpoint")
        send_stop(process)
        code, stderr = finish(process, run)
    saved = torch.load(resume, weights_only=True)
    line = (f"error: finetune: stopped by signal {signal.SIGTERM.value} at step {saved['step']}; "
            f"checkpoint written to {resume}")
    errors = [text for text in stderr.splitlines() if text.startswith("error:")]
    assert code == exit_code and "Traceback" not in stderr, stderr
    assert set(errors) == {line}, stderr
    assert FIRST_CHECKPOINT < saved["step"] < LAST_STEP
    return saved, errors


def _resume(stage: Stage, run: Path, overrides: list[str], saved: dict, straight: dict) -> None:
    """Run the stopped stage again: it continues from `saved` to the weights of `straight`, the
    final checkpoint of a run that was not stopped."""
    resumed = stage.complete(run, overrides)
    assert resumed["step"] == straight["step"] == LAST_STEP
    assert resumed["history"][:saved["step"]] == saved["history"]  # it continued the stopped run
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


@pytest.fixture(scope="module")
def stage(digits_inputs, tmp_path_factory) -> Stage:
    tracking = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    return Stage(digits_inputs, f"sqlite:///{tracking}", SETTINGS)


@pytest.fixture(scope="module")
def one_process_run(stage, tmp_path_factory) -> dict:
    """The final checkpoint of a single-process run that was not stopped."""
    return stage.complete(tmp_path_factory.mktemp("straight"), [])


@pytest.fixture(scope="module")
def two_process_run(stage, tmp_path_factory) -> dict:
    """The final checkpoint of a two-process run that was not stopped."""
    return stage.complete(tmp_path_factory.mktemp("straight2"), ["train.processes=2"])


@pytest.mark.slow
def test_sigterm_to_the_stage_group_with_data_loader_workers(stage, tmp_path, one_process_run):
    """The group signal also reaches the DataLoader workers; they outlive it and the trainer
    checkpoints instead of failing on a killed worker."""
    overrides = ["train.workers=2"]
    saved, errors = _stop(stage, tmp_path, overrides,
                          lambda process: os.killpg(process.pid, signal.SIGTERM))
    assert len(errors) == 1
    _resume(stage, tmp_path, overrides, saved, one_process_run)


@pytest.mark.slow
def test_sigterm_to_one_of_two_training_processes(stage, tmp_path, two_process_run):
    """Only rank 1 gets the signal: both ranks stop at the same step, rank 0 writes the
    checkpoint and each rank says where it stopped, in the same words."""

    def stop_rank_one(process):
        ranks = _ranks(process)
        assert sorted(ranks) == [0, 1]
        ranks[1].send_signal(signal.SIGTERM)

    overrides = ["train.processes=2"]
    saved, errors = _stop(stage, tmp_path, overrides, stop_rank_one)
    assert len(errors) == 2
    _resume(stage, tmp_path, overrides, saved, two_process_run)


@pytest.mark.slow
def test_sigterm_to_the_group_of_a_two_process_stage_with_workers(stage, tmp_path):
    """What the flow does: the signal reaches torchrun's agent, which passes it to each rank's
    own session (DataLoader workers included); the stage exits as killed by it. (Resuming is
    the same as after any other stop.)"""
    _, errors = _stop(stage, tmp_path, ["train.processes=2", "train.workers=1"],
                      lambda process: os.killpg(process.pid, signal.SIGTERM),
                      exit_code=128 + signal.SIGTERM)
    assert len(errors) == 2
