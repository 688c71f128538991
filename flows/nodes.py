"""Fine-tuning on several hosts from one flow run (``nodes=N``).

The flow run that the user started (node 0) runs the pipeline as usual. When the fine-tune stage
has to run, it first starts N-1 flow runs of the ``bit-node`` deployment of its own pool (the
other nodes), each on whichever worker takes it, in a workspace of its own like every shared
run. Each node restores the data stages from the DVC remote (node 0 pushed them), then runs the
fine-tune stage's command of dvc.yaml with the meeting place in its environment
(``bit_core.contracts``: ``BIT_RDZV_ENDPOINT``, ``BIT_RDZV_ID``, ``BIT_NODE_RANK``). Node 0
runs the stage itself, through DVC, once every node is ready; all meet in torchrun's c10d
rendezvous at node 0's host and train one model. Global rank 0 is on node 0, so node 0 alone
writes the checkpoint, logs to MLflow and goes on with export, evaluation and registration; the
other nodes' flow runs end when training ends.

A node that never starts (no free worker in the pool) or fails before training ends node 0's run
with one line; a node lost during training ends the others within the trainer's timeouts, with
one line naming it (``train.peer_timeout``). Node 0 cancels the nodes it started when it fails.
Retrying node 0's flow run (``prefect flow-run retry``) starts new nodes; training resumes from
the last checkpoint, which a failed run leaves in the host cache and on the DVC remote.

Each worker host should take one flow run at a time (``prefect worker start --limit 1``), so
that the nodes of one run land on different hosts.
"""

from __future__ import annotations

import os
import shlex
import socket
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task

from bit_core.contracts import ENDPOINT_ENV, NODE_RANK_ENV, RDZV_ID_ENV
from bit_core.redact import redact
from flows import dag, workspace
from tasks import environment

NODE_FLOW = "bit-node"
ADDRESS_ENV = "BIT_NODE_ADDRESS"  # a worker host's address for the other nodes, when it has many
READY_TASK = "train-node"  # a node's task that runs the trainer: running means ready
POLL_SECONDS = 2.0
END_SECONDS = 300.0  # how long node 0 waits for the others to end after training


class NodeError(RuntimeError):
    """A node of a multi-host run cannot start or failed; the message is one line."""


def node_env(endpoint: str, rdzv_id: str, rank: int) -> dict[str, str]:
    """The environment that tells a node's fine-tune where the nodes meet and which it is."""
    return {ENDPOINT_ENV: endpoint, RDZV_ID_ENV: rdzv_id, NODE_RANK_ENV: str(rank)}


def host_address() -> str:
    """This host's address for the other nodes: ``BIT_NODE_ADDRESS`` when the worker's
    environment sets it, else the address this host reaches the Prefect server from (the other
    workers reach that server too; and unlike the host's name, it is never ``localhost`` on a
    host whose name resolves only to loopback), else the host's name."""
    from prefect.settings import PREFECT_API_URL

    if os.environ.get(ADDRESS_ENV):
        return os.environ[ADDRESS_ENV]
    api = urllib.parse.urlsplit(PREFECT_API_URL.value() or "")
    if not api.hostname:  # no server (a local run): no route to ask about
        return socket.getfqdn()
    try:
        family, kind, _, _, where = socket.getaddrinfo(
            api.hostname, api.port or (443 if api.scheme == "https" else 80),
            type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind) as probe:
            probe.connect(where)  # a datagram socket: nothing is sent, a route is chosen
            address = probe.getsockname()[0]
    except (OSError, TypeError, UnicodeError):
        return socket.getfqdn()
    return f"[{address}]" if ":" in address else address


def default_endpoint() -> str:
    """host:port for the rendezvous on this host: :func:`host_address` and a port free now."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"{host_address()}:{port}"


@dataclass(frozen=True)
class NodePlan:
    """How node 0 starts the others: their deployment and pool, node 0's params.yaml changes
    and commit, which every node applies."""

    deployment: str
    pool: str
    changes: list[str]
    commit: str


@task(name="plan-nodes")
def plan_nodes(changes: list[str], commit: str) -> NodePlan:
    """The plan for a run from deployment ``bit-finetune/<name>``: the other nodes are flow runs
    of ``bit-node/<name>``, in the same pool. Raises NodeError when the run was not started
    from a deployment, or that node deployment is missing."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.runtime import deployment

    if not deployment.id:
        raise NodeError("training on several nodes starts the other nodes through a deployment: "
                        "run it as `prefect deployment run bit-finetune/<pool> --param nodes=N`")
    name = f"{NODE_FLOW}/{deployment.name}"
    with get_client(sync_client=True) as client:
        pool = client.read_deployment(deployment.id).work_pool_name
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise NodeError(f"deployment {name} does not exist: deploy it from prefect.yaml "
                            "(prefect --no-prompt deploy --all)") from None
    return NodePlan(name, pool or "?", changes, commit)


@task(name="start-nodes")
def start_nodes(deployment: str, nodes: int, parameters: dict) -> list[str]:
    """Flow runs of `deployment` for nodes 1..nodes-1; their ids."""
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run

    logger = get_run_logger()
    started = []
    for rank in range(1, nodes):
        run = run_deployment(deployment, parameters={**parameters, "node_rank": rank},
                             timeout=0, flow_run_name=f"{flow_run.name}-node-{rank}",
                             idempotency_key=f"{flow_run.id}:{flow_run.run_count}:node-{rank}")
        logger.info("node %d: flow run %s of %s", rank, run.id, deployment)
        started.append(str(run.id))
    return started


IDLE, STARTING, READY = "idle", "starting", "ready"  # a node's flow run, as _readiness sees it


def _readiness(client, run_id: str) -> str:
    """READY when a node's flow run is training, IDLE while no worker has taken it, else
    STARTING; NodeError when it ended first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    run = client.read_flow_run(run_id)
    if run.state and run.state.is_final():
        raise NodeError(redact(f"node flow run {run.name} ended {run.state.name} before "
                               f"training: {run.state.message or 'see its log'}"))
    if run.state and run.state.is_scheduled():
        return IDLE
    tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    training = any(t.name.startswith(READY_TASK) and t.state and t.state.is_running()
                   for t in tasks)
    return READY if training else STARTING


@task(name="wait-for-nodes")
def wait_for_nodes(run_ids: list[str], start_timeout: float, pool: str) -> None:
    """Until every node trains. A node not started by a worker within `start_timeout` seconds,
    or ended before it trains, is a NodeError."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + start_timeout
    waiting = list(run_ids)
    with get_client(sync_client=True) as client:
        while waiting:
            states = {run_id: _readiness(client, run_id) for run_id in waiting}
            waiting = [run_id for run_id, state in states.items() if state != READY]
            idle = [run_id for run_id in waiting if states[run_id] == IDLE]
            if idle and time.monotonic() > deadline:
                raise NodeError(f"{len(idle)} node(s) not started by a worker of pool {pool} "
                                f"within {start_timeout:.0f} s (train.join_timeout): start a "
                                f"worker on another host (prefect worker start --pool {pool} "
                                "--limit 1), or run with fewer nodes")
            time.sleep(POLL_SECONDS if waiting else 0)
    get_run_logger().info("all %d other nodes are ready to train", len(run_ids))


@task(name="end-nodes")
def end_nodes(run_ids: list[str], cancel: bool) -> dict[str, str]:
    """After training: wait for the other nodes' flow runs to end (they end with it); when node
    0 failed (`cancel`), cancel those still scheduled or running. Their final states by id."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    deadline = time.monotonic() + END_SECONDS
    ended: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        while len(ended) < len(run_ids) and (cancel or time.monotonic() < deadline):
            for run_id in set(run_ids) - set(ended):
                state = client.read_flow_run(run_id).state
                if state is None or state.is_final():
                    ended[run_id] = state.name if state else "none"
                elif cancel:
                    client.set_flow_run_state(run_id, Cancelling() if state.is_running()
                                              else Cancelled(), force=True)
                    ended[run_id] = "Cancelled"
            time.sleep(POLL_SECONDS if len(ended) < len(run_ids) else 0)
    logger = get_run_logger()
    for run_id in set(run_ids) - set(ended):
        logger.warning("node flow run %s still running %.0f s after training", run_id, END_SECONDS)
    return ended


@contextmanager
def other_nodes(params: dict, plan: NodePlan) -> Iterator[dict]:
    """Start nodes 1..N-1 of this run and wait until they train; yield node 0's environment for
    the fine-tune stage; then let them end (cancelled when the block failed)."""
    from prefect.runtime import flow_run

    cfg = params["train"]
    endpoint, rdzv_id = default_endpoint(), f"bit-{flow_run.id}-{flow_run.run_count}"
    parameters = {"overrides": plan.changes, "commit": plan.commit, "rdzv_endpoint": endpoint,
                  "rdzv_id": rdzv_id}
    started = start_nodes(plan.deployment, cfg["nodes"], parameters)
    failed = True
    try:
        wait_for_nodes(started, float(cfg["join_timeout"]), plan.pool)
        get_run_logger().info("node 0 of %d: rendezvous %s at %s", cfg["nodes"], rdzv_id,
                              endpoint)
        yield node_env(endpoint, rdzv_id, 0)
        failed = False
    finally:
        end_nodes(started, cancel=failed)


# --- the other nodes -----------------------------------------------------------------------------


def checkout(repo: str, commit: str) -> None:
    """Make the workspace node 0's commit (the pull steps cloned the branch's head, which may
    have moved since). Raises WorkspaceError with one line when it cannot be fetched."""
    if workspace.head(repo) == commit:
        return
    workspace.git(repo, "fetch", "--quiet", workspace.GIT_REMOTE, commit)
    workspace.git(repo, "checkout", "--quiet", commit)


def stage_command(repo: str, stage: str) -> list[str]:
    """The stage's command from dvc.yaml, as DVC would run it (through the shell)."""
    return ["sh", "-c", dag.command(repo, stage)]


@flow(name=NODE_FLOW, log_prints=True)
def bit_node(overrides: list[str], commit: str, rdzv_endpoint: str, rdzv_id: str,
             node_rank: int, repo: str | None = None) -> dict:
    """One of the other nodes of a multi-host fine-tune, started by node 0's flow run.

    Args:
        overrides: node 0's changes to params.yaml (its overrides, device and nodes).
        commit: node 0's commit; this workspace checks it out.
        rdzv_endpoint, rdzv_id: where the nodes meet (node 0's host).
        node_rank: this node's rank, 1..nodes-1.
        repo: the checkout (default: the one this flow was loaded from: the run's workspace).
    """
    from flows import pipeline

    environment.apply()
    repo = str(Path(repo or os.environ.get("BIT_PIPELINE_REPO") or pipeline.REPO).resolve())
    pipeline.prepare_workspace(repo)
    checkout(repo, commit)
    params = pipeline.apply_params(repo, overrides)
    stages = dag.stages(repo)
    for stage in stages[:stages.index(pipeline.TRAIN_STAGE)]:
        pipeline.run_stage(stage, repo, shared=True)
    env = node_env(rdzv_endpoint, rdzv_id, node_rank)
    train_node.with_options(task_run_name=f"{READY_TASK} {node_rank}")(repo, env)
    return {"node": node_rank, "nodes": params["train"]["nodes"], "commit": commit}


@task(name=READY_TASK)
def train_node(repo: str, env: dict[str, str]) -> None:
    """The fine-tune stage's command as one node: it trains, and writes nothing (rank 0 is on
    node 0)."""
    from flows import pipeline

    argv = stage_command(repo, pipeline.TRAIN_STAGE)
    code, output = pipeline.command(repo, argv, env=env)
    if code != 0:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        raise NodeError((errors or [f"{shlex.join(argv)} exited {code}"])[-1])
