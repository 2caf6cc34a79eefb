"""Secrets never leave: echoed credentials are masked, key ids are keyed hashes.

Upstreams echo keys: a 401 body that quotes the `x-api-key` it refused, a 5xx page that
dumps the request headers, a mid-stream error event, a response header.  Relayed verbatim,
an echo hands the proxy's own provider key to any client (and, in pass-through mode, is
written to the usage row, the spill file and the log).  So every configured provider key
and the request's own credential are masked in everything relayed to the client and in
everything the proxy records.

Masks keep the length of what they replace, so a relayed body keeps its Content-Length and
an SSE event stays exactly as long as the upstream sent it.  Values shorter than
`MIN_SECRET_LENGTH` are not masked: real keys are long, and masking a short value would
mangle ordinary text that happens to contain it.  A secret that the upstream splits across
two SSE events (a model spelling a key out token by token) cannot be recognised in either.

Usage rows carry a client key id: an HMAC of the key under a per-installation secret, so a
leaked database gives no way to test guesses of a key offline.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets as random_secrets
from typing import Iterable

log = logging.getLogger(__name__)

MIN_SECRET_LENGTH = 8
# Request headers that carry a client credential (Anthropic, OpenAI, Azure, Gemini).
CREDENTIAL_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


def mask(length: int) -> str:
    """`[REDACTED---]`, exactly `length` characters long."""
    if length < 10:
        return "*" * length
    return "[REDACTED" + "-" * (length - 10) + "]"


class Redactor:
    """Masks a fixed set of secrets in text, bytes and headers."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        found = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        ordered = sorted(found, key=len, reverse=True)  # a key that contains another first
        self._text = tuple((s, mask(len(s))) for s in ordered)
        # Longest first here too (a set would lose the order): a client whose own key is a
        # prefix of the provider's would otherwise unmask the rest of the provider's key.
        encoded = sorted({s.encode("utf-8", "replace") for s in ordered}, key=len, reverse=True)
        self._bytes = tuple((b, mask(len(b)).encode("ascii")) for b in encoded)
        self.longest = max((len(b) for b, _ in self._bytes), default=0)

    def __bool__(self) -> bool:
        return bool(self._text)

    def with_secrets(self, *more: str | None) -> "Redactor":
        return Redactor([s for s, _ in self._text] + list(more))

    def text(self, value: str) -> str:
        for secret, masked in self._text:
            if secret in value:
                value = value.replace(secret, masked)
        return value

    def data(self, value: bytes) -> bytes:
        for secret, masked in self._bytes:
            if secret in value:
                value = value.replace(secret, masked)
        return value

    def headers(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not self:
            return headers
        return [(name, self.text(value)) for name, value in headers]

    def stream(self) -> "StreamRedactor":
        return StreamRedactor(self)


class StreamRedactor:
    """Masks secrets in a body that arrives in pieces, including one split between pieces:
    the last `longest - 1` bytes wait for the next piece (or `flush`)."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._keep = max(redactor.longest - 1, 0)
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._keep:
            return chunk
        data = self._redactor.data(self._carry + chunk)
        if len(data) <= self._keep:
            self._carry = data
            return b""
        self._carry = data[-self._keep:]
        return data[:-self._keep]

    def flush(self) -> bytes:
        data, self._carry = self._carry, b""
        return data


def request_credentials(headers) -> list[str]:
    """Every credential a client request carries: the API-key headers and the token of
    `Authorization` (Bearer or Basic)."""
    found = [headers.get(name) for name in CREDENTIAL_HEADERS]
    auth = headers.get("authorization") or ""
    scheme, _, token = auth.strip().partition(" ")
    if token.strip():
        found.append(token.strip())
    elif scheme:
        found.append(scheme)
    return [value.strip() for value in found if value and value.strip()]


def client_key_id(credential: str | None, secret: bytes) -> str | None:
    """A stable id for a client key that reveals nothing about it without the secret."""
    if not credential:
        return None
    digest = hmac.new(secret, credential.encode("utf-8", "replace"), hashlib.sha256)
    return "key_" + digest.hexdigest()[:20]


def installation_secret(path: str) -> bytes:
    """The per-installation secret at `path`, created (mode 0600) on first use.

    Created atomically (written to a temporary file, then linked into place), so processes
    starting together all end up with the same secret and none reads a half-written one."""
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.{os.getpid()}.{random_secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, random_secrets.token_hex(32).encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # fails if another process got there first: use theirs
    except FileExistsError:
        pass
    finally:
        os.unlink(temp)
    return _read_secret(path)


def _read_secret(path: str) -> bytes:
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 32:
        raise ValueError(f"installation secret {path} is too short; delete it to make a new one")
    return secret
