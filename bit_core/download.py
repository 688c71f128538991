"""Resumable, checksum-verified HTTP(S) downloads with a progress bar.

:func:`download` fetches one URL into ``<dest>.part`` next to the destination, resuming with an
HTTP ``Range`` request when a partial file is already there (from a dropped connection or an
earlier, interrupted process), verifies the SHA-256 and/or MD5 of the whole file and only then
renames it to ``dest`` with :func:`os.replace`, so ``dest`` is never seen half-written.

Only ``http://`` and ``https://`` URLs are handled; callers deal with local files themselves.
Everything is standard library (:mod:`urllib.request`) except the :mod:`rich` progress bar.

Mirrors that want credentials get them by HTTP basic or bearer authentication, sent with every
request (Range resumes and retries included) and re-sent on a redirect only to the same host.
They come, first found first used, from the URL's ``user:password@``; from ``user@`` plus
``BIT_MIRROR_PASSWORD`` or that login's ~/.netrc password; from ``BIT_MIRROR_TOKEN`` (a bearer
token, sent to mirrors only, never to the official addresses); from the host's ~/.netrc entry
(``NETRC`` names another file), as curl, pip and git read it. Every message and progress label
goes through :func:`bit_core.redact.redact`.
"""

from __future__ import annotations

import base64
import fcntl
import http.client
import netrc
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from bit_core.errors import DownloadError
from bit_core.io import file_digest, file_digests
from bit_core.redact import redact, split_credentials

__all__ = ["PASSWORD_ENV", "TOKEN_ENV", "DownloadError", "basic_auth", "download", "file_digest"]

# Mirror credentials kept out of params.yaml (both are listed in bit_core.redact too).
TOKEN_ENV = "BIT_MIRROR_TOKEN"  # bearer token for a mirror URL
PASSWORD_ENV = "BIT_MIRROR_PASSWORD"  # password for a mirror URL that names only its user

# Network reads ask for at most this many bytes at a time (also the progress granularity).
_READ_SIZE = 1 << 16
# Pause before retry n (n >= 1) is _RETRY_DELAY_S * 2 ** (n - 1), capped; no pause when the
# failed attempt had received bytes (the connection was working, resume at once).
_RETRY_DELAY_S = 0.5
_RETRY_DELAY_MAX_S = 8.0
# HTTP statuses worth retrying; every other HTTP error fails at once.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_HEX_LENGTHS = {"sha256": 64, "md5": 32}
_USER_AGENT = "bit-pipeline-download/1"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.IGNORECASE)

# A connection that fails, drops or stalls: URLError (connect, DNS), ConnectionResetError,
# TimeoutError (socket timeout) are OSErrors; IncompleteRead, RemoteDisconnected and
# BadStatusLine are HTTPExceptions. Only network calls are wrapped, so disk errors propagate.
_NETWORK_ERRORS: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)


class _RetryableError(Exception):
    """An attempt failed in a way worth retrying, resuming from the bytes on disk."""


class _FatalHTTPError(Exception):
    """The server answered with an HTTP error that retrying will not fix (e.g. 404)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Auth(NamedTuple):
    """The ``Authorization`` header of a download and where its credentials came from."""

    header: str
    source: str  # for messages, e.g. "BIT_MIRROR_TOKEN"


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` header value for HTTP basic authentication (UTF-8, RFC 7617)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    retries: int = 3,
    what: str | None = None,
    mirror: bool = False,
) -> Path:
    """Download ``url`` to ``dest``, resuming partial downloads and verifying checksums.

    The body goes to ``dest.name + ".part"`` in the same directory. If that file already exists
    the request carries ``Range: bytes=<size>-``: a 206 answer is appended to it, a 200 answer
    (the server ignored the range) restarts it from zero, and a 416 answer means the partial file
    is already complete. A connection that fails, drops mid-body (reset, timeout, incomplete
    read, body shorter than ``Content-Length``) or answers 408/429/5xx is retried up to
    ``retries`` times, each retry resuming from the bytes already on disk. Once the body is
    complete the given checksums are computed over the whole file and the file is renamed to
    ``dest`` with :func:`os.replace`, so ``dest`` never exists half-written.

    If ``dest`` already exists and matches the given checksums (or none is given) it is
    returned at once, without any network access. If it exists but does not match, it is
    deleted and downloaded again.

    When the download fails for good, the ``.part`` file is kept so that the next call resumes
    it, except after a checksum mismatch, which deletes it. Processes downloading into the same
    folder take turns (a lock on the folder): one that wanted the same file then finds it done.

    Args:
        url: ``http://`` or ``https://`` URL; local paths and ``file://`` URLs are the caller's
            business.
        dest: Final path of the file; missing parent directories are created.
        sha256: Expected SHA-256 of the whole file as hex, or None not to check it.
        md5: Expected MD5 of the whole file as hex, or None not to check it.
        progress: Show a :mod:`rich` progress bar on stderr (description, bytes, speed, ETA).
            Works when the output is not a terminal (the final state is printed once).
        timeout: Seconds to wait for the connection and for each read.
        retries: How many times a failed attempt is retried (attempts = ``retries + 1``).
        what: Description shown on the progress bar; defaults to ``dest.name``.
        mirror: ``url`` is a mirror the user configured, so ``BIT_MIRROR_TOKEN`` may be sent
            to it; False for official addresses, which get only ~/.netrc credentials.

    Returns:
        ``dest``.

    Raises:
        DownloadError: The server is unreachable or kept failing after all retries, answered
            with an HTTP error such as 404 or 401, the URL names a user but no password is
            found, ~/.netrc is unreadable, or the checksum does not match. The message names
            the URL (redacted), the reason and the fix.
        ValueError: ``url`` is not http(s), ``retries`` is negative or a checksum is not a
            hex digest of the right length.
        OSError: ``dest`` or the partial file cannot be written.
    """
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(redact(f"download() fetches http(s) URLs only, got {url!r}; handle local "
                                "files yourself"))
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    expected = _expected_digests(sha256=sha256, md5=md5)
    dest = Path(dest)

    if dest.exists() and (not expected or _mismatch(dest, expected) is None):
        return dest
    request_url, auth = _credentials(url, mirror=mirror)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")

    # One download into a folder at a time (two experiments on one host share the cache): the
    # others wait here, then find their file done. The lock is the folder's own, so it leaves
    # no file behind.
    lock = os.open(dest.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.exists():
            if not expected or _mismatch(dest, expected) is None:
                return dest
            dest.unlink()
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task(redact(what or dest.name), total=None)
            _fetch_with_retries(url, request_url, auth, dest, part, timeout=timeout,
                                retries=retries, bar=bar, task=task)
        _verify(part, expected, url, dest)
        os.replace(part, dest)
    finally:
        os.close(lock)  # releases the lock
    return dest


def _verify(part: Path, expected: Mapping[str, str], url: str, dest: Path) -> None:
    """Delete the download and raise when a checksum does not match."""
    mismatch = _mismatch(part, expected)
    if mismatch is not None:
        part.unlink(missing_ok=True)
        algorithm, want, got = mismatch
        raise _error(
            f"{algorithm} mismatch for {url}: expected {want}, got {got}. The partial download "
            f"was deleted; check the URL and the expected {algorithm}, or put a good copy at {dest}."
        )


def _credentials(url: str, *, mirror: bool) -> tuple[str, _Auth | None]:
    """The URL to request (userinfo removed) and its authentication, in the module's order."""
    bare, userinfo = split_credentials(url)
    host = urllib.parse.urlsplit(bare).hostname or ""
    if userinfo is not None:
        user, password = userinfo
        if password is not None:
            return bare, _Auth(basic_auth(user, password), "the password in the URL")
        if os.environ.get(PASSWORD_ENV):
            return bare, _Auth(basic_auth(user, os.environ[PASSWORD_ENV]), PASSWORD_ENV)
        entry = _netrc_entry(host)
        if entry is None or entry[0] not in (user, ""):
            raise _error(f"{url} names user {user!r} but no password: set {PASSWORD_ENV}, or add "
                         f"'machine {host} login {user} password ...' to ~/.netrc")
        return bare, _Auth(basic_auth(user, entry[1]), "~/.netrc")
    if mirror and os.environ.get(TOKEN_ENV):
        return bare, _Auth(f"Bearer {os.environ[TOKEN_ENV]}", TOKEN_ENV)
    entry = _netrc_entry(host)
    return bare, None if entry is None else _Auth(basic_auth(*entry), "~/.netrc")


def _netrc_entry(host: str) -> tuple[str, str] | None:
    """(login, password) for `host` (or the default entry) in $NETRC or ~/.netrc; None if none.

    ~/.netrc itself is refused when others can read it, as Python's netrc module does.
    """
    file = os.environ.get("NETRC") or None
    try:
        entry = netrc.netrc(file).authenticators(host)
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as err:
        # Parse messages quote the offending token, which may be a password: name only the line.
        why = err.msg if err.msg.startswith("~/.netrc") else f"bad syntax at line {err.lineno}"
        raise _error(f"cannot read {err.filename}: {why}; fix it (chmod 600 for permissions), "
                     "or move it away to download without it") from None
    if entry is None or not (entry[0] or entry[2]):
        return None
    return entry[0] or "", entry[2] or ""


def _fetch_with_retries(
    url: str,
    request_url: str,
    auth: _Auth | None,
    dest: Path,
    part: Path,
    *,
    timeout: float,
    retries: int,
    bar: Progress,
    task: TaskID,
) -> None:
    """Run attempts until the partial file is complete, or raise DownloadError.

    ``url`` is the URL as given (named, redacted, in messages); ``request_url`` is requested.
    """
    opener = urllib.request.build_opener(_SameHostAuthRedirect)
    reason = "unknown error"
    for attempt in range(retries + 1):
        before = _size(part)
        try:
            _attempt(opener, request_url, auth, part, timeout=timeout, bar=bar, task=task)
            return
        except _FatalHTTPError as exc:
            fix = _http_error_fix(exc.code, auth, dest)
            raise _error(f"cannot download {url}: {exc}. {fix}") from exc
        except _RetryableError as exc:
            reason = str(exc)
            if attempt < retries and _size(part) <= before:
                time.sleep(min(_RETRY_DELAY_S * 2**attempt, _RETRY_DELAY_MAX_S))
    attempts = f"{retries + 1} attempt" + ("s" if retries else "")
    raise _error(
        f"cannot download {url}: {reason} (after {attempts}). Download it elsewhere and put it "
        f"at {dest} (or set a mirror URL)."
    )


def _http_error_fix(code: int, auth: _Auth | None, dest: Path) -> str:
    """What to do about a non-retryable HTTP error, for the end of the message."""
    if code in (401, 403) and auth is not None:
        return f"Check the credentials from {auth.source}."
    if code == 401:
        return (f"The server wants credentials: add them to ~/.netrc or set {TOKEN_ENV} "
                f"(or {PASSWORD_ENV} with user@ in the URL).")
    return f"Check the URL, or download the file elsewhere and put it at {dest}."


class _SameHostAuthRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, re-sending ``Authorization`` only to the same scheme, host and port
    (or its https upgrade): another host, e.g. a signed storage URL, never sees the credentials."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        header = req.unredirected_hdrs.get("Authorization")
        if new is not None and header and _same_origin(req.full_url, new.full_url):
            new.add_unredirected_header("Authorization", header)
        return new


def _same_origin(old: str, new: str) -> bool:
    """Whether credentials for `old` may go to `new` (same origin, or http -> https on :443)."""
    a, b = urllib.parse.urlsplit(old), urllib.parse.urlsplit(new)
    if a.hostname != b.hostname:
        return False
    if a.scheme == "http" and b.scheme == "https":
        return a.port in (None, 80) and b.port in (None, 443)
    return a.scheme == b.scheme and a.port == b.port


def _attempt(
    opener: urllib.request.OpenerDirector,
    url: str,
    auth: _Auth | None,
    part: Path,
    *,
    timeout: float,
    bar: Progress,
    task: TaskID,
) -> None:
    """One request: append to (or restart) the partial file until the body ends.

    Raises:
        _RetryableError: The connection failed or dropped, or the server is temporarily failing.
        _FatalHTTPError: The server answered with a non-retryable HTTP error.
    """
    offset = _size(part)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if auth is not None:  # unredirected: _SameHostAuthRedirect decides where it may follow
        request.add_unredirected_header("Authorization", auth.header)
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset:
                _, _, total = _parse_content_range(exc.headers.get("Content-Range"))
                if total is None or total == offset:  # the partial file is already complete
                    bar.update(task, completed=offset, total=offset)
                    return
                part.unlink()
                raise _RetryableError(f"the server has {total} bytes but {offset} were on disk") from exc
            if exc.code in _RETRY_STATUSES:
                raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
            raise _FatalHTTPError(f"HTTP {exc.code} {exc.reason}", exc.code) from exc
    except _NETWORK_ERRORS as exc:
        raise _RetryableError(_describe(exc)) from exc

    with response:
        _receive(response, part, offset, bar, task)


def _receive(response, part: Path, offset: int, bar: Progress, task: TaskID) -> None:
    """Write a response's body into the partial file: appended to the `offset` bytes already
    there when the server resumed (206), from the start otherwise."""
    length = _to_int(response.headers.get("Content-Length"))
    if response.status == 206:
        start, _, total = _parse_content_range(response.headers.get("Content-Range"))
        if start is not None and start != offset:
            part.unlink(missing_ok=True)
            raise _RetryableError(f"the server resumed at byte {start} instead of {offset}")
        mode = "ab"
        if total is None and length is not None:
            total = offset + length
    else:  # 200 (or another 2xx): the full body, whatever Range said
        offset, mode, total = 0, "wb", length
    end = None if length is None else offset + length
    bar.update(task, completed=offset, total=total)
    received = offset
    with part.open(mode) as out:
        while chunk := _read(response):
            out.write(chunk)
            received += len(chunk)
            bar.advance(task, len(chunk))
        out.flush()
        os.fsync(out.fileno())
    if end is not None and received < end:
        raise _RetryableError(f"connection closed after {received} of {end} bytes")


def _read(response) -> bytes:
    try:
        return response.read(_READ_SIZE)
    except _NETWORK_ERRORS as exc:
        raise _RetryableError(_describe(exc)) from exc


def _expected_digests(*, sha256: str | None, md5: str | None) -> dict[str, str]:
    """Normalised {algorithm: hex} of the checksums given, validated for length and alphabet."""
    expected: dict[str, str] = {}
    for algorithm, value in (("sha256", sha256), ("md5", md5)):
        if value is None:
            continue
        digest = value.strip().lower()
        if len(digest) != _HEX_LENGTHS[algorithm] or not re.fullmatch(r"[0-9a-f]+", digest):
            raise ValueError(f"{algorithm} must be {_HEX_LENGTHS[algorithm]} hex digits, got {value!r}")
        expected[algorithm] = digest
    return expected


def _mismatch(path: Path, expected: Mapping[str, str]) -> tuple[str, str, str] | None:
    """First (algorithm, expected, actual) that does not match, or None if all match."""
    if not expected:
        return None
    actual = file_digests(path, expected)
    for algorithm, want in expected.items():
        if actual[algorithm] != want:
            return algorithm, want, actual[algorithm]
    return None


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """(first, last, total) of ``bytes first-last/total`` or ``bytes */total``; None if absent."""
    match = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if match is None:
        return None, None, None
    first, last, total = match.groups()
    return _to_int(first), _to_int(last), _to_int(total)


def _to_int(value: str | None) -> int | None:
    """int(value), or None if it is missing or not a non-negative integer."""
    return int(value) if value is not None and value.strip().isdigit() else None


def _size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _describe(exc: BaseException) -> str:
    """Short reason for a network error, e.g. ``[Errno 111] Connection refused``."""
    reason: object = exc
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
    text = str(reason).strip()
    if isinstance(reason, BaseException) and not text:
        text = type(reason).__name__
    return text or type(exc).__name__


def _error(message: str) -> DownloadError:
    """A DownloadError of one line (a server's reason phrase may hold line breaks), redacted."""
    return DownloadError(redact(re.sub(r"\s*[\r\n]+\s*", " ", message)))
