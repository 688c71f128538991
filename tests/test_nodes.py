"""Training across hosts, on loopback: two "nodes" of one process each, every node its own
fine-tune stage in its own directory (as two hosts run it), meet in torchrun's c10d rendezvous
on 127.0.0.1 and train with gloo.

They train exactly as one node with two processes does, and as one process on the same global
batch up to float summation order. A checkpoint moves from two nodes to one process and back.
Losing a node, killed or silent, ends the other within its timeout with one line naming it, and
starting both again resumes from the checkpoint. Every process started here is killed here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, processes_with_env
from tests.finetune_runs import MARK, Stage, finish, kill_all, wait_for

# A lower learning rate than the default keeps these few steps well-conditioned, so float
# summation order does not grow into visible differences between process counts.
SETTINGS = ["train.device=cpu", "train.resolution=16", "train.precrop=20", "train.batch=8",
            "train.base_lr=0.016", "train.schedule=[2, 30, 40]", "train.stop_after=6",
            "train.eval_every=100", "train.checkpoint_every=2"]
LAST_STEP, MIDWAY = 6, 3
PEER_TIMEOUT = 20  # train.peer_timeout here
# Beyond train.peer_timeout: the survivor's own exit (bit_core.distributed's grace and closing
# of the rendezvous) and a busy host.
EXIT_MARGIN = 30


@dataclass(frozen=True)
class Nodes:
    """Two fine-tune stages, node-a and node-b under one directory, meeting at 127.0.0.1:port."""

    stage: Stage

    @contextlib.contextmanager
    def start(self, root: Path, port: int, overrides: list[str] = (),
              node_ranks: tuple[int, int] | None = None
              ) -> Iterator[dict[Path, subprocess.Popen]]:
        """With `node_ranks`, the nodes meet where the environment says and take those ranks,
        as the flow starts them; else where params.yaml says, ranked by the rendezvous."""
        settings = ["train.nodes=2", f"train.peer_timeout={PEER_TIMEOUT}", *overrides]
        stages = {root / "node-a": self.stage, root / "node-b": self.stage}
        if node_ranks is None:
            settings.append(f"train.rdzv_endpoint=127.0.0.1:{port}")
        else:
            stages = {run: replace(self.stage, env={
                **self.stage.env, "BIT_RDZV_ENDPOINT": f"127.0.0.1:{port}",
                "BIT_RDZV_ID": f"flow-{port}", "BIT_NODE_RANK": str(rank)})
                for run, rank in zip(stages, node_ranks)}
        with contextlib.ExitStack() as stack:
            yield {run: stack.enter_context(stage.start(run, settings))
                   for run, stage in stages.items()}

    def complete(self, root: Path, port: int, overrides: list[str] = (),
                 node_ranks: tuple[int, int] | None = None) -> tuple[dict, Path]:
        """Run both to the end; the final checkpoint and the directory of the node that wrote
        it (rank 0's, the only one with outputs)."""
        with self.start(root, port, overrides, node_ranks) as nodes:
            for run, process in nodes.items():
                code, stderr = finish(process, run)
                assert code == 0, stderr
        writers = [run for run in nodes if (run / "out").exists()]
        assert len(writers) == 1, writers
        return torch.load(writers[0] / "out/checkpoint.pt", weights_only=True), writers[0]


def _losses(checkpoint: dict) -> list[float]:
    return [record["loss"] for record in checkpoint["history"]]


def _apart(a: dict, b: dict, since: dict) -> float:
    """How far apart two runs' final weights are, relative to how far training moved them
    since the checkpoint `since` (as in tests/test_distributed.py)."""
    a, b, since = a["model"], b["model"], since["model"]
    moved = sum(((a[key] - since[key]) ** 2).sum() for key in a)
    apart = sum(((a[key] - b[key]) ** 2).sum() for key in a)
    return float((apart / moved).sqrt())


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(value, b["model"][key]) for key, value in a["model"].items())


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def stage(digits_inputs, tmp_path_factory) -> Stage:
    tracking = tmp_path_factory.mktemp("tracking") / "mlflow.db"
    # One thread per process in every layout, so that they can be compared bit for bit.
    return Stage(digits_inputs, f"sqlite:///{tracking}", SETTINGS, {"OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def nodes(stage) -> Nodes:
    return Nodes(stage)


@pytest.fixture(scope="module")
def one_process(stage, tmp_path_factory) -> dict:
    return stage.complete(tmp_path_factory.mktemp("one"), [])


@pytest.fixture(scope="module")
def two_processes(stage, tmp_path_factory) -> dict:
    return stage.complete(tmp_path_factory.mktemp("two"), ["train.processes=2"])


@pytest.fixture(scope="module")
def two_nodes(nodes, tmp_path_factory) -> dict:
    """Started as the flow starts them: the node started second asks to be node 0 (the
    rendezvous would rank it second: it orders the nodes of one host by process id)."""
    checkpoint, writer = nodes.complete(tmp_path_factory.mktemp("nodes"), free_port(),
                                        node_ranks=(1, 0))
    assert writer.name == "node-b"  # rank 0, the only one that writes
    return checkpoint


@pytest.fixture(scope="module")
def two_nodes_midway(nodes, tmp_path_factory) -> Path:
    """The checkpoint two nodes leave for the next run when they end early, at MIDWAY."""
    checkpoint, writer = nodes.complete(tmp_path_factory.mktemp("midway"), free_port(),
                                        [f"train.stop_after={MIDWAY}"])
    assert checkpoint["step"] == MIDWAY and checkpoint["world"] == 2
    return writer / "resume/checkpoint.pt"


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_two_processes(two_nodes, two_processes):
    assert two_nodes["step"] == LAST_STEP
    assert _losses(two_nodes) == _losses(two_processes)
    assert _same_weights(two_nodes, two_processes)


@pytest.mark.slow
def test_two_nodes_train_as_one_process_on_the_same_batch(two_nodes, one_process,
                                                          two_nodes_midway):
    assert _losses(two_nodes) == pytest.approx(_losses(one_process), rel=1e-5)
    midway = torch.load(two_nodes_midway, weights_only=True)
    assert _apart(one_process, two_nodes, since=midway) < 1e-2


@pytest.mark.slow
def test_a_two_node_checkpoint_resumes_on_one_process(stage, two_nodes_midway, one_process,
                                                     tmp_path):
    (tmp_path / "resume").mkdir()
    shutil.copyfile(two_nodes_midway, tmp_path / "resume/checkpoint.pt")
    midway = torch.load(two_nodes_midway, weights_only=True)
    resumed = stage.complete(tmp_path, [])
    assert resumed["step"] == LAST_STEP and resumed["world"] == 1
    assert resumed["history"][:MIDWAY] == midway["history"]  # it continued the two nodes' run
    assert _losses(resumed) == pytest.approx(_losses(one_process), rel=1e-5)
    assert _apart(one_process, resumed, since=midway) < 1e-2


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_on_two_nodes(stage, nodes, two_nodes, tmp_path):
    """One node has the checkpoint; whichever holds rank 0, both continue from it."""
    stage.complete(tmp_path / "one", [f"train.stop_after={MIDWAY}"])
    midway = torch.load(tmp_path / "one/resume/checkpoint.pt", weights_only=True)
    (tmp_path / "node-b/resume").mkdir(parents=True)
    shutil.copyfile(tmp_path / "one/resume/checkpoint.pt", tmp_path / "node-b/resume/checkpoint.pt")
    resumed, _ = nodes.complete(tmp_path, free_port())
    assert resumed["history"][:MIDWAY] == midway["history"]
    assert _losses(resumed) == pytest.approx(_losses(two_nodes), rel=1e-5)
    assert _apart(two_nodes, resumed, since=midway) < 1e-2


def _lose_a_node(nodes: Nodes, root: Path, port: int, lose_rank_0: bool,
                 sig: signal.Signals = signal.SIGKILL) -> tuple[int, str, float, dict]:
    """Start two nodes; after rank 0's first periodic checkpoint send `sig` to every process of
    one node (rank 0's, or the other). The survivor's exit code, its stderr, how long it took to
    exit after the signal, and the checkpoint left in rank 0's node."""
    with nodes.start(root, port) as started:
        (a, process_a), (b, process_b) = started.items()
        wait_for(lambda: any((run / "resume/checkpoint.pt").is_file() for run in started),
                 process_a, "periodic checkpoint")
        rank_0 = a if (a / "resume/checkpoint.pt").is_file() else b
        lost = rank_0 if lose_rank_0 else (b if rank_0 == a else a)
        survivor = b if lost == a else a
        for pid in processes_with_env(MARK, str(lost)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        sent = time.monotonic()
        code, stderr = finish(started[survivor], survivor, timeout=PEER_TIMEOUT + EXIT_MARGIN)
        took = time.monotonic() - sent
        kill_all(started[lost], str(lost))
    return code, stderr, took, torch.load(rank_0 / "resume/checkpoint.pt", weights_only=True)


@pytest.mark.slow
def test_losing_rank_0s_node_ends_the_other_with_one_line_and_a_retry_resumes(
        nodes, two_nodes, tmp_path):
    """The node with rank 0 also holds the job's store; the retry resumes from its checkpoint
    whichever node gets rank 0 this time."""
    port = free_port()
    code, stderr, took, saved = _lose_a_node(nodes, tmp_path, port, lose_rank_0=True)
    assert code == 2 and "Traceback" not in stderr, stderr
    [line] = _error_lines(stderr)
    assert line.startswith("error: finetune: lost node 0 (") and "rank 0" in line, line
    assert took < PEER_TIMEOUT + EXIT_MARGIN
    assert 2 <= saved["step"] < LAST_STEP
    resumed, _ = nodes.complete(tmp_path, port)
    assert resumed["history"][:saved["step"]] == saved["history"]
    assert _same_weights(resumed, two_nodes)


@pytest.mark.slow
def test_losing_the_other_node_ends_rank_0_with_one_line_naming_it(nodes, tmp_path):
    code, stderr, took, _ = _lose_a_node(nodes, tmp_path, free_port(), lose_rank_0=False)
    assert code == 2 and "Traceback" not in stderr, stderr
    [line] = _error_lines(stderr)
    assert line.startswith("error: finetune: lost node 1 (host ") and "rank 1)" in line, line
    assert took < PEER_TIMEOUT + EXIT_MARGIN


@pytest.mark.slow
def test_a_node_that_falls_silent_is_named_after_peer_timeout(nodes, tmp_path):
    """A host that vanishes without closing its connections (here: every process of the node
    stopped) leaves the other waiting in a collective; train.peer_timeout bounds the wait."""
    code, stderr, took, _ = _lose_a_node(nodes, tmp_path, free_port(), lose_rank_0=False,
                                         sig=signal.SIGSTOP)
    assert code == 2 and "Traceback" not in stderr, stderr
    [line] = _error_lines(stderr)
    assert line.startswith("error: finetune: lost node 1 (") and \
        f"no sign of life for {PEER_TIMEOUT} s" in line, line
    assert PEER_TIMEOUT <= took < PEER_TIMEOUT + EXIT_MARGIN


def test_a_node_alone_gives_up_after_the_join_timeout(stage, tmp_path):
    port = free_port()
    with stage.start(tmp_path, ["train.nodes=2", f"train.rdzv_endpoint=127.0.0.1:{port}",
                                "train.join_timeout=3"]) as process:
        code, stderr = finish(process, tmp_path)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert _error_lines(stderr) == [
        f"error: finetune: not all 2 nodes joined the rendezvous 'bit-finetune' at "
        f"127.0.0.1:{port} within 3 s: start this stage on every node with the same "
        "train.nodes, train.rdzv_endpoint and train.rdzv_id, or raise train.join_timeout"]
