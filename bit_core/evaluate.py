"""Accuracy (top-1/top-5) and speed (images/s, latency percentiles) of any back-end.

A back-end is just a function from a float32 NCHW batch (numpy) to logits (numpy), so PyTorch
(eager or compiled), ONNX Runtime, OpenVINO and an Ascend OM are measured by the same code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from bit_core.device import autocast

Predict = Callable[[np.ndarray], np.ndarray]


def torch_predictor(model: nn.Module, device: torch.device, precision: str = "fp32",
                    channels_last: bool = False) -> Predict:
    """Wrap a model as a numpy -> numpy predictor (eval mode, no grad, optional autocast)."""
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)

    @torch.inference_mode()
    def predict(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device, memory_format=memory_format)
        with autocast(device, precision):
            logits = model(x)
        return logits.float().cpu().numpy()

    return predict


def compiled_predictor(model: nn.Module, device: torch.device, precision: str) -> Predict:
    """torch.compile (inductor) with the weights frozen into the graph as constants
    (``freezing``, what lets inductor pre-pack them for oneDNN/AMX), channels_last, under
    autocast at `precision`. One static graph per batch size: the first call at each size
    compiles (~20 s for R50x1 on 2 cores); dynamic shapes compiled slower and ran slower here."""
    import torch._inductor.config as inductor_config

    model = model.eval().to(device, memory_format=torch.channels_last)
    inner = torch_predictor(torch.compile(model, dynamic=False), device, precision,
                            channels_last=True)

    def predict(batch: np.ndarray) -> np.ndarray:
        with inductor_config.patch(freezing=True):
            return inner(batch)

    return predict


def onnx_predictor(session, input_name: str = "image", output_name: str = "logits") -> Predict:
    """Wrap an ONNX Runtime session as a predictor."""

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: batch})[0]

    return predict


def zero_padded(batch: np.ndarray, size: int) -> np.ndarray:
    """`batch` with zero images appended up to `size` images (`batch` itself when not shorter)."""
    missing = size - len(batch)
    if missing <= 0:
        return batch
    return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])


def padded_predictor(predict: Predict, size: int) -> Predict:
    """`predict` fed batches of exactly `size` images (a shorter one padded with zeros, its
    logits cut back): one input shape, so a compiled graph per shape is built once."""

    def run(batch: np.ndarray) -> np.ndarray:
        return predict(zero_padded(batch, size))[:len(batch)]

    return run


def predict_all(predict: Predict, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Run a predictor over (images, labels) batches; return (logits, labels)."""
    logits, labels = [], []
    for images, targets in batches:
        logits.append(predict(images.numpy().astype(np.float32, copy=False)))
        labels.append(targets.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5)
                  ) -> dict[str, float]:
    """Top-k accuracy in percent for each k (k capped at the number of classes)."""
    order = np.argsort(-logits, axis=1)
    result = {}
    for k in ks:
        hits = (order[:, :min(k, logits.shape[1])] == labels[:, None]).any(axis=1)
        result[f"top{k}"] = float(100.0 * hits.mean())
    return result


def confusion_matrix(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, logits.argmax(axis=1)), 1)
    return counts


def cpu_used_elsewhere() -> Callable[[], float]:
    """Start watching the host's CPUs; the function returned gives the share of their time, in
    percent, that went to anything but this process since: other processes, and on a virtual
    machine the time the hypervisor gave to other guests (steal). Timings taken while it is high
    are slower than the host can do."""
    import psutil

    me = psutil.Process()

    def busy() -> float:  # guest time is counted in user time already
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - \
            getattr(t, "guest_nice", 0.0)

    def own() -> float:
        t = me.cpu_times()
        return t.user + t.system

    start, all_busy, mine = time.monotonic(), busy(), own()

    def share() -> float:
        capacity = (time.monotonic() - start) * (psutil.cpu_count() or 1)
        elsewhere = (busy() - all_busy) - (own() - mine)
        return min(100.0, max(0.0, 100.0 * elsewhere / capacity)) if capacity > 0 else 0.0

    return share


def measure_speed(predict: Predict, batch_size: int, resolution: int, *, warmup: int = 2,
                  repeats: int = 5, seed: int = 0) -> dict[str, float]:
    """Images/s from the median latency of `repeats` timed batches, after `warmup` untimed ones."""
    batch = np.random.default_rng(seed).uniform(-1, 1, (batch_size, 3, resolution, resolution))
    batch = batch.astype(np.float32)
    for _ in range(warmup):
        predict(batch)
    latencies = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(batch)
        latencies.append(time.perf_counter() - start)
    p50 = statistics.median(latencies)
    return {"batch": batch_size, "fps": batch_size / p50, "latency_ms_p50": 1e3 * p50,
            "latency_ms_p99": 1e3 * float(np.percentile(latencies, 99))}
