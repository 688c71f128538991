"""Tests of bit_core.download against a real HTTP server on 127.0.0.1 (no mocks of urllib)."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bit_core import download as download_module
from bit_core.download import DownloadError, download, file_digest
from tests.http_fixtures import ArchiveServer, http_server  # noqa: F401 (pytest fixture)

PATH = "/bit/BiT-M-R50x1.npz"
PAYLOAD = random.Random(1234).randbytes(300_000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
DROP_AT = 120_000  # 40 % of the payload


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _assert_done(dest: Path) -> None:
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "weights" / "BiT-M-R50x1.npz"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening, so connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_complete_download_verified_with_progress_bar(
    http_server: ArchiveServer, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = http_server.add(PATH, PAYLOAD)

    assert download(url, dest, sha256=SHA256, progress=True, what="BiT-M R50x1") == dest

    _assert_done(dest)
    assert http_server.ranges(PATH) == [None]
    assert "BiT-M R50x1" in capsys.readouterr().err  # the bar rendered although not a terminal


def test_dropped_connection_is_resumed_with_range(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD, drop_after=DROP_AT, drop_times=1)

    download(url, dest, sha256=SHA256, progress=False, retries=2)

    _assert_done(dest)
    records = http_server.requests_for(PATH)
    assert [(r.range, r.status, r.dropped) for r in records] == [
        (None, 200, True),
        (f"bytes={DROP_AT}-", 206, False),
    ]


def test_drops_beyond_retries_fail_and_keep_the_partial_file(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD, drop_after=50_000, drop_times=5)

    with pytest.raises(DownloadError, match=r"after 2 attempts") as info:
        download(url, dest, sha256=SHA256, progress=False, retries=1)

    assert str(dest) in str(info.value)
    assert not dest.exists()
    assert _part(dest).read_bytes() == PAYLOAD[:100_000]  # kept so that the next call resumes
    assert http_server.ranges(PATH) == [None, "bytes=50000-"]


def test_existing_partial_file_is_resumed(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(PAYLOAD[:100_000])  # left by an earlier, interrupted process

    download(url, dest, sha256=SHA256, progress=False)

    _assert_done(dest)
    assert [(r.range, r.status) for r in http_server.requests_for(PATH)] == [("bytes=100000-", 206)]


def test_complete_partial_file_answered_416_is_accepted(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)
    dest.parent.mkdir(parents=True)
    _part(dest).write_bytes(PAYLOAD)

    download(url, dest, sha256=SHA256, progress=False)

    _assert_done(dest)
    assert [(r.range, r.status) for r in http_server.requests_for(PATH)] == [(f"bytes={len(PAYLOAD)}-", 416)]


@pytest.mark.parametrize("fault", ["stale_part", "drop"])
def test_server_ignoring_range_restarts_from_zero(http_server: ArchiveServer, dest: Path, fault: str) -> None:
    if fault == "drop":
        url = http_server.add(PATH, PAYLOAD, ignore_range=True, drop_after=DROP_AT)
        expected_ranges = [None, f"bytes={DROP_AT}-"]
    else:
        url = http_server.add(PATH, PAYLOAD, ignore_range=True)
        dest.parent.mkdir(parents=True)
        _part(dest).write_bytes(PAYLOAD[:100_000])  # appending the 200 body would corrupt it
        expected_ranges = ["bytes=100000-"]

    download(url, dest, sha256=SHA256, progress=False, retries=2)

    _assert_done(dest)
    records = http_server.requests_for(PATH)
    assert [r.range for r in records] == expected_ranges
    assert all(r.status == 200 for r in records)


def test_corrupted_content_raises_and_cleans_up(http_server: ArchiveServer, dest: Path) -> None:
    corrupted = bytearray(PAYLOAD)
    corrupted[1000] ^= 0xFF
    url = http_server.add(PATH, bytes(corrupted))

    with pytest.raises(DownloadError) as info:
        download(url, dest, sha256=SHA256, progress=False)

    message = str(info.value)
    assert "sha256" in message and SHA256 in message and url in message
    assert hashlib.sha256(corrupted).hexdigest() in message
    assert "\n" not in message
    assert not dest.exists()
    assert not _part(dest).exists()


def test_unreachable_server_names_url_and_destination(
    closed_port: int, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_module, "_RETRY_DELAY_S", 0.01)
    url = f"http://127.0.0.1:{closed_port}{PATH}"
    started = time.monotonic()

    with pytest.raises(DownloadError) as info:
        download(url, dest, sha256=SHA256, progress=False, retries=1, timeout=2)

    message = str(info.value)
    assert url in message and str(dest) in message
    assert "refused" in message.lower()
    assert "\n" not in message
    assert time.monotonic() - started < 5
    assert not dest.exists()


def test_http_404_fails_at_once_without_retrying(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.url("/missing.npz")

    with pytest.raises(DownloadError, match="404") as info:
        download(url, dest, progress=False, retries=3)

    assert str(dest) in str(info.value)
    assert http_server.ranges("/missing.npz") == [None]


def test_valid_existing_destination_makes_no_request(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(PAYLOAD)

    assert download(url, dest, sha256=SHA256, md5=MD5, progress=False) == dest

    assert http_server.requests == []
    assert dest.read_bytes() == PAYLOAD


def test_invalid_existing_destination_is_downloaded_again(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"truncated")

    download(url, dest, sha256=SHA256, progress=False)

    _assert_done(dest)
    assert http_server.ranges(PATH) == [None]


def test_md5_is_verified(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)

    download(url, dest, md5=MD5.upper(), progress=False)
    _assert_done(dest)

    other = dest.with_name("other.npz")
    wrong = hashlib.md5(b"something else").hexdigest()
    with pytest.raises(DownloadError, match="md5") as info:
        download(url, other, sha256=SHA256, md5=wrong, progress=False)
    assert wrong in str(info.value) and MD5 in str(info.value)
    assert not other.exists() and not _part(other).exists()


def test_bad_arguments_fail_before_any_request(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD)

    with pytest.raises(ValueError, match="sha256"):
        download(url, dest, sha256="abc", progress=False)
    with pytest.raises(ValueError, match="http"):
        download(dest.as_uri(), dest, progress=False)

    assert http_server.requests == []


def test_file_digest(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = PAYLOAD * 4  # > 1 MiB, several chunks
    path.write_bytes(data)

    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()
