"""Archives in the exact formats of the real ones, built in memory for tests: tar files and the
Python 2 pickles inside the official CIFAR archives."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
                 b"ship", b"truck"]


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz") -> bytes:
    """A tar (gzip-compressed by default) of regular files, with their parent folders. gzip and
    bzip2 compress at their fastest level: the format is the same, and big archives build fast."""
    buffer = io.BytesIO()
    fastest = {"compresslevel": 1} if mode.endswith((":gz", ":bz2")) else {}
    with tarfile.open(fileobj=buffer, mode=mode, **fastest) as tar:
        folders = sorted({str(Path(n).parent) for n in members} - {"."})
        for folder in folders:
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class _Python2Pickler(pickle._Pickler):
    """Pickles as the real CIFAR files were written by Python 2: strings as BINSTRING (loaded as
    bytes with encoding="bytes") and numpy's array rebuilder under numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        size = len(data)
        self.write(pickle.SHORT_BINSTRING + bytes([size]) + data if size < 256
                   else pickle.BINSTRING + struct.pack("<i", size) + data)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = _save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()
