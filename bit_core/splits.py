"""Splits of a data root: scan class folders, split seeded and stratified, write and read the
CSV index files (``path,label``, paths relative to the root) that every later stage reads.

Every source ends up in one on-disk layout, ``<root>/<class>/<image>``, so one scanner and one
index format serve the embedded digits, CIFAR, ImageNet and any user folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from bit_core.errors import DataError
from bit_core.io import file_digest

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the data root and its class index."""

    path: str
    label: int


def scan_folder(root: Path) -> tuple[list[Sample], list[str]]:
    """Images under class sub-folders of `root`, sorted; the class names in index order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: create it or fix data.folder")
    try:
        classes, class_to_idx = find_classes(str(root))
        found = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:
        raise DataError(f"{root}: {err}: it needs one sub-folder of images per class") from None
    samples = [Sample(os.path.relpath(path, root), label) for path, label in found]
    return samples, classes


def find_unreadable(root: Path, samples: Sequence[Sample]) -> list[str]:
    """Paths of images that PIL cannot decode."""
    bad = []
    for sample in samples:
        try:
            with Image.open(Path(root) / sample.path) as image:
                image.verify()
        except Exception:  # noqa: BLE001 - any decoder error means unreadable
            bad.append(sample.path)
    return bad


def stratified_split(labels: Sequence[int], val_fraction: float, test_fraction: float,
                     seed: int) -> dict[str, np.ndarray]:
    """Seeded per-class split into train/val/test index arrays (each class in every split it can)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    parts = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test:n_test + n_val])
        parts["train"].append(members[n_test + n_val:])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def few_shot(indices: np.ndarray, labels: Sequence[int], shots: int, seed: int) -> np.ndarray:
    """k examples per class out of `indices`, chosen by a seeded generator (same on any machine)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        if len(members) < shots:
            raise DataError(f"class {label} has {len(members)} training images, fewer than "
                            f"shots={shots}: lower data.shots")
        chosen.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(chosen))


def write_split(path: Path, samples: Sequence[Sample]) -> None:
    """Write one split's index CSV (path,label)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows((s.path, s.label) for s in samples)


def read_split(path: Path) -> list[Sample]:
    """Read one split's index CSV."""
    with open(path, newline="") as handle:
        return [Sample(row["path"], int(row["label"])) for row in csv.DictReader(handle)]


def read_classes(prepared: Path) -> list[str]:
    """Class names in index order, as written by the prepare step."""
    return json.loads((Path(prepared) / "classes.json").read_text())


def fingerprint(prepared: Path) -> str:
    """A digest of the prepared splits (index files, class list, statistics): equal digests mean
    the same images in the same splits with the same labels, so metrics on them compare."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(prepared).iterdir() if p.is_file()):
        digest.update(f"{path.name}:{file_digest(path)}\n".encode())
    return digest.hexdigest()
