"""Secrets never printed: URL passwords and secret environment values become ***."""

from __future__ import annotations

import pytest

from bit_core.download import PASSWORD_ENV, TOKEN_ENV, DownloadError
from bit_core.redact import MASK, SECRET_ENV_VARS, redact, redact_value, split_credentials


@pytest.fixture(autouse=True)
def no_secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECRET_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("text, expected", [
    ("http://ci:hunter2@mirror:8080/a.tgz", "http://ci:***@mirror:8080/a.tgz"),
    ("HTTPS://ci:p%40ss@mirror", "HTTPS://ci:***@mirror"),
    ("got 'ftp://u:a@b:c@host/x?y=1'", "got 'ftp://u:***@host/x?y=1'"),  # "@" in the password
    ("a http://u:1@h/x and https://v:2@k/y.", "a http://u:***@h/x and https://v:***@k/y."),
    ('{"url":"http://u:pw@h/a","mail":"x@y"}', '{"url":"http://u:***@h/a","mail":"x@y"}'),
    ("http://u:@h/", "http://u:***@h/"),
    ("http://user@h/a.tgz", "http://user@h/a.tgz"),  # a user name alone is not a secret
    ("http://h/a@b.tgz and mailto:x@y", "http://h/a@b.tgz and mailto:x@y"),
])
def test_url_passwords_are_masked(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_secret_environment_values_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIT_MIRROR_TOKEN", "tok-123")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "tok-123-long")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")
    monkeypatch.setenv("HOME", "/home/ci")  # not a secret

    assert redact("Bearer tok-123-long; tok-123 in /home/ci") == "Bearer ***; *** in /home/ci"


def test_the_mirror_and_mlflow_credential_variables_are_secrets() -> None:
    assert {TOKEN_ENV, PASSWORD_ENV, "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(SECRET_ENV_VARS)


def test_redact_value_recurses_and_keeps_keys_and_other_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIT_MIRROR_PASSWORD", "pw-42")
    params = {"data": {"url": "http://u:x@h/a", "seed": 0, "archive": None},
              "tags": ["pw-42", ("http://u:y@h", 1.5)], "pw-42": True}

    assert redact_value(params) == {
        "data": {"url": f"http://u:{MASK}@h/a", "seed": 0, "archive": None},
        "tags": [MASK, (f"http://u:{MASK}@h", 1.5)], "pw-42": True}


@pytest.mark.parametrize("url, bare, credentials", [
    ("https://ci:p%40ss%3Aw@mirror:8443/d/a.tgz?x=1", "https://mirror:8443/d/a.tgz?x=1",
     ("ci", "p@ss:w")),
    ("http://ci@mirror/a", "http://mirror/a", ("ci", None)),
    ("http://ci:@mirror/a", "http://mirror/a", ("ci", "")),
    ("http://mirror/a@b", "http://mirror/a@b", None),
])
def test_split_credentials(url: str, bare: str, credentials: tuple | None) -> None:
    assert split_credentials(url) == (bare, credentials)


def test_stage_errors_are_printed_redacted(repo_root, monkeypatch, capsys) -> None:
    from tasks.common import stage_main

    monkeypatch.setenv("BIT_PARAMS", str(repo_root / "params.yaml"))
    monkeypatch.setenv("BIT_MIRROR_TOKEN", "tok-9f8e7d")

    def run(args, params):
        raise DownloadError("cannot reach http://ci:hunter2@mirror/a.tgz with tok-9f8e7d")

    assert stage_main("fetch_data", lambda parser: None, run, argv=[]) == 2
    err = capsys.readouterr().err
    assert err == "error: fetch_data: cannot reach http://ci:***@mirror/a.tgz with ***\n"
