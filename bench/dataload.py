"""The `data` section: data-loading images/s against training images/s, per image size.

For each size (CIFAR-10: 32x32 PNGs, BiT precrop 160 / crop 128; ImageNet: ~400x350 JPEGs,
precrop 512 / crop 480) seeded images are written to a class-folder tree and read the product's
way: ``scan_folder``, ``ImageListDataset`` with ``train_transform`` and the DataLoader that
``Trainer`` builds (``train.workers`` processes), every image decoded as in any epoch of a large
data set. Each round builds a fresh loader, as every ``Trainer.fit`` does; its images/s are those
of the second half of the round's batches (worker start-up and prefetching fall in the first).
Training is bit_core fp32 through ``Trainer`` at the same crop on an in-memory batch. Loader
rounds and training steps take turns; headroom = loader images/s / training images/s.
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.measure import CPU, interleaved, ratio, row
from bench.training import step, trainer
from bit_core.config import TrainConfig
from bit_core.data import ImageListDataset, train_transform
from bit_core.splits import scan_folder
from bit_core.train import Trainer

CLASSES = 10


def write_images(root: Path, count: int, size: tuple[int, int], fmt: str, seed: int) -> None:
    """`count` images of `size` in class folders: smooth colour fields plus grain, so that files
    and decode times resemble photographs rather than incompressible noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    for index in range(count):
        coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))
        grain = rng.integers(-12, 13, (height, width, 3))
        pixels = np.clip(smooth + grain, 0, 255).astype(np.uint8)
        folder = root / f"class{index % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.{fmt.lower()}", quality=90)


def loader_round(loader: Trainer, batches: int) -> float:
    """Seconds from the arrival of batch batches//2 to the last, through a fresh loader."""
    arrivals = []
    for _images, _labels in loader._loader(batches):
        arrivals.append(time.perf_counter())
    return arrivals[-1] - arrivals[batches // 2 - 1]


def measure_size(name: str, spec: dict, root: Path, settings, log) -> tuple[dict, list[dict]]:
    """Loaders (0 workers, and one per core) and training at the crop, interleaved; rows and
    the ratio of each loader to training."""
    folder = root / name
    write_images(folder, settings.data_images, spec["source"], spec["format"], len(name))
    dataset = ImageListDataset(folder, scan_folder(folder)[0],
                               train_transform(spec["precrop"], spec["crop"]))
    batch, batches = settings.data_batch, spec["batches"]
    fns, images = {}, {}
    for workers in settings.data_workers:
        cfg = TrainConfig(batch=batch, workers=workers, schedule=[1, 10**6], mixup_alpha=0.0)
        key = f"{name} loader, {workers} workers"
        fns[key] = partial(loader_round, Trainer(torch.nn.Linear(1, 1), dataset, cfg, CPU),
                           batches)
        images[key] = (batches - batches // 2) * batch
    train = trainer("bit_core", spec["train_batch"], spec["crop"])
    step(train)  # warm-up
    key = f"{name} training, bit_core fp32, {spec['crop']} px"
    fns[key], images[key] = partial(step, train), spec["train_batch"]
    log(f"  {name}: {len(fns)} variants x {settings.data_rounds} rounds")
    samples = interleaved(fns, settings.data_rounds)
    rows = {k: row(s, images[k], size=name, crop=spec["crop"]) for k, s in samples.items()}
    for k, r in rows.items():
        log(f"    {k}: {r['img_s']:.1f} img/s")
    return rows, [ratio(f"data loading / training, {k}", rows, k, key,
                        headline=k.endswith(", 0 workers")) for k in rows if k != key]


def run(settings, log) -> dict:
    rows, ratios = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for name, spec in settings.data_sizes.items():
            size_rows, size_ratios = measure_size(name, spec, Path(tmp), settings, log)
            rows.update(size_rows)
            ratios += size_ratios
    return {"workers": list(settings.data_workers), "loader_batch": settings.data_batch,
            "rounds": settings.data_rounds, "sizes": settings.data_sizes, "rows": rows,
            "ratios": ratios}
