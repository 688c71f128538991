"""Atomic file output: write to a temporary sibling, then rename, so no reader ever sees a
half-written file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    """The process's umask now (it can change between calls, so it is never cached).

    Linux reports it in /proc/self/status. Elsewhere os.umask is the only way to read it and it
    sets it too, so the value is put back at once; a file another thread creates in between
    would get the default mode.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call writer(tmp_path), then move the result onto `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save to `path` atomically. Through a Python file: a write that fails (a full disk)
    is then an OSError naming its cause, where torch's own file writer says only "unexpected
    pos"."""
    import torch

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            try:
                torch.save(obj, file)
            except RuntimeError as err:  # raised while closing the archive, after the real one
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise

    return atomic_write(path, save)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling directory; on success it replaces `final`, else it goes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
        os.replace(final, old / final.name)
    os.replace(tmp, final)  # the new one in place before the old one is deleted
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def link_or_copy(source: str | Path, dest: str | Path) -> None:
    """Hard-link `source` to `dest` when both are on one file system (no copy of a file that
    may be gigabytes), else copy it; for files of the pipeline's own caches only (a user's files
    are copied: :func:`clone_or_copy`). A symbolic link is resolved first: the file it points
    to is linked or copied, not the link (Linux's link() would copy a relative link as it is,
    which then points nowhere from `dest`)."""
    source = os.path.realpath(source)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


_FICLONE = 0x40049409  # Linux's ioctl that makes a file share another's blocks (a reflink)


def clone_or_copy(source: str | Path, dest: str | Path) -> None:
    """Copy a user's file `source` to `dest` as a new file: a reflink where the file system has
    them (Btrfs, XFS: no blocks copied until either changes), else a full copy; a symbolic link
    is resolved first. Never a hard link: a DVC cache of link type would then take the user's
    own file into the cache and make it read-only."""
    source = os.path.realpath(source)
    try:
        with open(source, "rb") as src, open(dest, "wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        shutil.copystat(source, dest)
    except OSError:
        shutil.copy2(source, dest)

# Hashing reads a file in chunks of this many bytes.
HASH_CHUNK_SIZE = 1 << 20


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks.

    Args:
        path: File to hash.
        algorithm: Any name :func:`hashlib.new` accepts, e.g. ``"sha256"`` or ``"md5"``.

    Returns:
        The lowercase hexadecimal digest.

    Raises:
        ValueError: If ``algorithm`` is not supported by :mod:`hashlib`.
        OSError: If the file cannot be read.
    """
    return file_digests(Path(path), [algorithm])[algorithm]


def file_digests(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Hex digests of one file for several algorithms, in a single pass of 1 MiB reads."""
    hashers = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}
    buffer = bytearray(HASH_CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb") as file:
        while n := file.readinto(buffer):
            for hasher in hashers.values():
                hasher.update(view[:n])
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}
