"""Splits of a data root: scan class folders, split seeded and stratified, write and read the
CSV index files (``path,label``, paths relative to the root) that every later stage reads.

Every source ends up in one on-disk layout, ``<root>/<class>/<image>``, or, when the source gives
its own splits, ``<root>/<split folder>/<class>/<image>`` with a split marker (see
:func:`bit_core.contracts.read_split_marker`), so one scanner and one index format serve the
embedded digits, CIFAR, ImageNet, tf_flowers and any user folder.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bit_core.contracts import SPLITS, read_split_marker
from bit_core.errors import DataError
from bit_core.io import file_digest


@functools.cache
def _image_suffixes() -> frozenset[str]:
    # imported here: torchvision brings torch with it, which stages that only read the split
    # files (register's fingerprint) and `bit predict` on files do without
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return frozenset(IMG_EXTENSIONS)


def is_image(path: Path) -> bool:
    """Whether a file is an image by its suffix (torchvision's list) and is not hidden."""
    return path.suffix.lower() in _image_suffixes() and not path.name.startswith(".")


def images_in(folder: Path) -> Iterator[Path]:
    """The images under `folder`, at any depth, in sorted order; hidden files and folders (such
    as ``._photo.jpg`` or ``.ipynb_checkpoints/``) are skipped. Linked folders are followed,
    except one that leads back to a folder it is in, or above it (a loop, which would add the
    same images again and again under longer paths, or another class's under this one)."""
    lineage: dict[str, frozenset[str]] = {}  # each folder: the real paths from `folder` to it

    def loops(real: str, parent: str) -> bool:
        return any(seen == real or seen.startswith(real.rstrip(os.sep) + os.sep)
                   for seen in lineage[parent])

    for parent, dirs, files in os.walk(folder, followlinks=True):
        lineage[parent] = lineage.get(os.path.dirname(parent), frozenset()) | {
            os.path.realpath(parent)}
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not loops(os.path.realpath(os.path.join(parent, d)), parent))
        yield from (Path(parent) / name for name in sorted(files) if is_image(Path(parent) / name))


@dataclass(frozen=True)
class Sample:
    """One image: its path relative to the data root and its class index."""

    path: str
    label: int


def scan_folder(root: Path) -> tuple[list[Sample], list[str]]:
    """Images under class sub-folders of `root`, sorted; the class names in index order. What
    counts as an image is what the imagefolder source takes (:func:`images_in`): hidden files
    and folders, such as an archive's ``._photo.jpg``, are not."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist: create it or fix data.folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders: it needs one sub-folder of images per "
                        "class")
    samples = [Sample(os.path.relpath(path, root), label)
               for label, name in enumerate(classes) for path in images_in(root / name)]
    for name in (*classes, *(s.path for s in samples)):
        try:
            name.encode("utf-8")  # split files and classes.json are UTF-8
        except UnicodeEncodeError:
            raise DataError(f"{root}: the name {os.fsencode(name)!r} is not UTF-8 text: rename "
                            "it (convmv renames a whole folder from another encoding)") from None
    empty = sorted(set(classes) - {classes[s.label] for s in samples})
    if empty:
        raise DataError(f"{root}: the class folder(s) {', '.join(empty[:3])} hold no images: "
                        "it needs one sub-folder of images per class")
    return samples, classes


@dataclass(frozen=True)
class DataRoot:
    """The images of a fetched data root: those to split, those in the splits its source gives
    (the official test set; a given validation set), and the class names in index order."""

    pool: list[Sample]
    given: dict[str, list[Sample]]
    classes: list[str]

    def samples(self) -> list[Sample]:
        """Every image: the pool, then each given split."""
        return self.pool + [s for split in self.given.values() for s in split]

    def without(self, paths: set[str]) -> DataRoot:
        """The same root with the images at `paths` left out."""
        return DataRoot([s for s in self.pool if s.path not in paths],
                        {k: [s for s in v if s.path not in paths] for k, v in self.given.items()},
                        self.classes)


def _scan_split(root: Path, folder: str) -> tuple[list[Sample], list[str]]:
    samples, classes = scan_folder(root / folder)
    return [Sample(f"{folder}/{s.path}", s.label) for s in samples], classes


def scan_root(root: Path) -> DataRoot:
    """The images of a data root: all of them to split, or, under a split marker, train's to
    split and the given splits kept, labelled by train's classes (the same in every split)."""
    marker = read_split_marker(root)
    if marker is None:
        samples, classes = scan_folder(root)
        return DataRoot(samples, {}, classes)
    folders = marker["splits"]
    pool, classes = _scan_split(root, folders["train"])
    index = {name: i for i, name in enumerate(classes)}
    given = {}
    for split, folder in folders.items():
        if split == "train":
            continue
        found, names = _scan_split(root, folder)
        differ = sorted(set(names) ^ set(classes))
        if differ:
            where = (folder, folders["train"]) if differ[0] in names else (folders["train"], folder)
            raise DataError(f"class {differ[0]!r} is in {root / where[0]} but not in "
                            f"{root / where[1]}: every split needs the same classes; fix the "
                            "source and run the fetch_data stage again")
        given[split] = [Sample(s.path, index[names[s.label]]) for s in found]
    return DataRoot(pool, given, classes)


def split_root(data: DataRoot, val_fraction: float, test_fraction: float, seed: int
               ) -> dict[str, list[Sample]]:
    """train/val/test: the splits the source gives are kept, the others drawn from the pool,
    seeded and stratified (:func:`stratified_split`)."""
    parts = stratified_split([s.label for s in data.pool],
                             0.0 if "val" in data.given else val_fraction,
                             0.0 if "test" in data.given else test_fraction, seed)
    return {name: data.given[name] if name in data.given else [data.pool[i] for i in parts[name]]
            for name in SPLITS}


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


def few_shot(indices: np.ndarray, labels: Sequence[int], shots: int, seed: int,
             classes: Sequence[str] | None = None) -> np.ndarray:
    """k examples per class out of `indices`, chosen by a seeded generator (same on any machine);
    `classes` names the labels in errors."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        if len(members) < shots:
            name = repr(classes[label]) if classes else label
            raise DataError(f"class {name} has {len(members)} training images, fewer than "
                            f"shots={shots}: lower data.shots")
        chosen.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(chosen))


def few_shot_samples(train: Sequence[Sample], shots: int, seed: int,
                     classes: Sequence[str] | None = None) -> list[Sample]:
    """:func:`few_shot` of a list of samples: k of each class, the same on every machine."""
    chosen = few_shot(np.arange(len(train)), [s.label for s in train], shots, seed, classes)
    return [train[i] for i in chosen]


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
