"""The data report: what the splits hold, from one pass over the images.

Each image is read once: PIL reads its size from the header, makes the check ``Image.verify``
makes (the file opens as an image of a known format; a PNG's chunk checksums are checked) and then
decodes the whole image (a JPEG at the smallest scale its decoder offers, which still reads every
byte), so that a truncated or corrupt file is found here and not by the data loader hours into
training. The first HEAD_BYTES are hashed (SHA-256) with the file size as a key. The decoding
dominates the pass (about a millisecond for an ImageNet JPEG); threads share it, as PIL's decoders
release the GIL. Exact duplicates are
found from it as fdupes and rmlint find them: only images whose size and head hash both match
another's are read whole and compared by the SHA-256 of their whole content, so two images are
reported as duplicates only when all their bytes are the same.

From that pass the report gives images per class and split (a table and a bar chart), the
distribution of image sizes, the files PIL could not open, and exact duplicates. A validation or
test image whose content also sits in train is leakage (:func:`held_out_in_train`).

Written into one folder (replaced as a whole): ``metrics.json`` (:class:`DataMetrics`, the DVC
metrics), ``report.md``, ``classes.csv`` and ``classes.png``, ``sizes.csv``, ``duplicates.csv``
and ``unreadable.csv``.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bit_core.contracts import DATA_METRICS, SPLITS, DataMetrics
from bit_core.io import atomic_dir, file_digest
from bit_core.plots import plot_class_counts
from bit_core.serving import to_rgb, turned_size
from bit_core.splits import Sample

HEAD_BYTES = 16 * 1024  # hashed for every image; beyond a JPEG's or PNG's headers
KEY_BYTES = 8 + 32  # file size, SHA-256 of the head
INSPECT_CHUNK = 4096  # images handed to the threads at a time
SHOWN = 20  # rows of a long list shown in report.md; the CSV files hold all


@dataclass(frozen=True)
class ImageTable:
    """What the pass over the images under `root` found: for each readable image (a row, by
    path) its key (size and head hash), width, height and file size; for each unreadable one,
    why."""

    root: Path
    rows: dict[str, int]
    keys: np.ndarray  # (N, KEY_BYTES) uint8
    widths: np.ndarray  # (N,) int64
    heights: np.ndarray
    nbytes: np.ndarray
    unreadable: dict[str, str]


def _inspect(path: Path) -> tuple[bytes, int, int, int]:
    """(key, width, height, file size) of one image; raises if PIL cannot open or decode it."""
    with open(path, "rb") as file:
        nbytes = os.fstat(file.fileno()).st_size
        key = nbytes.to_bytes(8, "little") + hashlib.sha256(file.read(HEAD_BYTES)).digest()
        file.seek(0)
        with Image.open(file) as image:
            image.verify()  # leaves the image unusable: decode from a second opening
        file.seek(0)
        with Image.open(file) as image:
            width, height = turned_size(image)
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG only
            to_rgb(image)  # "image file is truncated", decoder errors and what training refuses
    return key, width, height, nbytes


def _inspect_or_why(path: Path) -> tuple[bytes, int, int, int] | str:
    try:
        return _inspect(path)
    except Exception as err:  # noqa: BLE001 - any read or decoder error means unreadable
        return _why(err)


def _why(err: BaseException) -> str:
    """One line, the same wherever the data lives (PIL quotes the file object it was given,
    absolute path included; the row already names the image)."""
    text = re.sub(r" ?<(?:_io\.[^<>]*|[^<>]* at 0x[0-9a-fA-F]+)>", "",
                  " ".join(str(err).split()))
    return text or type(err).__name__


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def inspect_images(root: Path, samples: Sequence[Sample]) -> ImageTable:
    """Open each image under `root` once: size, readability, and the key duplicates share."""
    rows: dict[str, int] = {}
    keys, sizes, unreadable = bytearray(), array("q"), {}
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        for start in range(0, len(samples), INSPECT_CHUNK):  # bounded number of pending futures
            chunk = samples[start:start + INSPECT_CHUNK]
            found = pool.map(_inspect_or_why, [Path(root) / sample.path for sample in chunk])
            for sample, seen in zip(chunk, found):
                if isinstance(seen, str):
                    unreadable[sample.path] = seen
                    continue
                key, width, height, nbytes = seen
                rows[sample.path] = len(rows)
                keys += key
                sizes.extend((width, height, nbytes))
    sizes_by_kind = np.asarray(sizes, dtype=np.int64).reshape(-1, 3).T
    return ImageTable(Path(root), rows, np.frombuffer(bytes(keys), np.uint8).reshape(-1, KEY_BYTES),
                      *sizes_by_kind, unreadable)


@dataclass(frozen=True)
class Copy:
    """One image of a group of duplicates: its split and sample."""

    split: str
    sample: Sample


def duplicate_groups(splits: Mapping[str, Sequence[Sample]], table: ImageTable
                     ) -> list[tuple[str, list[Copy]]]:
    """(SHA-256, copies) of every content that two or more images of the splits share, in the
    order of their first copies (by split, then as listed). Only the images whose key another
    image shares are read again, whole."""
    names = [name for name in SPLITS for _ in splits[name]]
    samples = [s for name in SPLITS for s in splits[name]]
    if not samples:
        return []
    keys = table.keys[[table.rows[s.path] for s in samples]]
    keys = np.ascontiguousarray(keys).view(np.dtype((np.void, KEY_BYTES))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    groups: dict[str, list[Copy]] = {}
    for i in np.flatnonzero(counts[inverse.ravel()] > 1):
        digest = file_digest(table.root / samples[i].path)
        groups.setdefault(digest, []).append(Copy(names[i], samples[i]))
    return [(digest, copies) for digest, copies in groups.items() if len(copies) > 1]


def held_out_in_train(groups: Sequence[tuple[str, list[Copy]]]) -> dict[str, set[str]]:
    """{"val": train paths whose content is also a validation image, "test": ... a test image}."""
    found: dict[str, set[str]] = {"val": set(), "test": set()}
    for _, copies in groups:
        held = {c.split for c in copies} & found.keys()
        for copy in copies:
            if copy.split == "train":
                for split in held:
                    found[split].add(copy.sample.path)
    return found


def _percentile(values: np.ndarray, q: float) -> int:
    return int(np.percentile(values, q, method="lower"))


@dataclass(frozen=True)
class DataReport:
    """Everything the report shows.

    Attributes:
        classes: class names in index order.
        splits: the images of each split as written (after data.dedupe and data.shots).
        given: the splits the source gave (the others were drawn from the pool).
        table: the pass over the images.
        groups: exact duplicates among the splits before data.dedupe and data.shots.
        removed: train images left out because a held-out image has their content.
        shots: training images per class kept, if few-shot.
    """

    classes: list[str]
    splits: dict[str, list[Sample]]
    given: tuple[str, ...]
    table: ImageTable
    groups: list[tuple[str, list[Copy]]]
    removed: set[str]
    shots: int | None = None

    def counts(self) -> np.ndarray:
        """Images per class (rows) and split (columns, in SPLITS order)."""
        counts = np.zeros((len(self.classes), len(SPLITS)), dtype=np.int64)
        for column, name in enumerate(SPLITS):
            labels = [s.label for s in self.splits[name]]
            counts[:, column] = np.bincount(labels, minlength=len(self.classes))
        return counts

    def metrics(self) -> DataMetrics:
        per_class = self.counts().sum(axis=1)
        leaked = held_out_in_train(self.groups)
        within = sum(n - 1 for _, copies in self.groups
                     for n in Counter(c.split for c in copies).values())
        widths, heights = self.table.widths, self.table.heights
        return DataMetrics(
            classes=len(self.classes),
            **{f"images_{name}": len(self.splits[name]) for name in SPLITS},
            images_per_class_min=int(per_class.min()), images_per_class_max=int(per_class.max()),
            bytes=int(self.table.nbytes.sum()),
            width_min=int(widths.min()), width_median=_percentile(widths, 50),
            width_max=int(widths.max()), height_min=int(heights.min()),
            height_median=_percentile(heights, 50), height_max=int(heights.max()),
            unreadable=len(self.table.unreadable), duplicates_within_splits=within,
            duplicate_groups_across_splits=sum(len({c.split for c in copies}) > 1
                                               for _, copies in self.groups),
            test_in_train=len(leaked["test"]), val_in_train=len(leaked["val"]),
            removed_from_train=len(self.removed))


def write_report(folder: Path, report: DataReport) -> DataMetrics:
    """Write the report's files into `folder` (replaced as a whole); return its metrics."""
    metrics = report.metrics()
    with atomic_dir(folder) as tmp:
        metrics.write(tmp / DATA_METRICS)
        counts = report.counts()
        _csv(tmp / "classes.csv", ["class", *SPLITS, "total"],
             ([name, *row, sum(row)] for name, row in zip(report.classes, counts.tolist())))
        plot_class_counts(report.classes, dict(zip(SPLITS, counts.T)), tmp / "classes.png")
        _csv(tmp / "sizes.csv", ["width", "height", "images"], _sizes(report.table))
        _csv(tmp / "unreadable.csv", ["path", "error", "action"],
             ([path, why, "skipped"] for path, why in sorted(report.table.unreadable.items())))
        _csv(tmp / "duplicates.csv", ["sha256", "split", "path", "class", "action"],
             ([digest, c.split, c.sample.path, report.classes[c.sample.label],
               "removed from train" if c.sample.path in report.removed else ""]
              for digest, copies in report.groups for c in copies))
        (tmp / "report.md").write_text(_markdown(report, metrics, counts))
    return metrics


def _csv(path: Path, header: list[str], rows) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _sizes(table: ImageTable) -> list[tuple[int, int, int]]:
    """(width, height, images) of each size found, most frequent first."""
    sizes, counts = np.unique(np.stack([table.widths, table.heights], axis=1), axis=0,
                              return_counts=True)
    order = np.lexsort((sizes[:, 1], sizes[:, 0], -counts))
    return [(int(sizes[i, 0]), int(sizes[i, 1]), int(counts[i])) for i in order]


def _table(header: Sequence[str], rows, text: int = 1) -> list[str]:
    """A markdown table: the first `text` columns left-aligned, the others (numbers) right."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * text + "---:|" * (len(header) - text)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _markdown(report: DataReport, metrics: DataMetrics, counts: np.ndarray) -> str:
    given = [{"val": "validation"}.get(name, name) for name in SPLITS if name in report.given]
    origin = (f"The {' and '.join(given)} split{'s are' if len(given) > 1 else ' is'} as the "
              "source gives; the others are drawn from the rest" if given else
              "The splits are drawn from all images") + ", seeded and stratified."
    shots = f" Train keeps {report.shots} images per class (few-shot)." if report.shots else ""
    lines = ["# Data report", "",
             f"{counts.sum()} images of {len(report.classes)} classes: "
             f"{metrics.images_train} train, {metrics.images_val} validation, "
             f"{metrics.images_test} test. {origin}{shots}", "",
             "## Images per class and split", "", "![images per class and split](classes.png)", ""]
    lines += _table(["class", *SPLITS, "total"],
                    [[name, *row, sum(row)] for name, row in zip(report.classes, counts.tolist())]
                    + [["**all**", *counts.sum(axis=0).tolist(), counts.sum()]])
    lines += _size_section(report.table, metrics)
    lines += _unreadable_section(report.table)
    lines += _duplicates_section(report, metrics)
    return "\n".join(lines) + "\n"


def _size_section(table: ImageTable, metrics: DataMetrics) -> list[str]:
    size = (f"{metrics.bytes / 1e6:.1f} MB" if metrics.bytes >= 1e5 else
            f"{metrics.bytes / 1e3:.1f} kB")
    lines = ["", "## Image sizes", "",
             f"All {_count(len(table.rows), 'readable image')} ({size}), including those "
             "data.dedupe or data.shots leave out of train.", ""]
    quantiles = (0, 5, 50, 95, 100)
    lines += _table(["pixels", "min", "5%", "median", "95%", "max"],
                    [[kind, *(_percentile(values, q) for q in quantiles)]
                     for kind, values in (("width", table.widths), ("height", table.heights))])
    sizes = _sizes(table)
    lines += ["", f"Most common sizes ({len(sizes)} different; all in sizes.csv):", ""]
    return lines + _table(["width × height", "images"],
                          [[f"{w} × {h}", n] for w, h, n in sizes[:10]])


def _unreadable_section(table: ImageTable) -> list[str]:
    lines = ["", "## Unreadable files", ""]
    if not table.unreadable:
        return lines + ["None: every image opened."]
    one = len(table.unreadable) == 1
    lines += [f"{_count(len(table.unreadable), 'file')} could not be opened as "
              f"{'an image and was' if one else 'images and were'} left out "
              f"(data.unreadable: skip). {_listed(len(table.unreadable), 'unreadable.csv')}", ""]
    return lines + _table(["path", "error"], sorted(table.unreadable.items())[:SHOWN], text=2)


def _listed(n: int, csv_name: str) -> str:
    """What the table below shows of the `n` rows that `csv_name` holds."""
    return (f"The first {SHOWN} below, all {n} in {csv_name}:" if n > SHOWN else
            f"Below and in {csv_name}:")


def _duplicates_section(report: DataReport, metrics: DataMetrics) -> list[str]:
    lines = ["", "## Exact duplicates", ""]
    if not report.groups:
        return lines + ["None: no two images have the same content (SHA-256)."]
    leaks = metrics.test_in_train + metrics.val_in_train
    fate = (f"{metrics.removed_from_train} removed from train (data.dedupe: true)"
            if metrics.removed_from_train else
            "kept in train (data.dedupe: true removes them)" if leaks else "")
    lines += [f"{_count(len(report.groups), 'group')} of images with the same content (SHA-256): "
              f"{_count(metrics.duplicates_within_splits, 'extra copy', 'extra copies')} inside "
              f"a split, {_count(metrics.duplicate_groups_across_splits, 'group')} spanning "
              "splits.", "",
              f"**Leakage**: {_count(metrics.test_in_train, 'train image')} also in test, "
              f"{metrics.val_in_train} also in validation" + (f"; {fate}." if fate else "."),
              "", _listed(len(report.groups), "duplicates.csv"), ""]
    return lines + _table(["sha256", "copies"], [
        [digest[:12], "<br>".join(f"{c.split}: {c.sample.path}" for c in copies)]
        for digest, copies in report.groups[:SHOWN]], text=2)
