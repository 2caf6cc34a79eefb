"""The dedup key of a request: which earlier or live answer it may share.  Free of I/O.

Two requests share an answer only when they come from the same client key, to the same
endpoint, with the same canonical JSON body (key order and whitespace aside) apart from
`stream` and `stream_options`: those change only how the answer is delivered, and a
streamed answer can be delivered again as JSON.  A streamed delivery also needs the same
`stream_options` (they change the events: a usage chunk, obfuscation), which is the key's
`variant`.

Canonicalising a 200 KB body costs about 0.85 ms, four times the dedup budget for a whole
request, so the hot path computes only a *shape* (the scope, the model, the body's keys,
the number of messages and the size of the last one), a few microseconds whatever the body
size.  The canonical digest is computed only when a shape matches something kept or live
(and for the answer that is kept, off the request's path).
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, Callable, Mapping

import orjson

OPT_OUT_HEADER = "x-llm-proxy-dedup"  # request: "off" opts out; response: what happened
_DELIVERY_FIELDS = ("stream", "stream_options")
_OFF_VALUES = frozenset({"off", "0", "false", "no", "none"})


def opted_out(headers: Mapping[str, str]) -> bool:
    """Did the client ask for a fresh answer (`Cache-Control: no-cache`/`no-store`, the
    older `Pragma: no-cache`, or `x-llm-proxy-dedup: off`)?"""
    control = f"{headers.get('cache-control') or ''} {headers.get('pragma') or ''}".lower()
    if "no-cache" in control or "no-store" in control:
        return True
    return (headers.get(OPT_OUT_HEADER) or "").strip().lower() in _OFF_VALUES


def canonical_digest(payload: Any) -> str:
    """The digest of a request body as its meaning: sorted keys, no whitespace, and
    without the delivery fields."""
    if isinstance(payload, dict):
        payload = {k: v for k, v in payload.items() if k not in _DELIVERY_FIELDS}
    return hashlib.sha256(_canonical(payload)).hexdigest()


def _canonical(value: Any) -> bytes:
    """Sorted-key compact JSON.  orjson does it 4-5 times faster than the json module (a
    200 KB body: 0.13 ms against 0.6); what it refuses (integers beyond 64 bits, NaN, lone
    surrogates) the json module writes, so the same value always takes the same path."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return b"json:" + text.encode("utf-8", "surrogatepass")


def stream_variant(stream_options: Any) -> str:
    """`stream_options` as the client sent them, canonical ("" for none)."""
    if stream_options is None:
        return ""
    return json.dumps(stream_options, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class DedupKey:
    """One request's key: its shape at once, its digest on demand (computed once)."""

    def __init__(self, shape: str, body: bytes, payload: dict | None, stream: bool,
                 variant: str) -> None:
        self.shape = shape
        self.stream = stream
        self.variant = variant
        self._source: Any = payload if payload is not None else body
        self._body = body
        self._digest: str | None = None
        self._lock = threading.Lock()
        self.on_shrink: Callable[[int], None] | None = None  # told the bytes the digest freed

    def settle(self) -> None:
        """The request is over: until its digest is computed the key holds its body, not
        the (larger) parsed payload."""
        with self._lock:
            if self._digest is None:
                self._source = self._body
            self._body = b""

    @property
    def held_bytes(self) -> int:
        """What the key holds for its digest to come (a kept answer counts it)."""
        with self._lock:
            return self._held()

    def _held(self) -> int:
        if isinstance(self._source, (bytes, bytearray)):
            return len(self._source)
        return len(self._body or b"")

    def digest(self) -> str:
        """The canonical digest; a body that no longer parses digests as its bytes."""
        freed = 0
        with self._lock:
            if self._digest is None:
                freed = self._held()
                self._digest = digest_of(self._source)
                self._source = self._body = None  # the request is not held for this any longer
            digest, shrunk = self._digest, self.on_shrink
        if freed and shrunk is not None:
            shrunk(freed)
        return digest

    @classmethod
    def known(cls, shape: str, digest: str, stream: bool, variant: str) -> "DedupKey":
        """The key of a kept answer, whose digest is already known."""
        key = cls(shape, b"", None, stream, variant)
        key._digest, key._source, key._body = digest, None, None
        return key


def digest_of(source: Any) -> str:
    if isinstance(source, (bytes, bytearray)):
        return canonical_digest(_parsed(bytes(source)))
    return canonical_digest(source)


def _parsed(body: bytes) -> Any:
    """The body's JSON value (orjson first, as `_canonical`); a body that does not parse
    (it was checked at admission, so never in practice) digests as its bytes."""
    try:
        return orjson.loads(body)
    except ValueError:
        pass
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return {"raw": hashlib.sha256(body).hexdigest()}


def request_key(scope: str, endpoint: str, payload: dict, body: bytes, keep_payload: bool,
                stream: bool, stream_options: Any) -> DedupKey:
    """The key of a parsed request (`stream_options` as the client sent them, before the
    proxy asked for usage).  `keep_payload`: the parsed payload stays in memory anyway, so
    the digest reads it instead of parsing the body again."""
    shape = shape_of(scope, endpoint, payload)
    return DedupKey(shape, body, payload if keep_payload else None, stream,
                    stream_variant(stream_options))


def shape_of(scope: str, endpoint: str, payload: dict) -> str:
    """A cheap digest of what identical requests share: equal keys have equal shapes (so a
    shape that matches nothing rules a duplicate out).  Different requests rarely share
    one: it reads every top-level field briefly (so `temperature`, `seed`, `n` or `tools`
    tell requests apart) and samples the last turn's text at both ends."""
    parts = [scope, endpoint]
    for name in sorted(k for k in payload if k not in _DELIVERY_FIELDS):
        parts += [name, _brief(payload[name])]
    turns = payload.get("messages", payload.get("input"))
    if isinstance(turns, list) and turns:
        parts.append(_sample(turns[-1]))
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"),
                           digest_size=16).hexdigest()


_EDGE = 64  # characters of a long string read from each end


def _brief(value: Any) -> str:
    """A few bytes that tell most different values apart, whatever their size."""
    if isinstance(value, str):
        return f"s{len(value)}:{value[:_EDGE]}{value[-_EDGE:]}"
    if isinstance(value, list):
        return f"l{len(value)}"
    if isinstance(value, dict):
        return "d" + ",".join(sorted(value))[:4 * _EDGE]
    return repr(value)


def _sample(message: Any) -> str:
    """The last turn: its text's size and its strings' ends (a bounded walk)."""
    texts: list[str] = []
    _strings(message, texts, 0)
    return f"{sum(len(t) for t in texts)}:" + "|".join(
        t[:_EDGE] + t[-_EDGE:] for t in texts[:8] + texts[-8:])


def _strings(value: Any, out: list[str], depth: int) -> None:
    if isinstance(value, str):
        out.append(value)
    elif depth <= 4 and isinstance(value, dict):
        for key in sorted(value):
            _strings(value[key], out, depth + 1)
    elif depth <= 4 and isinstance(value, list):
        for item in value[:64]:
            _strings(item, out, depth + 1)
