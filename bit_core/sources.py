"""Real data sources materialised as class folders: CIFAR-10/100, ILSVRC-2012 and image folders.

Every source ends up under one output directory. A source without an official test set (an image
folder) is written as ``<out>/<class>/<image>``, like the embedded digits. A source with an
official train/test separation is written as::

    <out>/split.json              # marker: {"format": 1, "source", "splits", "classes", "images"}
    <out>/train/<class>/<image>   # official training images
    <out>/test/<class>/<image>    # official test images (ILSVRC-2012: the validation set)

:func:`read_split_marker` reads the marker. Archives are verified (MD5) before anything is read,
every tar goes through :func:`safe_extract`, and the CIFAR pickles are read by an unpickler that
only knows how to rebuild numpy arrays.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image

from bit_core.contracts import read_split_marker, write_split_marker
from bit_core.download import download
from bit_core.errors import DataError, DownloadError
from bit_core.io import atomic_dir, file_digest, link_or_copy

DEFAULT_CACHE = Path("~/.cache/bit-pipeline/data")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                            ".webp"})  # torchvision's IMG_EXTENSIONS, compared lower-case

_CORRUPT = (tarfile.ReadError, tarfile.CompressionError, tarfile.HeaderError, EOFError,
            zlib.error, gzip.BadGzipFile)


# --- the embedded digits -------------------------------------------------------------------------

def materialize_digits(out: Path) -> int:
    """Write scikit-learn's handwritten digits (1797 8x8 images, shipped in the package) as PNGs.

    Returns the number of images written. Pixel values 0..16 are scaled to 0..255.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        folder = Path(out) / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{index:04d}.png")
    return len(pixels)


# --- safe extraction -----------------------------------------------------------------------------

def _why(err: BaseException) -> str:
    """A one-line reason for an archive read error."""
    text = " ".join(str(err).split()) or type(err).__name__
    return "not a tar archive" if "could not be opened successfully" in text else text


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be extracted, or None when it is a plain file or folder."""
    name = member.name
    if PurePosixPath(name).is_absolute() or re.match(r"[A-Za-z]:[/\\]|[/\\]", name):
        return "an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "a '..' component"
    if member.issym() or member.islnk():
        return "a link"
    if not (member.isfile() or member.isdir()):
        return "a device or special file"
    return None


def _checked(tar: tarfile.TarFile, where: str) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`, refusing any that could write outside the target or be a link."""
    for member in tar:
        reason = _unsafe_reason(member)
        if reason:
            raise DataError(f"{where}: member {member.name!r} has {reason}; refusing to extract "
                            "it: use the official archive")
        yield member


def safe_extract(archive: str | Path, dest: Path, fileobj: IO[bytes] | None = None) -> Path:
    """Extract a (possibly compressed) tar into `dest`, all or nothing.

    Members with absolute paths, ``..`` components, links or device files are refused; the
    ``data`` extraction filter is applied too where Python has it. Extraction goes to a temporary
    sibling that replaces `dest` only when complete.

    Args:
        archive: the tar file, or, with `fileobj`, its name for messages.
        dest: the directory to create (replaced if it exists).
        fileobj: an open, seekable tar stream to read instead of `archive`.

    Returns:
        `dest`.

    Raises:
        DataError: the archive is missing, truncated, corrupt or has an unsafe member.
    """
    where = str(archive)
    if fileobj is None and not Path(archive).is_file():
        raise DataError(f"archive {where} does not exist: download it again")
    kwargs: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with atomic_dir(dest) as tmp:
        try:
            with tarfile.open(None if fileobj else archive, "r:*", fileobj=fileobj) as tar:
                tar.extractall(tmp, members=_checked(tar, where), **kwargs)
        except tarfile.FilterError as err:
            raise DataError(f"{where}: unsafe member ({err}); refusing to extract it: use the "
                            "official archive") from None
        except _CORRUPT as err:
            raise DataError(f"{where} is truncated or corrupt ({_why(err)}): delete it and "
                            "download it again") from None
    return dest


# --- CIFAR ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant comes from and how its python archive is laid out."""

    url: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    labels_key: str
    names_key: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                         "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                         tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                         "batches.meta", "labels", "label_names"),
    "cifar100": CifarSpec("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                          "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", ("train",),
                          ("test",), "meta", "fine_labels", "fine_label_names"),
}


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What protocol-2 pickles written by Python 3 call (as ``_codecs.encode``) to make bytes."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy array reconstruction and latin-1 bytes."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those numpy arrays are rebuilt from."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file, encoding="bytes")
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def load_pickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch or meta file, allowing only lists, bytes, numbers and numpy arrays.

    Returns:
        The dict, with keys decoded to str.

    Raises:
        DataError: the file is missing, is not such a dict, or names any other global.
    """
    try:
        with open(path, "rb") as handle:
            value = _ArrayUnpickler(handle).load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing from the archive: download it again") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataError(f"{path} is not a CIFAR python batch ({err}); refusing it: use the "
                        "official archive") from None
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a CIFAR python batch (no dict): use the official archive")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in value.items()}


def _class_names(path: Path, key: str) -> list[str]:
    """The label names of a CIFAR meta file, checked to be usable as folder names."""
    raw = load_pickle(path).get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{path} has no {key!r} list: use the official archive")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    for name in names:
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise DataError(f"{path}: label name {name!r} cannot be a folder name: "
                            "use the official archive")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: {key!r} repeats a name: use the official archive")
    return names


def _read_batches(folder: Path, members: Sequence[str], labels_key: str,
                  classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels (N,) of some CIFAR batch files, validated."""
    images, labels = [], []
    for member in members:
        path = folder / member
        batch = load_pickle(path)
        data, found = batch.get("data"), batch.get(labels_key)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3072):
            raise DataError(f"{path}: 'data' is not an N x 3072 uint8 array: use the official "
                            "archive")
        found = np.asarray(found if found is not None else [], dtype=np.int64)
        if found.shape != (len(data),) or (found.size and not 0 <= found.min() <= found.max()
                                           < classes):
            raise DataError(f"{path}: {labels_key!r} does not give one label in 0..{classes - 1} "
                            "per image: use the official archive")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(found)
    return np.concatenate(images), np.concatenate(labels)


def _write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> int:
    """Write images as `folder`/<label name>/<index>.png; only classes that occur get a folder."""
    for label in np.unique(labels):
        (folder / names[label]).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(np.ascontiguousarray(image)).save(
            folder / names[label] / f"{index:05d}.png")
    return len(images)


def cifar_archive(variant: str, *, url: str | None = None, archive: str | Path | None = None,
                  md5: str | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                  progress: bool = True) -> Path:
    """The verified CIFAR python archive: a local copy, or a (cached, resumable) download.

    Args:
        variant: ``cifar10`` or ``cifar100``.
        url: a mirror instead of the official address.
        archive: a local copy to use instead of downloading.
        md5: the expected MD5 instead of the official one.
        cache_dir: where downloads are kept.
        progress: show a progress bar while downloading.

    Raises:
        DataError: the local copy is missing, or the archive's MD5 does not match.
    """
    spec = CIFAR[variant]
    md5 = (md5 or spec.md5).lower()
    if archive is not None:
        path = Path(archive).expanduser()
        if not path.is_file():
            raise DataError(f"data.archive {path} does not exist: fix the path or set it to null "
                            "to download")
        got = file_digest(path, "md5")
        if got != md5:
            raise DataError(f"{path} has md5 {got}, expected {md5}: it is not the {variant} "
                            f"python archive; download {spec.url} again")
        return path
    dest = Path(cache_dir).expanduser() / spec.filename
    try:
        return download(url or spec.url, dest, md5=md5, progress=progress, what=spec.filename,
                        mirror=bool(url))
    except DownloadError as err:
        raise DataError(f"{err} Or set data.archive to a local copy.") from None


def materialize_cifar(variant: str, out: Path, *, url: str | None = None,
                      archive: str | Path | None = None, md5: str | None = None,
                      cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True) -> int:
    """Write CIFAR-10 or CIFAR-100 as PNGs in the official split layout under `out` (replaced).

    The archive is verified, extracted with :func:`safe_extract` into a temporary folder, and
    only its known members are read, with :func:`load_pickle`. Arguments are as in
    :func:`cifar_archive`.

    Returns:
        The number of images written (train + test).
    """
    spec = CIFAR[variant]
    path = cifar_archive(variant, url=url, archive=archive, md5=md5, cache_dir=cache_dir,
                         progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{variant}-", dir=out.parent) as scratch:
        extracted = safe_extract(path, Path(scratch) / "x") / spec.folder
        if not extracted.is_dir():
            raise DataError(f"{path} has no {spec.folder}/ folder: it is not the {variant} "
                            "python archive")
        names = _class_names(extracted / spec.meta, spec.names_key)
        counts = {}
        with atomic_dir(out) as tmp:
            for split, members in (("train", spec.train), ("test", spec.test)):
                images, labels = _read_batches(extracted, members, spec.labels_key, len(names))
                counts[split] = _write_pngs(tmp / split, images, labels, names)
            write_split_marker(tmp, variant, names, counts)
    return sum(counts.values())


# --- ILSVRC-2012 ---------------------------------------------------------------------------------

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
    except _CORRUPT as err:
        raise DataError(f"{archive} is truncated or corrupt ({_why(err)}): download it again"
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
    if state.is_file():
        saved = json.loads(state.read_text())
        if saved.get("archives") == identity:
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
    (staging / "archives.json").write_text(json.dumps({"archives": identity,
                                                       "verified": verify or verified}))
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


# --- image folders -------------------------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def materialize_folder(folder: str | Path, out: Path) -> int:
    """Snapshot a folder of class sub-folders as `out`/<class>/<image> (replaced).

    Files are hard-linked when `out` is on the same file system, else copied; files that are not
    images by their suffix, hidden files and hidden folders are skipped. Whether each image
    decodes is checked later, by the prepare step.

    Returns:
        The number of images.
    """
    folder, out = Path(folder).expanduser(), Path(out)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist: fix data.folder")
    source, target = folder.resolve(), out.resolve()
    if source == target or target in source.parents or source in target.parents:
        raise DataError(f"data.folder {folder} overlaps the output {out}: keep the images "
                        "elsewhere")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    count = 0
    with atomic_dir(out) as tmp:
        for class_dir in classes:
            found = 0
            for parent, dirs, files in os.walk(class_dir, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = Path(parent) / name
                    if not _is_image(path):
                        continue
                    dest = tmp / path.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(path, dest)
                    found += 1
            if not found:
                raise DataError(f"class folder {class_dir} has no images: add some or remove it")
            count += found
        if not count:
            raise DataError(f"{folder} has no class sub-folders of images: put each class's "
                            "images in a sub-folder named after it")
    return count
