"""Multi-process data-parallel training (torchrun + DDP): gloo on CPU, nccl on CUDA, hccl on NPU,
on one host or several (torchrun's c10d rendezvous).

Each process reads its own slice of every micro-batch (see ``bit_core.train``), so N processes
on a global batch B compute the same averaged gradient as one process on B, wherever they run.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bit_core.config import TrainConfig
from bit_core.contracts import ENDPOINT_ENV, NODE_RANK_ENV, RDZV_ID_ENV
from bit_core.errors import ClusterError, Interrupted

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0  # global: among the processes of every node
    size: int = 1
    local_rank: int = 0  # on this node
    node: int = 0  # this node's rank in the rendezvous

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def backend_for(device_type: str) -> str:
    """The collective-communication backend for a device type (cpu, cuda, npu)."""
    try:
        return BACKENDS[device_type]
    except KeyError:
        raise ValueError(f"no distributed backend for device {device_type!r}") from None


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (no-op for a single process).

    Returns the world and this process's device (cuda:N / npu:N by local rank).
    """
    if not launched_by_torchrun():
        return World(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type in ("cuda", "npu"):
        device = torch.device(device.type, local_rank)
        getattr(torch, device.type).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device.type))
    world = World(dist.get_rank(), dist.get_world_size(), local_rank,
                  int(os.environ.get("GROUP_RANK", "0")))
    return world, device


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` when there are several processes."""
    if world.size == 1:
        return model
    ids = [device.index] if device.type in ("cuda", "npu") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device, peer_timeout: float = 60.0,
            abandon: Callable[[ClusterError], None] | None = None
            ) -> Iterator[tuple[World, torch.device]]:
    """:func:`init`, the block, then the end of the process group (as :func:`finish`, also
    after a stop signal); yields (world, device).

    With several processes, a :class:`Heartbeat` watches the others meanwhile. When a collective
    fails because a process is gone, the block's error becomes a :class:`ClusterError` naming
    it. A process that stays silent for `peer_timeout` seconds while this one's main thread
    cannot notice (it waits in a collective on a host that vanished without closing its
    connections) is named to `abandon` from the watching thread, which should end the process.
    """
    world, device = init(device)
    if world.size == 1:
        yield world, device
        return
    heartbeat, clean = Heartbeat(world, peer_timeout, abandon), False
    try:
        yield world, device
        dist.barrier()  # all beat until here, however long rank 0 took to get here
        clean = True
    except Interrupted:  # every process stopped at the same step, after a barrier
        clean = True
        raise
    except RuntimeError:  # gloo, nccl and hccl report a vanished peer as this
        lost = heartbeat.explain()
        if lost is None:
            raise
        raise lost from None
    finally:
        heartbeat.stop(finished=clean)
        if clean:
            dist.destroy_process_group()


BEAT_SECONDS = 1.0
# After a collective failed, silence this long (or peer_timeout, if shorter) names a process lost.
CONFIRM_SECONDS = 10.0
STORE_SECONDS = 5.0  # timeout of one heartbeat request to the store
GRACE_SECONDS = 2.0  # how long the main thread has to take up a loss before `abandon` is called
FINISHED = b"finished"


class Heartbeat:
    """Every process counts up its key in the job's store (torchrun's, on rank 0's node) each
    second and watches the other counts. A process whose count stops is lost: its host died or
    lost the network, or the process was killed. A store that stops answering means rank 0's
    node is lost. Collectives alone cannot say this: gloo reports a broken connection to an
    address, and a host that vanishes without closing its connections leaves a collective waiting
    for the process-group timeout (30 minutes by default), which must stay long because rank 0
    evaluates while the others wait.
    """

    def __init__(self, world: World, timeout: float,
                 abandon: Callable[[ClusterError], None] | None):
        self.world, self.timeout, self.abandon = world, timeout, abandon
        self.store_host = os.environ["MASTER_ADDR"]
        store = dist.TCPStore(self.store_host, int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=STORE_SECONDS))
        self._store = dist.PrefixStore("bit/heartbeat", store)
        self._store.set(f"where/{world.rank}", f"{world.node} {socket.gethostname()}")
        self._store.add(f"beat/{world.rank}", 1)
        now = time.monotonic()
        self._seen = {rank: (b"", now) for rank in range(world.size)}  # last count, when it changed
        # When the look before each count's last change was: the beat that changed it came later.
        self._after = {rank: -math.inf for rank in range(world.size)}
        self._answered = now  # when the store last answered
        self._where: list[str] = []
        self._failed_at: float | None = None
        self.lost: ClusterError | None = None
        self._stopping, self._found, self._claimed = (threading.Event() for _ in range(3))
        self._thread = threading.Thread(target=self._watch, name="heartbeat", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stopping.wait(BEAT_SECONDS):
            now = time.monotonic()
            try:
                self._beat(now)
            except dist.DistNetworkError:  # the store closed the connection: its host is gone
                self._answered = -math.inf
            except Exception:  # noqa: BLE001 - a store that does not answer is a finding
                pass
            self.lost = self._lost(now)
            if self.lost is not None:
                self._found.set()
                if not self._claimed.wait(GRACE_SECONDS) and self.abandon is not None:
                    self.abandon(self.lost)
                return

    def _beat(self, now: float) -> None:
        """Count up this process's key; note whose counts moved since the last look."""
        others = [rank for rank in range(self.world.size) if rank != self.world.rank]
        self._store.add(f"beat/{self.world.rank}", 1)
        counts = self._store.multi_get([f"beat/{rank}" for rank in others])
        self._where = self._where or [where.decode() for where in self._store.multi_get(
            [f"where/{rank}" for rank in range(self.world.size)])]
        before, self._answered = self._answered, now
        for rank, count in zip(others, counts):
            if count != self._seen[rank][0]:
                self._seen[rank] = (count, now)
                self._after[rank] = before

    def _lost(self, now: float) -> ClusterError | None:
        limit = min(self.timeout, CONFIRM_SECONDS) if self._failed_at else self.timeout
        fix = "run the stage again on every node: it resumes from the last checkpoint"
        if now - self._answered > limit:
            return ClusterError(f"lost {self._store_node()}: it stopped answering; {fix}")
        silent = [rank for rank, (count, seen) in self._seen.items()
                  if count != FINISHED and now - seen > limit and rank != self.world.rank]
        if not silent:
            return None
        return ClusterError(f"lost {self._name(silent)}: no sign of life for {limit:.0f} s; {fix}")

    def _store_node(self) -> str:
        """'node 0 (host a, with rank 0 and the job's store)': the node that holds the store
        (the rendezvous's first node, which is rank 0's unless the nodes chose their ranks)."""
        node = int(os.environ.get(STORE_NODE_ENV, "0"))
        hosts = [place.split(" ", 1)[1] for place in self._where if place.split(" ")[0] == str(node)]
        ranks = [rank for rank, place in enumerate(self._where) if place.split(" ")[0] == str(node)]
        holds = "rank 0 and the job's store" if 0 in ranks or not self._where else "the job's store"
        return f"node {node} (host {hosts[0] if hosts else self.store_host}, with {holds})"

    def _name(self, ranks: list[int]) -> str:
        """'node 1 (host b, ranks 8, 9)', node by node."""
        where = self._where or ["? ?"] * self.world.size  # (node, host) of each rank
        named = []
        for place in sorted({where[rank] for rank in ranks}):
            node, host = place.split(" ", 1)
            here = [str(rank) for rank in ranks if where[rank] == place]
            named.append(f"node {node} (host {host}, rank{'s' if len(here) > 1 else ''} "
                         f"{', '.join(here)})")
        return "; ".join(named)

    def explain(self) -> ClusterError | None:
        """After a collective failed: the lost processes that explain it, or None when every
        other process shows it is alive."""
        self._failed_at = time.monotonic()
        deadline = self._failed_at + CONFIRM_SECONDS + STORE_SECONDS + 2 * BEAT_SECONDS
        while not self._found.wait(BEAT_SECONDS / 4):
            # alive: a beat that surely came after the failure (one seen to change since a look
            # made after it; a change first seen after the failure may be a last beat before it)
            if all(count == FINISHED or self._after[rank] > self._failed_at
                   for rank, (count, _) in self._seen.items() if rank != self.world.rank) \
                    or time.monotonic() > deadline:
                return None
        self._claimed.set()
        return self.lost

    def stop(self, finished: bool) -> None:
        """Stop beating; `finished`: tell the others this process ended well, not lost."""
        self._claimed.set()
        self._stopping.set()
        if finished:
            with contextlib.suppress(Exception):
                self._store.set(f"beat/{self.world.rank}", FINISHED)


RENDEZVOUS = "c10d-fixed-nodes"  # torchrun's c10d rendezvous for a fixed set of nodes
# Where the nodes of one run meet, when whoever starts them (the Prefect flow) chooses it per run
# rather than in params.yaml, comes in the environment (contracts.ENDPOINT_ENV, RDZV_ID_ENV and
# NODE_RANK_ENV; rank 0's node holds global rank 0 and writes the outputs). They override
# train.rdzv_endpoint and train.rdzv_id; like those, they do not change what is trained.
STORE_NODE_ENV = "BIT_STORE_NODE"  # set for the workers: the node whose host holds the store
CLOSE_SECONDS = 10.0  # closing the rendezvous takes milliseconds; its host may be gone


def _rendezvous_handler(params):
    """torchrun's c10d rendezvous handler (same backend, same store), except that the agent
    leaves it alone while the workers run, and gives up closing it after CLOSE_SECONDS.

    torchrun's agent asks the rendezvous every monitor interval whether nodes are waiting to
    join, to restart the workers with them. The nodes here are fixed, a lost one is for the
    workers to find and name (:class:`Heartbeat`), and that question is where a vanished
    rendezvous host hurts: the store request fails and ends the agent, which then stops its
    workers before they can say which node was lost; or, when the host stops answering without
    closing the connection, the request can wait for ever (torch 2.14). A node that arrives while
    the workers run waits for the next run, up to its join timeout.
    """
    from torch.distributed.elastic.rendezvous import RendezvousHandler
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

    class FixedNodes(RendezvousHandler):
        def __init__(self, inner: RendezvousHandler):
            self.inner = inner

        @property
        def use_agent_store(self) -> bool:
            return self.inner.use_agent_store

        def num_nodes_waiting(self) -> int:
            return 0

        def shutdown(self) -> bool:
            closed = []
            closing = threading.Thread(target=lambda: closed.append(self.inner.shutdown()),
                                       daemon=True)
            closing.start()
            closing.join(CLOSE_SECONDS)
            return bool(closed and closed[0])

        def get_backend(self) -> str:
            return RENDEZVOUS

        def next_rendezvous(self):
            from torch.distributed.elastic.rendezvous import RendezvousInfo

            info = self.inner.next_rendezvous()
            ranks = agreed_node_ranks(info.store, info.rank, info.world_size, node_rank)
            os.environ[STORE_NODE_ENV] = str(ranks[0])  # inherited by the workers
            return RendezvousInfo(info.store, ranks[info.rank], info.world_size,
                                  info.bootstrap_store_info)

        def is_closed(self) -> bool:
            return self.inner.is_closed()

        def set_closed(self) -> None:
            self.inner.set_closed()

        def get_run_id(self) -> str:
            return self.inner.get_run_id()

    node_rank = params.get_as_int("node_rank")
    backend, store = create_backend(params)
    return FixedNodes(create_handler(store, backend, params))


def agreed_node_ranks(store, rank: int, nodes: int, wanted: int | None) -> list[int]:
    """The rank of each node (by the rank the rendezvous gave it): the ranks the nodes asked
    for (every node's `wanted`, shared through the rendezvous's `store`), or the rendezvous's
    own when none asked. Raises ClusterError when the nodes' wishes are not 0..nodes-1 once each.
    """
    store.set(f"bit/node-rank/{rank}", "" if wanted is None else str(wanted))
    asked = [value.decode() for value in store.multi_get(
        [f"bit/node-rank/{other}" for other in range(nodes)])]
    if not any(asked):
        return list(range(nodes))
    if sorted(asked) != sorted(str(node) for node in range(nodes)):
        raise ClusterError(f"the nodes asked for node ranks {', '.join(a or '-' for a in asked)}: "
                           f"give every node its own {NODE_RANK_ENV} from 0 to {nodes - 1}, "
                           "or none")
    return [int(value) for value in asked]


def meeting_place(cfg: TrainConfig, env=os.environ) -> tuple[str | None, str, int | None]:
    """(endpoint, rendezvous id, this node's rank or None) for `cfg.nodes` nodes: the
    environment's BIT_RDZV_* and BIT_NODE_RANK, else train.rdzv_endpoint and train.rdzv_id.
    Raises ClusterError for several nodes without an endpoint, or a malformed value."""
    endpoint = env.get(ENDPOINT_ENV) or cfg.rdzv_endpoint
    rdzv_id = env.get(RDZV_ID_ENV) or cfg.rdzv_id
    node_rank = env.get(NODE_RANK_ENV) or None
    if cfg.nodes > 1 and not endpoint:
        raise ClusterError(f"{cfg.nodes} nodes need a rendezvous endpoint: set train.rdzv_endpoint "
                           f"(or {ENDPOINT_ENV}) to host:port of one of the nodes, the same on "
                           "every node")
    if endpoint and endpoint != cfg.rdzv_endpoint:
        try:
            TrainConfig(**{**cfg.model_dump(), "rdzv_endpoint": endpoint})
        except ValueError:
            raise ClusterError(f"{ENDPOINT_ENV}={endpoint}: write it as host:port, e.g. "
                               "10.0.0.1:29400") from None
    if node_rank is not None and not (node_rank.isdigit() and int(node_rank) < cfg.nodes):
        raise ClusterError(f"{NODE_RANK_ENV}={node_rank}: give a node rank from 0 to "
                           f"{cfg.nodes - 1} (train.nodes is {cfg.nodes})")
    return endpoint, rdzv_id, None if node_rank is None else int(node_rank)


def launch(cfg: TrainConfig, argv: list[str]) -> dict[int, int]:
    """Run ``python <argv>`` as `cfg.processes` workers on this host, as torchrun does but with
    its agent in this process; return the exit codes of the workers that failed, by global rank
    (empty when all succeeded).

    With ``cfg.rdzv_endpoint`` the workers of `cfg.nodes` hosts, each running this with the same
    settings, meet in torchrun's c10d rendezvous there (``torchrun --nnodes --rdzv-backend=c10d
    --rdzv-endpoint --rdzv-id``, through :func:`_rendezvous_handler`): the node at the endpoint
    hosts it, and all wait up to ``cfg.join_timeout`` seconds for the others. The rendezvous
    numbers the nodes by host name, so rank 0, which alone writes, can be on any of them, unless
    each node asks for its rank (``BIT_NODE_RANK``, agreed in :func:`agreed_node_ranks`), as the
    flow's nodes do. :func:`meeting_place` says where they meet.
    Without an endpoint: ``torchrun --standalone``. Nothing is restarted (``--max-restarts=0``):
    a retry resumes from the checkpoint instead.

    How the agent stops workers (torch 2.14, ``torch/distributed/elastic``): each worker runs in
    a session of its own, so a signal sent to this process's group reaches the workers only
    through the agent. On SIGTERM, SIGINT, SIGHUP or SIGQUIT it sends the same signal to every
    worker's process group, SIGKILLs those still alive after its shutdown timeout
    (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30 s) and raises ``SignalException`` here.
    When one worker exits non-zero, it SIGTERMs the others, with the same timeout before
    SIGKILL. Those 30 s are what a stopped trainer has to finish its step and write the
    checkpoint. The flow waits longer than that before it SIGKILLs this process (it sets the
    timeout 5 s under its own ``BIT_STOP_GRACE``), so the agent is still there to kill workers
    that overrun.

    Raises:
        ClusterError: the nodes did not all join the rendezvous in time, it is unreachable, or
            its run has ended.
        torch.distributed.elastic.multiprocessing.SignalException: this process got one of the
            signals above (the workers were passed it and have exited, or were killed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import (RendezvousClosedError,
                                                      RendezvousConnectionError,
                                                      RendezvousTimeoutError,
                                                      rendezvous_handler_registry)
    from torch.distributed.run import parse_args, run

    endpoint, rdzv_id, node_rank = meeting_place(cfg)
    where = ["--standalone"]
    if endpoint:
        rendezvous_handler_registry.register(RENDEZVOUS, _rendezvous_handler)
        # read_timeout: how long a request to the rendezvous's store may take, and so how long
        # the others wait for the node at the endpoint to start (default 60 s).
        conf = f"join_timeout={cfg.join_timeout},read_timeout={cfg.join_timeout}"
        conf += "" if node_rank is None else f",node_rank={node_rank}"
        where = [f"--nnodes={cfg.nodes}", f"--rdzv-backend={RENDEZVOUS}",
                 f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}", f"--rdzv-conf={conf}"]
    meeting = f"rendezvous {rdzv_id!r} at {endpoint}"
    # The agent's log folder holds each worker's error file while it runs; without --log-dir it
    # would be a new torchelastic_* folder left in the temp folder by every run.
    logs = tempfile.TemporaryDirectory(prefix="bit-torchrun-", ignore_cleanup_errors=True)
    try:
        run(parse_args([*where, f"--nproc-per-node={cfg.processes}", "--max-restarts=0",
                        f"--log-dir={logs.name}", *argv]))
    except ChildFailedError as failed:
        return {rank: failure.exitcode for rank, failure in failed.failures.items()}
    except RendezvousTimeoutError:
        raise ClusterError(f"not all {cfg.nodes} nodes joined the {meeting} within "
                           f"{cfg.join_timeout} s: start this stage on every node with the same "
                           "train.nodes, train.rdzv_endpoint and train.rdzv_id, or raise "
                           "train.join_timeout") from None
    except RendezvousConnectionError:
        raise ClusterError(f"cannot reach the {meeting} within {cfg.join_timeout} s: start "
                           "the stage on the node at train.rdzv_endpoint too (it holds the "
                           "rendezvous), and check that host:port is that node's and reachable "
                           "from here") from None
    except RendezvousClosedError:
        raise ClusterError(f"the {meeting} is closed: its run has ended; start every node "
                           "again, or set another train.rdzv_id") from None
    finally:
        logs.cleanup()
    return {}
