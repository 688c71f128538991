"""ILSVRC-2012 (ImageNet-1k) from the user's own archives (the licence needs a login at
image-net.org, so they are never downloaded): verified, extracted once into class folders, the
validation set kept as the test split::

    <out>/split.json, <out>/train/<wnid>/<image>.JPEG, <out>/test/<wnid>/<image>.JPEG
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from bit_core.archives import CORRUPT, safe_extract, why_corrupt
from bit_core.contracts import read_split_marker, write_split_marker
from bit_core.errors import DataError
from bit_core.io import atomic_dir, atomic_write_json, file_digest


IMAGENET_ARCHIVES: dict[str, tuple[str, str]] = {
    "train": ("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e"),
    "val": ("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622"),
    "devkit": ("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf"),
}
_WNID_TAR = re.compile(r"(?:\./)?(n\d{8})\.tar")


@dataclass(frozen=True)
class Devkit:
    """What the ILSVRC-2012 devkit says: the 1000 leaf classes and the validation labels."""

    wnids: list[str]  # in ILSVRC2012_ID order
    words: dict[str, str]  # wnid -> "tench, Tinca tinca"
    val_wnids: list[str]  # wnid of ILSVRC2012_val_00000001.JPEG, ...


def _imagenet_archives(imagenet_dir: Path) -> dict[str, Path]:
    """The three archive paths, each checked to exist."""
    paths = {key: imagenet_dir / name for key, (name, _) in IMAGENET_ARCHIVES.items()}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path} not found: download it from https://image-net.org/ (login "
                            f"required) and put it in {imagenet_dir}")
    return paths


def _identity(paths: Mapping[str, Path]) -> dict[str, list[int]]:
    """Name -> [size, mtime_ns] of each archive: what says the archives did not change."""
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in paths.values()}


def _verify_imagenet(paths: Mapping[str, Path], checksums: Mapping[str, str]) -> None:
    """Check each archive's MD5 (minutes for the 147 GB train tar)."""
    for key, path in paths.items():
        got = file_digest(path, "md5")
        if got != checksums[key]:
            raise DataError(f"{path} has md5 {got}, expected {checksums[key]}: download it again "
                            "from https://image-net.org/")


def parse_devkit(devkit: Path, scratch: Path) -> Devkit:
    """Read the leaf synsets of data/meta.mat and the validation ground truth of the devkit.

    Same reading as torchvision's ``parse_devkit_archive``, without its fixed MD5 check and with
    :func:`safe_extract`.
    """
    import scipy.io
    from scipy.io.matlab import MatReadError

    root = safe_extract(devkit, scratch / "devkit") / "ILSVRC2012_devkit_t12" / "data"
    meta, truth = root / "meta.mat", root / "ILSVRC2012_validation_ground_truth.txt"
    for path in (meta, truth):
        if not path.is_file():
            raise DataError(f"{devkit} has no {path.relative_to(scratch / 'devkit')}: download "
                            "the devkit again")
    try:
        synsets = scipy.io.loadmat(meta, squeeze_me=True)["synsets"]
        leaves = sorted((int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"]))
                        for s in synsets if int(s["num_children"]) == 0)
        ids = [int(line) for line in truth.read_text().split()]
    except (MatReadError, ValueError, KeyError, IndexError, TypeError) as err:
        raise DataError(f"{devkit}: unreadable meta.mat or ground truth ({err}): download the "
                        "devkit again") from None
    id_to_wnid = {index: wnid for index, wnid, _ in leaves}
    bad = [w for w in id_to_wnid.values() if not re.fullmatch(r"n\d{8}", w)]
    unknown = sorted(set(ids) - id_to_wnid.keys())
    if bad or unknown:
        what = f"WNID {bad[0]!r}" if bad else f"ground truth class {unknown[0]}"
        raise DataError(f"{devkit}: {what} is not a leaf synset of meta.mat: download the devkit "
                        "again")
    return Devkit([wnid for _, wnid, _ in leaves], {wnid: words for _, wnid, words in leaves},
                  [id_to_wnid[i] for i in ids])


def _extract_train(archive: Path, train: Path, wnids: Sequence[str]) -> None:
    """Extract each per-class tar of the train archive into `train`/<wnid>, skipping done ones.

    The inner tars are read from the outer one directly, so the disk holds each image once.
    """
    expected = set(wnids)
    for leftover in train.glob(".*"):  # a class a stopped run was extracting: extracted again
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        with tarfile.open(archive, "r:") as outer:
            for member in outer:
                match = _WNID_TAR.fullmatch(member.name)
                if not member.isfile() or not match or match.group(1) not in expected:
                    raise DataError(f"{archive}: unexpected member {member.name!r} (expected one "
                                    "tar per devkit class, like n01440764.tar): download it again")
                if (train / match.group(1)).is_dir():
                    continue  # done by an earlier, interrupted run
                with outer.extractfile(member) as inner:
                    safe_extract(f"{archive}:{member.name}", train / match.group(1), inner)
    except CORRUPT as err:
        raise DataError(f"{archive} is truncated or corrupt ({why_corrupt(err)}): download it again"
                        ) from None
    missing = sorted(expected - {p.name for p in train.iterdir()})
    if missing:
        raise DataError(f"{archive} has no images of {len(missing)} devkit class(es) such as "
                        f"{missing[0]}: download it again")


def _extract_val(archive: Path, test: Path, val_wnids: Sequence[str]) -> None:
    """Extract the validation images into `test`/<wnid>/ by the devkit's ground truth."""
    with atomic_dir(test) as tmp:
        flat = safe_extract(archive, tmp / ".flat")
        images = sorted(p for p in flat.iterdir() if p.is_file())
        if len(images) != len(val_wnids) or any(p.is_dir() for p in flat.iterdir()):
            raise DataError(f"{archive} has {len(images)} top-level images but the devkit labels "
                            f"{len(val_wnids)}: download it again")
        for image, wnid in zip(images, val_wnids, strict=True):
            (tmp / wnid).mkdir(exist_ok=True)
            os.replace(image, tmp / wnid / image.name)
        flat.rmdir()


def _count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def _staging(out: Path, identity: Mapping[str, Any]) -> tuple[Path, bool]:
    """The resumable work folder beside `out`, and whether its archives were already verified.

    A work folder left by a run on other archives is discarded; none is created here.
    """
    staging = out.parent / f".{out.name}.imagenet-partial"
    state = staging / "archives.json"
    try:
        saved = json.loads(state.read_text())
    except (OSError, ValueError):  # none yet, or cut short by a kill: start the folder again
        saved = {}
    if isinstance(saved, dict) and saved.get("archives") == identity:
        return staging, bool(saved.get("verified"))
    if staging.exists():
        shutil.rmtree(staging)
    return staging, False


def materialize_imagenet(imagenet_dir: str | Path, out: Path, *, verify: bool = True,
                         checksums: Mapping[str, str] | None = None) -> int:
    """Arrange ILSVRC-2012 (never downloaded) as `out`/train/<wnid>/ and `out`/test/<wnid>/.

    The official validation set becomes the ``test`` split. Work happens in a folder beside
    `out` (``.<name>.imagenet-partial``): each class is extracted atomically, so an interrupted
    run resumes where it stopped; the split marker is written last and the folder then replaces
    `out`. When `out` already holds this result for the same archives, nothing is done.

    Args:
        imagenet_dir: folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and
            ILSVRC2012_devkit_t12.tar.gz.
        out: the data root to create.
        verify: check the archives' MD5s (reads about 154 GB once).
        checksums: expected MD5 per archive key (train, val, devkit) instead of the official ones.

    Returns:
        The number of images (train + test).
    """
    imagenet_dir, out = Path(imagenet_dir).expanduser(), Path(out)
    paths = _imagenet_archives(imagenet_dir)
    identity = _identity(paths)
    done = read_split_marker(out) if out.is_dir() else None
    if done and done.get("source") == "imagenet" and done.get("archives") == identity:
        return sum(done["images"].values())
    staging, verified = _staging(out, identity)
    if verify and not verified:
        _verify_imagenet(paths, {k: v for k, (_, v) in IMAGENET_ARCHIVES.items()}
                         | dict(checksums or {}))
    (staging / "train").mkdir(parents=True, exist_ok=True)
    atomic_write_json(staging / "archives.json", {"archives": identity,
                                                  "verified": verify or verified})
    with tempfile.TemporaryDirectory(prefix=".devkit-", dir=staging) as scratch:
        devkit = parse_devkit(paths["devkit"], Path(scratch))
    _extract_train(paths["train"], staging / "train", devkit.wnids)
    if not (staging / "test").is_dir():
        _extract_val(paths["val"], staging / "test", devkit.val_wnids)
    images = {split: _count_files(staging / split) for split in ("train", "test")}
    write_split_marker(staging, "imagenet", devkit.wnids, images, archives=identity,
                       class_names=devkit.words)
    (staging / "archives.json").unlink()
    with atomic_dir(out) as tmp:
        tmp.rmdir()
        os.replace(staging, tmp)
    return sum(images.values())
