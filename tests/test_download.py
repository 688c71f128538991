"""Tests of bit_core.download against a real HTTP server on 127.0.0.1 (no mocks of urllib)."""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from bit_core import download as download_module
from bit_core.download import PASSWORD_ENV, TOKEN_ENV, DownloadError, download
from bit_core.io import file_digest
from tests.http_fixtures import ArchiveServer

PATH = "/bit/BiT-M-R50x1.npz"
PAYLOAD = random.Random(1234).randbytes(300_000)
SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
DROP_AT = 120_000  # 40 % of the payload
USER, PASSWORD = "ci", "s3cr@t:pw"  # "@" and ":" must be percent-encoded in a URL
TOKEN = "tok-5f2a9c81"


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _assert_done(dest: Path) -> None:
    assert dest.read_bytes() == PAYLOAD
    assert not _part(dest).exists()


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ~/.netrc or mirror credentials of the machine running the tests."""
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in (TOKEN_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    return tmp_path / "weights" / "BiT-M-R50x1.npz"


def _with_userinfo(url: str, user: str, password: str | None = None) -> str:
    """``url`` with ``user[:password]@`` (percent-encoded) after the scheme."""
    userinfo = quote(user, safe="") + ("" if password is None else ":" + quote(password, safe=""))
    return url.replace("://", f"://{userinfo}@", 1)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


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


# --- credentials ---------------------------------------------------------------------------------


def test_password_in_the_url_is_sent_as_basic_auth_and_never_shown(
    http_server: ArchiveServer, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _with_userinfo(http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD)), USER, PASSWORD)

    download(url, dest, sha256=SHA256, progress=True, what=url)

    _assert_done(dest)
    assert http_server.authorizations(PATH) == [_basic(USER, PASSWORD)]
    err = capsys.readouterr().err
    assert "***" in err and quote(PASSWORD, safe="") not in err and PASSWORD not in err


def test_wrong_password_fails_at_once_in_one_line_without_it(http_server: ArchiveServer, dest: Path) -> None:
    url = _with_userinfo(http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD)), USER, "Wr0ng-pa55")

    with pytest.raises(DownloadError) as info:
        download(url, dest, sha256=SHA256, progress=False, retries=3)

    message = str(info.value)
    assert "401" in message and "credentials" in message and f"{USER}:***@" in message
    assert "Wr0ng-pa55" not in message and "\n" not in message
    assert [r.status for r in http_server.requests_for(PATH)] == [401]  # not retried


def test_user_in_the_url_and_password_from_the_environment(
    http_server: ArchiveServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    url = _with_userinfo(http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD)), USER)

    download(url, dest, sha256=SHA256, progress=False)

    _assert_done(dest)
    assert http_server.authorizations(PATH) == [_basic(USER, PASSWORD)]


def test_user_without_any_password_fails_before_any_request(http_server: ArchiveServer, dest: Path) -> None:
    url = _with_userinfo(http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD)), USER)

    with pytest.raises(DownloadError, match=f"no password: set {PASSWORD_ENV}.*netrc"):
        download(url, dest, progress=False)

    assert http_server.requests == []


def test_token_from_the_environment_goes_to_mirrors_only(
    http_server: ArchiveServer, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    url = http_server.add(PATH, PAYLOAD, token=TOKEN)

    with pytest.raises(DownloadError, match=f"401.*{TOKEN_ENV}") as info:
        download(url, dest, progress=False)  # not a mirror: an official address never gets it
    assert TOKEN not in str(info.value)
    download(url, dest, sha256=SHA256, progress=False, mirror=True)

    _assert_done(dest)
    assert http_server.authorizations(PATH) == [None, f"Bearer {TOKEN}"]


@pytest.mark.parametrize("where", ["NETRC", "HOME"])
def test_netrc_entry_of_the_host(
    http_server: ArchiveServer, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "NETRC":
        netrc = tmp_path / "credentials"
        monkeypatch.setenv("NETRC", str(netrc))
    else:  # the default ~/.netrc
        (tmp_path / "home").mkdir()
        netrc = tmp_path / "home" / ".netrc"
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("NETRC")
    netrc.write_text(f"machine elsewhere.example login x password y\n"
                     f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    url = http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD))

    download(url, dest, sha256=SHA256, progress=False)

    _assert_done(dest)
    assert http_server.authorizations(PATH) == [_basic(USER, PASSWORD)]


def test_netrc_readable_by_others_is_refused_in_one_line(
    http_server: ArchiveServer, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o644)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC")

    with pytest.raises(DownloadError, match="too permissive.*chmod 600") as info:
        download(http_server.add(PATH, PAYLOAD), dest, progress=False)

    assert PASSWORD not in str(info.value) and "\n" not in str(info.value)
    assert http_server.requests == []


def test_resume_after_a_drop_sends_the_credentials_again(http_server: ArchiveServer, dest: Path) -> None:
    url = http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD), drop_after=DROP_AT)

    download(_with_userinfo(url, USER, PASSWORD), dest, sha256=SHA256, progress=False, retries=2)

    _assert_done(dest)
    auth = _basic(USER, PASSWORD)
    assert [(r.range, r.status, r.dropped, r.authorization) for r in http_server.requests_for(PATH)] == [
        (None, 200, True, auth),
        (f"bytes={DROP_AT}-", 206, False, auth),
    ]


def test_redirect_keeps_the_credentials_on_the_same_host_only(http_server: ArchiveServer, dest: Path) -> None:
    auth = _basic(USER, PASSWORD)
    same = http_server.add("/same", b"", basic=(USER, PASSWORD), redirect=http_server.url(PATH))
    http_server.add(PATH, PAYLOAD, basic=(USER, PASSWORD))
    other = http_server.add("/other.npz", PAYLOAD).replace("127.0.0.1", "localhost")  # other host
    moved = http_server.add("/moved", b"", basic=(USER, PASSWORD), redirect=other)

    download(_with_userinfo(same, USER, PASSWORD), dest, sha256=SHA256, progress=False)
    download(_with_userinfo(moved, USER, PASSWORD), dest.with_name("b.npz"), sha256=SHA256, progress=False)

    assert http_server.authorizations(PATH) == [auth]
    assert http_server.authorizations("/moved") == [auth]
    assert http_server.authorizations("/other.npz") == [None]


def test_two_downloads_of_one_file_take_turns(http_server: ArchiveServer, dest: Path) -> None:
    """Two experiments on one host fetching the same archive into the shared cache: one
    downloads, the other waits and finds it done (they wrote into one .part file before, and
    both failed)."""
    import threading

    payload = random.Random(7).randbytes(24 << 20)
    url = http_server.add("/big.bin", payload)
    start, results = threading.Barrier(2), []

    def fetch() -> None:
        start.wait()
        try:
            results.append(download(url, dest, sha256=hashlib.sha256(payload).hexdigest(),
                                    progress=False))
        except Exception as err:  # noqa: BLE001 (reported by the assertion below)
            results.append(err)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [dest, dest]
    assert dest.read_bytes() == payload and len(http_server.requests_for("/big.bin")) == 1
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]
