"""The fine-tune stage as a real process on the prepared digits, as the flow or an operator
starts it: in its own session, each run in a directory of its own, and everything it started
killed when the test is done with it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from flows.overrides import apply_overrides
from tests.conftest import processes_with_env

TIMEOUT = 120.0  # generous: the host may be busy
MARK = "BIT_TEST_STAGE_RUN"  # in the environment of every process a stage run starts


@dataclass(frozen=True)
class Stage:
    """The fine-tune stage on the prepared digits with `settings` (params overrides)."""

    inputs: Path
    tracking_uri: str
    settings: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def start(self, run: Path, overrides: list[str]) -> Iterator[subprocess.Popen]:
        """The running stage, writing under `run`; on exit, everything it started is killed,
        whatever its process group."""
        run.mkdir(exist_ok=True)
        params = run / "params.yaml"
        params.write_text((self.inputs / "params.yaml").read_text())
        apply_overrides(params, self.settings + overrides)
        command = [sys.executable, "-m", "tasks.finetune", "--data", str(self.inputs / "data/raw"),
                   "--splits", str(self.inputs / "data/prepared"),
                   "--weights", str(self.inputs / "models/pretrained"), "--out", str(run / "out"),
                   "--reports", str(run / "reports"), "--resume-dir", str(run / "resume")]
        # A temporary folder of its own, removed with everything the stage started (a SIGKILLed
        # launcher leaves its log folder there), with a short path: Unix sockets made in it
        # (multiprocessing's, for DataLoader workers) take at most 107 bytes.
        tmp = tempfile.mkdtemp(prefix="stage-")
        env = {**os.environ, **self.env, "BIT_PARAMS": str(params), "TMPDIR": tmp,
               "MLFLOW_TRACKING_URI": self.tracking_uri, MARK: str(run)}
        with open(run / "stdout.txt", "w") as out, open(run / "stderr.txt", "w") as err:
            process = subprocess.Popen(command, cwd=run, env=env, stdout=out, stderr=err,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            yield process
        finally:
            kill_all(process, str(run))
            shutil.rmtree(tmp, ignore_errors=True)

    def complete(self, run: Path, overrides: list[str]) -> dict:
        """Run to the end; the final checkpoint."""
        with self.start(run, overrides) as process:
            code, stderr = finish(process, run)
        assert code == 0, stderr
        return torch.load(run / "out/checkpoint.pt", weights_only=True)


def kill_all(process: subprocess.Popen, mark: str) -> None:
    """SIGKILL the stage and everything it started: torchrun's ranks run in sessions of their
    own and outlive a stage that died first, so they are found by the mark in their environment."""
    deadline = time.monotonic() + TIMEOUT
    while pids := processes_with_env(MARK, mark):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert time.monotonic() < deadline, f"processes {sorted(pids)} outlive SIGKILL"
        time.sleep(0.1)
    process.wait()


def wait_for(condition, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert process.poll() is None, f"the stage exited (code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} after {TIMEOUT:.0f} s"
        time.sleep(0.05)


def finish(process: subprocess.Popen, run: Path, timeout: float = TIMEOUT) -> tuple[int, str]:
    """The stage's exit code and stderr, once it has exited."""
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the stage did not exit within {timeout:.0f} s")
    return code, (run / "stderr.txt").read_text()
