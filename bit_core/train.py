"""Fine-tuning loop: SGD with momentum, BiT-HyperRule schedule, mixup, gradient accumulation.

Every random choice is a pure function of (seed, step): the images of a step, their
augmentation and the mixup draw. A run resumed from a checkpoint at step k therefore continues
exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bit_core.config import TrainConfig
from bit_core.data import check_loader_workers
from bit_core.device import DeviceError, autocast, resolve_precision
from bit_core.hyperrule import get_lr, get_mixup, get_schedule
from bit_core.io import atomic_torch_save
from bit_core.errors import Diverged, Interrupted

StepCallback = Callable[[dict], None]
log = logging.getLogger("bit")

# Train settings that change how a run is watched, stopped or executed, not what it computes: a
# checkpoint written under other values of these still resumes. The number of processes and
# hosts is among them: the global batch and its per-image randomness do not depend on them (with
# mixup they do, see Trainer.resumes).
RESUME_NEUTRAL = frozenset({"stop_after", "eval_every", "checkpoint_every", "workers", "compile",
                            "processes", "nodes", "rdzv_endpoint", "rdzv_id", "join_timeout",
                            "peer_timeout"})


def optimizer_kernel(device: torch.device) -> dict:
    """The fastest SGD implementation for `device`: one fused kernel over all parameters where
    PyTorch has it (CPU and CUDA; 2.6x faster than the per-parameter loop for R50x1 on CPU),
    else the multi-tensor path."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}


# torch.compile's first step costs minutes on a CPU (about 2.5 for R50x1 at 128 px, cold); then a
# step is faster: on an AMX CPU in bf16 channels_last 1.1-1.2x eager for bit_core at 128 px,
# batch 32, in the bench runs of 2026-11 (bench/results holds the latest), inductor fusing the
# ReLUs, the residual additions and the weight standardisation around GroupNorm that eager runs
# as separate kernels (GroupNorm itself compiles to slower code than eager's).
# Below this many steps the compile time is not repaid, so "auto" leaves it off.
COMPILE_MIN_STEPS = 2000


def resolve_compile(setting: bool | None, device: torch.device, steps: int) -> bool:
    """Whether to torch.compile the training step: as set, or for long runs on cpu/cuda.

    NPUs compile through TorchAir, which is not part of every torch_npu install, so ``auto``
    never picks it; ask for it with ``train.compile: true``.
    """
    if setting is not None:
        return setting
    return device.type in ("cpu", "cuda") and steps >= COMPILE_MIN_STEPS


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` compiled with the device's graph compiler: inductor, or TorchAir's on an NPU."""
    if device.type != "npu":
        return torch.compile(model, dynamic=False)
    try:
        import torchair
    except ImportError:
        raise DeviceError("train.compile on an NPU needs TorchAir (torchair, shipped with recent "
                          "torch_npu releases): install it or set train.compile: false") from None
    backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    return torch.compile(model, backend=backend, dynamic=False)


@dataclass(frozen=True)
class Plan:
    """The resolved fine-tuning recipe (HyperRule defaults with params.yaml overrides)."""

    schedule: list[int]
    mixup_alpha: float
    lr: float  # peak learning rate
    micro_batch: int

    @property
    def steps(self) -> int:
        return self.schedule[-1]


def make_plan(cfg: TrainConfig, dataset_size: int) -> Plan:
    """Resolve schedule, mixup and learning rate for a training set of `dataset_size` images."""
    schedule = cfg.schedule or get_schedule(dataset_size)
    mixup = get_mixup(dataset_size) if cfg.mixup_alpha is None else cfg.mixup_alpha
    return Plan(list(schedule), mixup, cfg.base_lr * cfg.batch / 512, cfg.batch // cfg.batch_split)


def _mix_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class _SeededItems(Dataset):
    """Wraps a dataset so item (index, seed) is transformed under its own RNG seed."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class _StepBatches:
    """Batch sampler: micro-batches of (index, seed) for steps start..end, shuffled per epoch."""

    def __init__(self, size: int, plan: Plan, batch: int, seed: int, start: int, end: int,
                 rank: int = 0, world: int = 1):
        self.size, self.plan, self.batch, self.seed = size, plan, batch, seed
        self.start, self.end, self.rank, self.world = start, end, rank, world

    def _indices(self, first: int, count: int) -> np.ndarray:
        """Positions first..first+count of the endless stream of per-epoch permutations."""
        out = []
        while count > 0:
            epoch, offset = divmod(first, self.size)
            perm = np.random.default_rng(_mix_seed(self.seed, epoch)).permutation(self.size)
            take = perm[offset:offset + count]
            out.append(take)
            first += len(take)
            count -= len(take)
        return np.concatenate(out)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro = self.plan.micro_batch // self.world
        for step in range(self.start, self.end):
            indices = self._indices(step * self.batch, self.batch)
            for m in range(self.batch // self.plan.micro_batch):
                lo = m * self.plan.micro_batch + self.rank * micro
                yield [(int(i), _mix_seed(self.seed, step, lo + j))
                       for j, i in enumerate(indices[lo:lo + micro])]

    def __len__(self) -> int:
        return (self.end - self.start) * (self.batch // self.plan.micro_batch)


def mixup_lambda(alpha: float, seed: int, step: int) -> float:
    """One mixup coefficient per optimizer step (1.0 = no mixing)."""
    if alpha <= 0:
        return 1.0
    return float(np.random.default_rng(_mix_seed(seed, step, 1)).beta(alpha, alpha))


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    step: int = 0
    history: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (restored on exit)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _stop_signals_held():
    """Hold SIGINT/SIGTERM back from this thread while the block runs (they arrive after it).

    Processes forked meanwhile inherit the blocked mask and keep it: DataLoader workers, which a
    stop sent to the whole process group (Ctrl-C, the flow's SIGTERM, torchrun passing one on)
    would otherwise kill, failing the loader ("DataLoader worker ... is killed by signal")
    before the trainer could checkpoint. They leave when the trainer shuts them down, or when
    it is gone.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@dataclass
class Trainer:
    """Fine-tunes `model` on `train_set` following `cfg`.

    Args:
        model: the network, already on `device`.
        train_set: a dataset returning (image tensor, label) with the training transform.
        cfg: the train section of params.yaml.
        device: where to run.
        checkpoint_meta: extra self-description stored in every checkpoint (model name, classes).
        evaluate: called as evaluate(model) -> dict of metrics every cfg.eval_every steps.
        on_step: called with each step's record (step, loss, lr, images_per_s).
    """

    model: nn.Module
    train_set: Dataset
    cfg: TrainConfig
    device: torch.device
    checkpoint_meta: dict = field(default_factory=dict)
    evaluate: Callable[[nn.Module], dict] | None = None
    on_step: StepCallback | None = None
    on_eval: StepCallback | None = None
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        check_loader_workers(self.cfg.workers)
        self.plan = make_plan(self.cfg, len(self.train_set))
        if self.plan.micro_batch % self.world:
            raise ValueError(f"micro-batch {self.plan.micro_batch} (batch / batch_split) is not "
                             f"divisible by {self.world} processes: change train.batch")
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0, momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay,
                                         **optimizer_kernel(self.device))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.state = TrainState()
        self.compiled = resolve_compile(self.cfg.compile, self.device, self._end())
        # Checkpoints and evaluation use self.model; only the training forward is compiled.
        self._net = compile_model(self.model, self.device) if self.compiled else self.model

    def _end(self, until: int | None = None) -> int:
        """The step a fit stops at: `until`, else cfg.stop_after, within the schedule."""
        return min(until or self.cfg.stop_after or self.plan.steps, self.plan.steps)

    def resumes(self, checkpoint: dict) -> str | None:
        """Why `checkpoint` cannot continue this run, or None when it can: it must come from the
        same recipe (RESUME_NEUTRAL settings aside) and the same checkpoint_meta (model, classes,
        resolution, data and starting weights)."""
        recipe = {k: v for k, v in self.cfg.model_dump().items() if k not in RESUME_NEUTRAL}
        saved = {k: v for k, v in checkpoint.get("config", {}).items() if k not in RESUME_NEUTRAL}
        changed = sorted({k for k in recipe.keys() | saved.keys() if recipe.get(k) != saved.get(k)})
        changed += [k for k, v in self.checkpoint_meta.items() if checkpoint.get(k) != v]
        # Mixup pairs the images of each process's share of a micro-batch among themselves.
        if self.plan.mixup_alpha > 0 and checkpoint.get("world", 1) != self.world:
            changed.append(f"processes in all ({checkpoint.get('world', 1)}, which pair images "
                           "for mixup)")
        return f"it was written with other {', '.join(changed)}" if changed else None

    def resume(self, path: Path | None) -> bool:
        """Continue from an interrupted run's checkpoint at `path` when :meth:`resumes` allows.

        With several processes all continue from the same checkpoint: the latest any of them
        can resume from, sent to the others (only rank 0 writes checkpoints, so on several hosts
        the others have none)."""
        local = None
        if path is not None and Path(path).is_file():
            try:
                local = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - cut short (a copy killed midway), or not ours
                first = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
                refusal = f"it cannot be read ({type(err).__name__}: {first})"
            else:
                refusal = self.resumes(local) if isinstance(local, dict) else "it is no checkpoint"
            if refusal:
                log.info("not resuming from %s: %s; training from the start", path, refusal)
                local = None
        checkpoint = self._shared(local) if self.world > 1 else local
        if checkpoint is None:
            return False
        self.load_state_dict(checkpoint)
        if checkpoint is local:
            log.info("resuming from step %d of %s", self.state.step, path)
        return True

    def _shared(self, checkpoint: dict | None) -> dict | None:
        """The latest of the processes' checkpoints (rank order breaks ties), on every process."""
        marks = [None] * self.world  # (step, digest of the losses that led there)
        dist.all_gather_object(marks, (checkpoint["step"], hashlib.sha256(
            repr(checkpoint["history"]).encode()).hexdigest()) if checkpoint else (-1, ""))
        source = max(range(self.world), key=lambda rank: (marks[rank][0], -rank))
        if marks[source][0] < 0 or len(set(marks)) == 1:
            return checkpoint  # none anywhere, or one file all read (one host)
        log.info("continuing from rank %d's checkpoint of step %d", source, marks[source][0])
        shared = [checkpoint]
        dist.broadcast_object_list(shared, src=source)
        return shared[0]

    def state_dict(self) -> dict:
        """A self-describing checkpoint of the run so far."""
        model = getattr(self.model, "module", self.model)
        return {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.state.step,
                "schedule": self.plan.schedule, "history": self.state.history,
                "evals": self.state.evals, "torch_rng": torch.get_rng_state(),
                "config": self.cfg.model_dump(), "world": self.world, **self.checkpoint_meta}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore a checkpoint written by :meth:`state_dict`."""
        getattr(self.model, "module", self.model).load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        torch.set_rng_state(checkpoint["torch_rng"])
        self.state = TrainState(checkpoint["step"], list(checkpoint["history"]),
                                list(checkpoint["evals"]))

    def save(self, path: Path) -> None:
        if self.rank == 0:
            atomic_torch_save(self.state_dict(), path)

    def _loader(self, until: int) -> DataLoader:
        sampler = _StepBatches(len(self.train_set), self.plan, self.cfg.batch, self.cfg.seed,
                               self.state.step, until, self.rank, self.world)
        return DataLoader(_SeededItems(self.train_set), batch_sampler=sampler,
                          num_workers=self.cfg.workers, persistent_workers=False,
                          pin_memory=self.device.type == "cuda")

    def _forward_loss(self, images, labels, lam: float, step: int, micro: int) -> torch.Tensor:
        if lam < 1.0:
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
                _mix_seed(self.cfg.seed, step, micro, 2))).to(self.device)
            images = lam * images + (1 - lam) * images[perm]
        with autocast(self.device, self.precision):
            logits = self._net(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, labels)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * F.cross_entropy(logits, labels[perm])
        return loss

    def _mean_across_processes(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def _maybe_no_sync(self, last_micro_batch: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro_batch or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _channels_last(self) -> bool:
        """As set; else on for cuda/npu, and on a CPU training in bf16, whose convolutions
        (oneDNN on AMX) and 1x1 products want the channels innermost."""
        if self.cfg.channels_last is not None:
            return self.cfg.channels_last
        return self.device.type in ("cuda", "npu") or self.precision == "bf16"

    def fit(self, checkpoint_path: Path | None = None, until: int | None = None) -> TrainState:
        """Train from the current state to step `until` (default: cfg.stop_after, else the end
        of the schedule). The schedule is the same whatever `until` is.

        Evaluates every cfg.eval_every steps and at `until`; checkpoints every
        cfg.checkpoint_every steps, on SIGINT/SIGTERM, and at the end. A stop signal to any of
        several processes stops them all after the same step.
        """
        until = self._until = self._end(until)
        accumulate = self.cfg.batch // self.plan.micro_batch
        # Only the images are laid out channels_last; the activations follow them. The weights stay
        # as they are: every convolution standardises its kernel first (a layer norm, which
        # wants it contiguous), and oneDNN reorders kernels to its own blocked layout anyway, so
        # channels_last kernels would only add copies each step (and evaluation, which runs
        # contiguous, would swap the parameters' layout back and forth).
        memory_format = torch.channels_last if self._channels_last() else torch.contiguous_format
        self.model.train()
        micro, loss_sum, tick = 0, 0.0, time.perf_counter()
        with _StopFlag() as stop:
            with _stop_signals_held():  # the loader's workers start here
                batches = iter(self._loader(until))
            for images, labels in batches:
                step = self.state.step
                lr = get_lr(step, self.cfg.base_lr, self.cfg.batch, self.plan.schedule)
                _set_lr(self.optimizer, lr)
                lam = mixup_lambda(self.plan.mixup_alpha, self.cfg.seed, step)
                images = images.to(self.device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(self.device, non_blocking=True)
                last = micro + 1 == accumulate
                with self._maybe_no_sync(last):
                    loss = self._forward_loss(images, labels, lam, step, micro) / accumulate
                    self.scaler.scale(loss).backward()
                loss_sum += loss.item()
                micro += 1
                if micro < accumulate:
                    continue
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.world > 1:
                    loss_sum = self._mean_across_processes(loss_sum)
                self.optimizer.zero_grad(set_to_none=True)
                now = time.perf_counter()
                record = {"step": step + 1, "loss": loss_sum, "lr": lr,
                          "images_per_s": self.cfg.batch / max(now - tick, 1e-9)}
                micro, loss_sum, tick = 0, 0.0, now
                self.state.step = step + 1
                self.state.history.append(record)
                if not math.isfinite(record["loss"]):
                    fp32 = "" if self.precision == "fp32" else " or set train.precision: fp32"
                    raise Diverged(f"loss is {record['loss']} at step {step + 1}: lower "
                                   f"train.base_lr{fp32}")
                if self.on_step and self.rank == 0:
                    self.on_step(record)
                self._maybe_evaluate()
                self._maybe_checkpoint(checkpoint_path, self._agreed_stop(stop.signal))
        if checkpoint_path is not None:
            self.save(checkpoint_path)
        return self.state

    def _maybe_evaluate(self) -> None:
        step = self.state.step
        if self.evaluate is None or (step % self.cfg.eval_every and step != self._until):
            return
        with _stop_signals_held():  # its data loader's workers start in there
            metrics = {"step": step, **self.evaluate(self.model)}
        self.model.train()
        self.state.evals.append(metrics)
        if self.on_eval and self.rank == 0:
            self.on_eval(metrics)

    def _agreed_stop(self, local_signal: int | None) -> int | None:
        """The stop signal any process got (the highest number if several did), else None.

        A signal may reach one process only (say, a rank stopped by hand): all of them must still
        leave at the same step, or the others wait forever in the next gradient all-reduce.
        """
        if self.world == 1:
            return local_signal
        flag = torch.tensor([local_signal or 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None

    def _maybe_checkpoint(self, path: Path | None, stop_signal: int | None) -> None:
        every = self.cfg.checkpoint_every
        if path is not None and (stop_signal is not None or (every and self.state.step % every == 0)):
            self.save(path)
        if stop_signal is not None:
            if self.world > 1:
                # Rank 0 alone writes the checkpoint; the others wait for it here, because the
                # first rank to exit makes torchrun's agent stop the rest (see distributed.launch).
                dist.barrier()
            raise Interrupted(f"stopped by signal {stop_signal} at step {self.state.step}; "
                              f"checkpoint written to {path}")
