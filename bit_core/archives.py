"""Archives as they are downloaded: where they are kept, how a local copy or a download is
verified, and extraction that refuses anything unsafe (absolute paths, ``..``, links, devices)
and reports a truncated or corrupt archive in one line, leaving nothing half-extracted."""

from __future__ import annotations

import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import IO, Any

from bit_core.download import download
from bit_core.errors import DataError, DownloadError
from bit_core.io import atomic_dir, file_digest

DEFAULT_CACHE = Path("~/.cache/bit-pipeline/data")  # downloaded archives, kept between runs
CORRUPT = (tarfile.ReadError, tarfile.CompressionError, tarfile.HeaderError, EOFError,
            zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def verified_archive(what: str, official_url: str, official: Mapping[str, str], *,
                     md5: str | None = None, url: str | None = None,
                     archive: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE,
                     progress: bool = True, official_bytes: int | None = None) -> Path:
    """A verified archive: the local copy `archive`, or a cached, resumable download of `url`
    (a mirror) or `official_url`.

    Args:
        what: the archive's name in messages, e.g. "cifar10 python archive".
        official_url: where the official file is; its last part names the cached download.
        official: {algorithm: hex digest} of the official file (``md5``, ``sha256``).
        md5: the MD5 of a re-packed archive (data.md5), checked instead of `official`.
        url: a mirror instead of the official address.
        archive: a local copy to use instead of downloading.
        cache_dir: where downloads are kept.
        progress: show a progress bar while downloading.
        official_bytes: the official file's size, to tell a truncated local copy.

    Raises:
        DataError: the local copy is missing or does not match, or the download failed.
    """
    filename = official_url.rsplit("/", 1)[-1]
    expected = {"md5": md5} if md5 else dict(official)
    if archive is None:
        try:
            return download(url or official_url, Path(cache_dir).expanduser() / filename,
                            progress=progress, what=filename, mirror=bool(url), **expected)
        except DownloadError as err:
            raise DataError(f"{err} Or set data.archive to a local copy (and data.md5 to the MD5 "
                            "of a re-packed one).") from None
    path = Path(archive).expanduser()
    if path.is_dir():
        raise DataError(f"data.archive {path} is a folder: give the archive file itself "
                        f"({filename}), not what it extracts to")
    if not path.is_file():
        raise DataError(f"data.archive {path} does not exist: fix the path or set it to null to "
                        "download")
    for algorithm, want in expected.items():
        got = file_digest(path, algorithm)
        if got == want.lower():
            continue
        if md5:
            raise DataError(f"{path} has md5 {got}, not data.md5 {want.lower()}: fix data.md5, "
                            "or the file (truncated or changed?)")
        size = path.stat().st_size
        short = (f" ({size} bytes, the official file has {official_bytes}: truncated?)"
                 if official_bytes and size < official_bytes else "")
        raise DataError(f"{path} has {algorithm} {got}, expected {want.lower()}{short}: it is not "
                        f"the {what}; download {official_url} again, or set data.md5 for a "
                        "re-packed archive")
    return path


def why_corrupt(err: BaseException) -> str:
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
                while tar.fileobj.read(1 << 20):  # to the end: gzip checks its CRC only there
                    pass
        except tarfile.FilterError as err:
            raise DataError(f"{where}: unsafe member ({err}); refusing to extract it: use the "
                            "official archive") from None
        except CORRUPT as err:
            raise DataError(f"{where} is truncated or corrupt ({why_corrupt(err)}): delete it and "
                            "download it again") from None
    return dest
