"""Secrets out of text: the one place that removes passwords and tokens before output.

Two kinds of secret reach messages, logs and MLflow: the password of a URL's userinfo
(``https://user:secret@mirror/...``, which urllib would otherwise take for part of the host) and
the values of the environment variables in :data:`SECRET_ENV_VARS`. :func:`redact` replaces both
by ``***``, keeping the user name and the host so that a message still says what failed.
A URL with a user name and no password (``https://user@mirror/...``) is left as it is: the
password then comes from the environment or ~/.netrc, never from the text.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any

__all__ = ["MASK", "SECRET_ENV_VARS", "redact", "redact_value", "split_credentials"]

MASK = "***"
# Environment variables whose values are secrets, wherever they appear in text.
SECRET_ENV_VARS = (
    "BIT_MIRROR_TOKEN",
    "BIT_MIRROR_PASSWORD",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# scheme://user:secret@ — the secret runs to the last "@" of the authority (as urllib splits it),
# which ends at "/", "?", "#", whitespace, a double quote or an angle bracket.
_USERINFO = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s\"<>]*):(?P<secret>[^/?#\s\"<>]*)@")


def redact(text: str) -> str:
    """``text`` with every URL password and every set secret environment value made ``***``.

    Example: ``http://ci:hunter2@mirror:8080/a.tgz`` becomes ``http://ci:***@mirror:8080/a.tgz``.
    """
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", str(text))
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


def redact_value(value: Any) -> Any:
    """:func:`redact` applied to a string, or to every string inside dicts, lists and tuples.

    Keys are kept; other values (numbers, None, ...) are returned unchanged. Meant for MLflow
    params and tags and for dumps of params.yaml.
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value


def split_credentials(url: str) -> tuple[str, tuple[str, str | None] | None]:
    """The URL without its userinfo, and the (user, password) it held, percent-decoded.

    ``password`` is None for ``scheme://user@host``; the credentials are None when the URL has
    no userinfo (then the URL is returned unchanged).
    """
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return url, None
    user, colon, password = userinfo.partition(":")
    bare = urllib.parse.urlunsplit(parts._replace(netloc=host))
    return bare, (urllib.parse.unquote(user), urllib.parse.unquote(password) if colon else None)


def _secret_values() -> list[str]:
    """The set, non-empty values of SECRET_ENV_VARS, longest first (so none is half-replaced)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV_VARS}
    return sorted((v for v in values if v), key=len, reverse=True)
