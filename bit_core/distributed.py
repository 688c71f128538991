"""Multi-process data-parallel training (torchrun + DDP): gloo on CPU, nccl on CUDA, hccl on NPU.

Each process reads its own slice of every micro-batch (see ``bit_core.train``), so N processes
on a global batch B compute the same averaged gradient as one process on B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

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
    return World(dist.get_rank(), dist.get_world_size(), local_rank), device


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


def launch(processes: int, argv: list[str]) -> dict[int, int]:
    """Run ``python <argv>`` as `processes` workers on this host, as ``torchrun --standalone``
    does but with its agent in this process; return the exit codes of the workers that failed,
    by rank (empty when all succeeded).

    How the agent stops workers (torch 2.14, ``torch/distributed/elastic``): each worker runs in
    a session of its own, so a signal sent to this process's group reaches the workers only
    through the agent. On SIGTERM, SIGINT, SIGHUP or SIGQUIT it sends the same signal to every
    worker's process group, SIGKILLs those still alive after its shutdown timeout
    (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``, default 30 s) and raises ``SignalException`` here.
    When one worker exits non-zero, it SIGTERMs the others, with the same timeout before
    SIGKILL. Those 30 s are what a stopped trainer has to finish its step and write the
    checkpoint; the flow waits longer than that (``BIT_STOP_GRACE``) before it SIGKILLs this
    process, so the agent is still there to kill workers that overrun.

    Raises:
        torch.distributed.elastic.multiprocessing.SignalException: this process got one of the
            signals above (the workers were passed it and have exited, or were killed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(["--standalone", f"--nproc-per-node={processes}", *argv]))
    except ChildFailedError as failed:
        return {rank: failure.exitcode for rank, failure in failed.failures.items()}
    return {}
