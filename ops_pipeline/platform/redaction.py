"""Keeping secret values out of logs, metadata, errors and the UI.

A `Redactor` knows the secret values of one run (passwords inside connection URLs, JWT secrets,
AWS keys, registry passwords) and replaces every occurrence with `***`. Everything that leaves an op
as text (streamed command output, error messages, metadata) goes through one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s/]+)@")
# Variable names whose values are secret whatever the release spec says.
SECRET_NAME_HINTS = ("SECRET", "PASSWORD", "TOKEN", "KEY", "CREDENTIAL", "DATABASE_URL", "REDIS_URL", "DSN")


def looks_secret(name: str) -> bool:
    upper = name.upper()
    return any(hint in upper for hint in SECRET_NAME_HINTS)


def mask_url(url: str) -> str:
    """`postgresql://app:s3cret@host/db` -> `postgresql://app:***@host/db` (no-op when there is no password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:{MASK}@{netloc[-1]}", parts.path, parts.query, parts.fragment))


class Redactor:
    """Replaces known secret values (and any URL password) in text."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self.add(*secrets)

    def add(self, *values: str | None) -> Redactor:
        for value in values:
            if not value or len(value) < 4:
                continue
            self._secrets.add(value)
            # The password part of a URL is a secret on its own (it may show up alone in an error).
            try:
                pw = urlsplit(value).password
            except ValueError:
                pw = None
            if pw and len(pw) >= 4:
                self._secrets.add(pw)
        return self

    def __call__(self, text: str) -> str:
        if not text:
            return text
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        # Longest first so that a secret containing another one is masked whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    @property
    def secrets(self) -> frozenset[str]:
        return frozenset(self._secrets)
