"""Section 5: data-loading images/s against what training consumes, per image size.

For each size (CIFAR-10: 32x32 PNGs, BiT precrop 160 / crop 128; ImageNet: ~400x350 JPEGs,
precrop 512 / crop 480) a few hundred images with seeded random content are written to a
temporary class-folder tree and read through the project's own path: ``scan_folder``,
``ImageListDataset`` with ``train_transform(precrop, crop, flip)``, and the DataLoader that
``Trainer`` iterates (``Trainer._loader``: ``_SeededItems`` items under a ``_StepBatches`` batch
sampler, ``train.workers`` worker processes). Each round builds a fresh loader, as every
``Trainer.fit`` does, and reads a fixed number of batches (the sampler cycles through the
images epoch after epoch). Its images/s are those of the steady part, the round's second half
(a training run keeps its loader for all its steps); the whole round, start-up included, is
reported too. ``cache=False`` decodes every
image (every epoch of a large data set);
``cache=True`` keeps the decoded images in memory, filled before the loader starts (the
fine-tune stage caches small data sets, so from their second epoch on).

Training consumption: ``Trainer.fit`` of bit_core R50x1 fp32, one step per round, on images
already transformed and held in memory (so the step is the model's work alone). Loader rounds
and training steps take turns (interleaved), so machine load hits both alike; headroom =
loader images/s / training images/s (> 1: loading produces images faster than training uses
them, given cores of its own).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bench import models
from bench.timing import interleaved, summary
from bit_core.config import TrainConfig
from bit_core.data import ImageListDataset, train_transform
from bit_core.splits import scan_folder
from bit_core.train import Trainer

CPU = torch.device("cpu")
CLASSES = 10
SCHEDULE = [1, 1_000_000]  # never reached: the rounds only need the sampler's first steps


def worker_counts(cores: int) -> tuple[int, ...]:
    """Loader worker counts to measure: none, one, two, and all usable cores."""
    return tuple(sorted({w for w in (0, 1, 2, cores) if w <= max(cores, 1)}))


def write_images(root: Path, count: int, size: tuple[int, int], fmt: str, seed: int) -> list[int]:
    """`count` seeded random images in `CLASSES` class folders under `root`; their byte sizes.

    PNG: uniform noise at exactly `size` (CIFAR's 32x32 PNGs hold about as many bytes). JPEG:
    smooth colour fields plus grain, each side within ±12% of `size`, quality 90, so files and
    decode times resemble photographs rather than incompressible noise.
    """
    rng = np.random.default_rng(seed)
    sizes = []
    for index in range(count):
        folder = root / f"class{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "PNG":
            width, height = size
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            path = folder / f"{index:05d}.png"
            Image.fromarray(pixels).save(path)
        else:
            width, height = (int(s * rng.uniform(0.88, 1.12)) for s in size)
            coarse = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3),
                                  dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
            grain = rng.integers(-12, 13, (height, width, 3))
            pixels = np.clip(smooth.astype(np.int16) + grain, 0, 255).astype(np.uint8)
            path = folder / f"{index:05d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return sizes


class _InMemory(Dataset):
    """Pre-transformed (image, label) pairs: training reads them at no loading cost."""

    def __init__(self, items: list[tuple[torch.Tensor, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


def _config(batch: int, workers: int) -> TrainConfig:
    return TrainConfig(batch=batch, workers=workers, seed=0, schedule=SCHEDULE, precision="fp32",
                       compile=False, mixup_alpha=0.0, channels_last=False)


def loader_trainer(dataset: Dataset, batch: int, workers: int) -> Trainer:
    """A Trainer whose DataLoader is the one under test (its model does not touch the data)."""
    return Trainer(torch.nn.Linear(1, 1), dataset, _config(batch, workers), CPU)


def loader_round(trainer: Trainer, steps: int, record: dict) -> Callable[[], float]:
    """Read `steps` batches through a fresh ``Trainer._loader``; return the seconds of its
    steady part, the second half of the batches (from the arrival of batch steps//2 to the
    last): worker start-up, the first wave of batches and the workers' head start on their
    prefetched batches all fall in the first half.

    `record` collects each whole round's seconds, the wait for the first batch and the shape
    of a batch.
    """
    expected, half = steps * trainer.cfg.batch, steps // 2
    if half < 1:
        raise ValueError(f"{steps} batch per round: need at least 2")

    def run() -> float:
        start = time.perf_counter()
        arrivals, count = [], 0
        for images, labels in trainer._loader(steps):
            arrivals.append(time.perf_counter())
            record["batch_shape"] = list(images.shape)
            count += len(labels)
        if count != expected:
            raise RuntimeError(f"loader gave {count} images, expected {expected}")
        record.setdefault("round_s", []).append(arrivals[-1] - start)
        record.setdefault("first_batch_s", []).append(arrivals[0] - start)
        return arrivals[-1] - arrivals[half - 1]

    return run


def train_step(trainer: Trainer) -> Callable[[], float]:
    """Seconds of one ``Trainer.fit`` step (forward, backward, fused SGD)."""

    def run() -> float:
        start = time.perf_counter()
        trainer.fit(until=trainer.state.step + 1)
        return time.perf_counter() - start

    return run


def _per_round(rates_num: list[float], rates_den: list[float]) -> list[float] | None:
    pairs = [a / b for a, b in zip(rates_num, rates_den) if b > 0]
    return [round(min(pairs), 3), round(max(pairs), 3)] if pairs else None


def measure_size(name: str, spec: dict, seed: int, settings, root: Path,
                 log) -> tuple[dict, list[dict]]:
    """One image size: its loader configurations and training, interleaved; rows and ratios."""
    folder = root / name
    sizes = write_images(folder, settings.data_images, tuple(spec["source"]), spec["format"],
                         seed)
    samples, _ = scan_folder(folder)
    transform = train_transform(spec["precrop"], spec["crop"], flip=True)
    batch, steps = settings.data_batch, spec["batches"]

    fns: dict[str, Callable[[], float]] = {}
    loaders: dict[str, dict] = {}
    records: dict[str, dict] = {}
    for cache in spec["cache"]:
        dataset = ImageListDataset(folder, samples, transform, cache=cache)
        for index in range(len(dataset)):  # warms the file cache; fills the image cache
            dataset[index]
        for workers in settings.data_workers:
            key = f"{name}, {workers} workers, {'cached' if cache else 'decoded'}"
            records[key] = {}
            fns[key] = loader_round(loader_trainer(dataset, batch, workers), steps, records[key])
            loaders[key] = {"workers": workers, "cache": cache, "images": steps * batch,
                            "steady_images": (steps - steps // 2) * batch}

    train_batch = spec["train_batch"]
    pool = ImageListDataset(folder, samples, transform)
    items = [pool[i % len(pool)] for i in range(train_batch)]
    trainer = Trainer(models.bit_model(), _InMemory(items), _config(train_batch, 0), CPU)
    train_key = f"bit_core fp32 training, {spec['crop']} px, batch {train_batch}"
    start = time.perf_counter()
    train_step(trainer)()  # warm-up
    log(f"  {name}: {len(samples)} {spec['format']} images ({np.mean(sizes) / 1e3:.1f} kB on "
        f"average), {spec['precrop']}/{spec['crop']} px; first training step "
        f"{time.perf_counter() - start:.1f} s; {len(fns)} loaders + training x "
        f"{settings.data_repeats} rounds")
    fns[train_key] = train_step(trainer)
    samples_s = interleaved(fns, settings.data_repeats)
    del trainer, fns

    train = {"name": train_key, "batch": train_batch, **summary(samples_s[train_key])}
    train["img_s"] = train_batch / train["median_s"]
    train_rates = [train_batch / s for s in samples_s[train_key]]
    rows, ratios = [], []
    for key, row in loaders.items():
        stats = summary(samples_s[key])
        record = records[key]
        round_s = float(np.median(record["round_s"]))
        row.update({"name": key, "img_s": row["steady_images"] / stats["median_s"],
                    "round_s": round_s, "round_img_s": row["images"] / round_s,
                    "first_batch_s": float(np.median(record["first_batch_s"])),
                    "batch_shape": record["batch_shape"], **stats})
        row["headroom"] = row["img_s"] / train["img_s"]
        rows.append(row)
        mode = "cached" if row["cache"] else "decoded"
        ratios.append({
            "name": f"data loading / training, {name} ({spec['crop']} px), {row['workers']} "
                    f"workers, {mode}",
            "numerator": f"loader {key}", "denominator": train_key,
            "numerator_value": row["img_s"], "denominator_value": train["img_s"],
            "value": row["img_s"] / train["img_s"], "metric": "img_s",
            "per_round_range": _per_round([row["steady_images"] / s for s in samples_s[key]],
                                          train_rates),
            "size": name, "workers": row["workers"], "cache": row["cache"]})
        log(f"    {key}: {row['img_s']:.0f} img/s steady, {row['round_img_s']:.0f} img/s with "
            f"start-up (first batch {row['first_batch_s']:.2f} s), headroom "
            f"{row['headroom']:.1f}x")
    log(f"    {train_key}: {train['img_s']:.2f} img/s")
    return {"name": name, "format": spec["format"], "source": list(spec["source"]),
            "images": len(samples), "mean_file_kb": float(np.mean(sizes)) / 1e3,
            "precrop": spec["precrop"], "crop": spec["crop"], "loader_batch": batch,
            "batches_per_round": steps, "loaders": rows, "train": train}, ratios


def run(settings, log) -> dict:
    sizes, ratios = [], []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for seed, (name, spec) in enumerate(settings.data_sizes.items()):
            size, size_ratios = measure_size(name, spec, seed, settings, Path(tmp), log)
            sizes.append(size)
            ratios += size_ratios
    for r in ratios:
        if not (math.isfinite(r["value"]) and r["value"] > 0):
            raise RuntimeError(f"{r['name']}: ratio {r['value']}")
    return {"model": models.MODEL, "precision": "fp32", "workers": list(settings.data_workers),
            "rounds": settings.data_repeats, "torch_threads": torch.get_num_threads(),
            "sizes": sizes, "ratios": ratios}
