"""A local HTTP server for download tests: files from bytes, Range support, injected faults,
required credentials and redirects.

Import the fixture explicitly in a test module (``tests/conftest.py`` is owned elsewhere)::

    from tests.http_fixtures import http_server  # noqa: F401 (pytest fixture)

    def test_something(http_server, tmp_path):
        url = http_server.add("/models/weights.npz", payload)
        ...
        assert http_server.ranges("/models/weights.npz") == [None]

or use :class:`ArchiveServer` directly as a context manager. A path registered with
``basic=(user, password)`` or ``token=...`` answers 401 to any request without those
credentials. Everything listens on 127.0.0.1 only, on a free port chosen by the OS.
"""

from __future__ import annotations

import base64
import binascii
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class _Entry:
    """One served path: its body and the faults to inject."""

    data: bytes
    drop_after: int | None
    drop_times: int
    ignore_range: bool
    status: int | None
    basic: tuple[str, str] | None = None
    token: str | None = None
    redirect: str | None = None
    hits: int = 0

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header satisfies this path (always, if none is required)."""
        if self.basic is None and self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() == "bearer":
            return self.token is not None and value == self.token
        if scheme.lower() != "basic" or self.basic is None:
            return False
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return (user, password) == self.basic


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it.

    Attributes:
        method: ``GET`` or ``HEAD``.
        path: Request path, query string included.
        range: The ``Range`` header, or None.
        status: Status code answered.
        dropped: Whether the connection was cut mid-body on purpose.
        authorization: The ``Authorization`` header, or None.
    """

    method: str
    path: str
    range: str | None
    status: int
    dropped: bool = False
    authorization: str | None = None


class ArchiveServer:
    """Threaded HTTP server on 127.0.0.1 serving registered byte strings.

    Honours ``Range: bytes=N-`` (and ``bytes=N-M``) with 206 and ``Content-Range``, answers 416
    with ``Content-Range: bytes */<size>`` past the end, always sends ``Content-Length``, and
    records every request. Faults are set per path in :meth:`add`.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> ArchiveServer:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="ArchiveServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> ArchiveServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- configuration ---------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` (which starts with ``/``)."""
        return self.base_url + path

    def add(
        self,
        path: str,
        data: bytes,
        *,
        drop_after: int | None = None,
        drop_times: int = 1,
        ignore_range: bool = False,
        status: int | None = None,
        basic: tuple[str, str] | None = None,
        token: str | None = None,
        redirect: str | None = None,
    ) -> str:
        """Serve ``data`` at ``path``, with optional faults; replaces an earlier registration.

        Args:
            path: Request path starting with ``/``, e.g. ``/bit/BiT-M-R50x1.npz``.
            data: Full file content.
            drop_after: Cut the connection after writing this many body bytes (headers promise
                the full length), for the first ``drop_times`` GET requests of ``path``.
            drop_times: How many requests are cut when ``drop_after`` is set.
            ignore_range: Answer 200 with the full body even when a Range is requested.
            status: Answer every request with this error status (e.g. 404, 503) and no file.
            basic: Require HTTP basic authentication with this (user, password).
            token: Require ``Authorization: Bearer <token>`` (either this or ``basic`` will do
                when both are set).
            redirect: Answer 302 with this absolute URL as ``Location`` (after the
                credentials check).

        Returns:
            The absolute URL of ``path``.
        """
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        with self._lock:
            self._entries[path] = _Entry(bytes(data), drop_after, drop_times, ignore_range, status,
                                         basic, token, redirect)
        return self.url(path)

    # -- inspection ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of all requests so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, path: str) -> list[RequestRecord]:
        """Requests of one path, in arrival order."""
        return [r for r in self.requests if r.path == path]

    def ranges(self, path: str) -> list[str | None]:
        """The ``Range`` header of each request of ``path`` (None when absent)."""
        return [r.range for r in self.requests_for(path)]

    def authorizations(self, path: str) -> list[str | None]:
        """The ``Authorization`` header of each request of ``path`` (None when absent)."""
        return [r.authorization for r in self.requests_for(path)]

    # -- used by the handler ---------------------------------------------------------------

    def _lookup(self, path: str, method: str) -> tuple[_Entry | None, int]:
        """The entry of ``path`` and this request's 1-based hit number (GETs only)."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None:
                return None, 0
            if method == "GET":
                entry.hits += 1
            return entry, entry.hits

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)


def _make_handler(server: ArchiveServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # keep test output clean

        def _serve(self, *, body: bool) -> None:
            range_header = self.headers.get("Range")
            authorization = self.headers.get("Authorization")
            entry, hit = server._lookup(self.path, self.command)

            def record(status: int, dropped: bool = False) -> None:
                server._record(RequestRecord(self.command, self.path, range_header, status, dropped,
                                             authorization))

            if entry is not None and not entry.authorized(authorization):
                record(401)
                self._empty(401, {"WWW-Authenticate": 'Basic realm="mirror"'})
                return
            if entry is not None and entry.redirect is not None:
                record(302)
                self._empty(302, {"Location": entry.redirect})
                return
            if entry is None or entry.status is not None:
                status = HTTPStatus.NOT_FOUND if entry is None else entry.status
                record(int(status))
                self._empty(int(status))
                return

            data, size = entry.data, len(entry.data)
            start, end, status = 0, size, 200
            match = _RANGE.fullmatch(range_header.strip()) if range_header else None
            if match and not entry.ignore_range:
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, size) if match.group(2) else size
                if start >= size or start >= end:
                    record(416)
                    self._empty(416, {"Content-Range": f"bytes */{size}"})
                    return
                status = 206

            drop = body and entry.drop_after is not None and hit <= entry.drop_times
            record(status, dropped=drop)  # before answering: the client may be done at once
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "none" if entry.ignore_range else "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            if not body:
                return
            if drop:
                assert entry.drop_after is not None
                self.wfile.write(data[start : min(start + entry.drop_after, end)])
                self.wfile.flush()
                self._cut()
                return
            self.wfile.write(data[start:end])

        def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _cut(self) -> None:
            """Close the socket abruptly after what was written (the client sees a short body)."""
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    return Handler


@pytest.fixture
def http_server() -> Iterator[ArchiveServer]:
    """A started :class:`ArchiveServer`, stopped at teardown."""
    with ArchiveServer() as server:
        yield server
