"""CIFAR-10 and CIFAR-100 from their official python archives, as class folders with the official
test set kept apart::

    <out>/split.json, <out>/train/<class>/<image>.png, <out>/test/<class>/<image>.png

The archive is verified (MD5) before anything is read, and its pickles are read by an unpickler
that only knows how to rebuild numpy arrays: never unpickle anything else from a download.
"""

from __future__ import annotations

import codecs
import math
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from bit_core.archives import DEFAULT_CACHE, safe_extract, verified_archive
from bit_core.contracts import write_split_marker
from bit_core.errors import DataError
from bit_core.io import atomic_dir


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


def _empty_bytes(*args: Any) -> bytes:
    """What protocol-2 pickles call (as ``bytes()``) for empty bytes: an empty array's data."""
    if args:
        raise pickle.UnpicklingError("bytes may only be called without arguments")
    return b""


_NUMERIC = frozenset({"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8", "b1"})
_BYTE_ORDERS = {"<": "<", ">": ">", "|": "|", "=": "="}


class _Dtype:
    """What a pickle's ``numpy.dtype(name, align, copy)`` and its state become: a plain numeric
    type name and a byte order, turned into a real dtype only once both are checked."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        name = name.decode("latin1") if isinstance(name, bytes) else name
        if not isinstance(name, str) or name not in _NUMERIC:
            raise pickle.UnpicklingError(f"numpy.dtype {name!r} is not a plain numeric type")
        self.name, self.order = name, "|"

    def __setstate__(self, state: Any) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) == 8 else None
        order = order.decode("latin1") if isinstance(order, bytes) else order
        if order not in _BYTE_ORDERS or state[2:5] != (None, None, None):
            raise pickle.UnpicklingError("numpy.dtype state is not that of a plain numeric type")
        self.order = order

    def resolve(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _NdarrayType:
    """Stands for ``numpy.ndarray`` as the pickle names it: only ever an argument of
    :class:`_Array`."""


class _Array:
    """What a pickle's ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`` and its
    state become: the array is built from the raw bytes with ``numpy.frombuffer``, after checking
    that they are exactly the shape's worth of a plain numeric type. numpy's own unpickling is
    never called, so no state from the file reaches it (an object dtype would let the file's
    bytes be used as pointers)."""

    def __init__(self, kind: Any, shape: Any = (0,), typecode: Any = b"b") -> None:
        if kind is not _NdarrayType:
            raise pickle.UnpicklingError("_reconstruct may only rebuild a numpy.ndarray")
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("numpy array state is not (version, shape, dtype, "
                                         "fortran, data)")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and len(shape) <= 8
                and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"numpy array shape {shape!r} is not a shape")
        if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes):
            raise pickle.UnpicklingError("numpy array is not of a plain numeric type")
        dtype = dtype.resolve()
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise pickle.UnpicklingError(f"numpy array of shape {shape} has {len(raw)} bytes of "
                                         f"data, not {math.prod(shape) * dtype.itemsize}")
        self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy array reconstruction (by the stand-ins
    above) and latin-1 bytes."""
    return {("numpy.core.multiarray", "_reconstruct"): _Array,
            ("numpy._core.multiarray", "_reconstruct"): _Array,
            ("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _Dtype,
            ("_codecs", "encode"): _latin1_encode,
            ("__builtin__", "bytes"): _empty_bytes, ("builtins", "bytes"): _empty_bytes}


def _settled(value: Any) -> Any:
    """`value` with the stand-ins replaced by the arrays and dtypes they checked."""
    if isinstance(value, _Array):
        if value.array is None:
            raise pickle.UnpicklingError("a numpy array was never given its data")
        return value.array
    if isinstance(value, _Dtype):
        return value.resolve()
    if isinstance(value, dict):
        return {k: _settled(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_settled(v) for v in value)
    if value is _NdarrayType:
        raise pickle.UnpicklingError("numpy.ndarray may only be an argument of _reconstruct")
    return value


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except those numpy arrays are rebuilt from, and
    rebuilds those itself (see :class:`_Array`)."""

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
            value = _settled(_ArrayUnpickler(handle).load())
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
        try:
            found = np.asarray(found if isinstance(found, list | np.ndarray) else [None])
        except (ValueError, TypeError):  # ragged, say
            found = np.asarray([None])
        if (found.shape != (len(data),) or not np.issubdtype(found.dtype, np.integer)
                or (found.size and not 0 <= found.min() <= found.max() < classes)):
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
        DataError: the local copy is missing, or the archive's MD5 does not match, or the
            download failed.
    """
    spec = CIFAR[variant]
    return verified_archive(f"{variant} python archive", spec.url, {"md5": spec.md5}, md5=md5,
                            url=url, archive=archive, cache_dir=cache_dir, progress=progress)


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
