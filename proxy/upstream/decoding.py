"""Decompressing upstream bodies within limits, piece by piece.

The proxy asks upstreams for `identity`, but one may compress anyway, and a hostile or
broken one can send a gzip bomb: 1 MB that inflates to gigabytes.  urllib3 inflates each
network read whole, so one read could make a worker allocate gigabytes.  Here no call
returns more than `PIECE` bytes, and a body stops with `DecodeLimitExceeded` once it passes
an absolute size or, past its first MiB, a ratio of decoded to compressed bytes that no
real JSON or event stream reaches.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import zlib
from typing import Iterator

PIECE = 64 * 1024  # most bytes one decompress step produces
RATIO_FREE = 1024 * 1024  # the ratio applies once this much has been decoded
_GZIP_WBITS = 16 + zlib.MAX_WBITS
_CODINGS = ("gzip", "x-gzip", "deflate")


class DecodeError(ValueError):
    """The body cannot be decoded (unknown coding, corrupt data)."""


class DecodeLimitExceeded(DecodeError):
    """The body inflates past the size or ratio the proxy accepts."""


def content_codings(header: str | None) -> list[str]:
    """The codings of a Content-Encoding header, `identity` left out, lower case."""
    return [c.strip().lower() for c in (header or "").split(",")
            if c.strip() and c.strip().lower() != "identity"]


class BodyDecoder:
    """Feed raw body bytes, get decoded pieces; `finish` at the end of the body."""

    def __init__(self, content_encoding: str | None, max_total: int, max_ratio: int) -> None:
        codings = content_codings(content_encoding)
        if len(codings) > 1 or (codings and codings[0] not in _CODINGS):
            raise DecodeError(f"unsupported Content-Encoding {content_encoding!r}")
        self.coding = codings[0] if codings else None
        self.max_total = max_total
        self.max_ratio = max_ratio
        self.raw_bytes = 0  # compressed bytes consumed so far (not merely received)
        self.decoded_bytes = 0
        self._inflater = None

    @property
    def identity(self) -> bool:
        return self.coding is None

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.identity:
            if data:
                yield data
            return
        if self._inflater is None:
            if not data:
                return
            self._inflater = zlib.decompressobj(self._wbits(data))
        pending = data
        while pending:
            try:
                out = self._inflater.decompress(pending, PIECE)
            except zlib.error as exc:
                raise DecodeError(f"corrupt {self.coding} data: {exc}") from None
            # The ratio counts input actually consumed: a bomb that arrives in one read is
            # caught after its first MiB of output, not after ratio x the whole read.
            self.raw_bytes += len(pending) - len(self._inflater.unconsumed_tail)
            pending = self._inflater.unconsumed_tail
            if out:
                self._count(len(out))
                yield out

    def has_pending_input(self) -> bool:
        """Input of the last feed is still waiting to be decoded (a piece was handed out)."""
        return self._inflater is not None and bool(self._inflater.unconsumed_tail)

    def finish(self) -> bytes:
        if self._inflater is None:
            return b""
        try:
            out = self._inflater.flush()
        except zlib.error as exc:
            raise DecodeError(f"corrupt {self.coding} data: {exc}") from None
        self._count(len(out))
        return out

    def _wbits(self, first: bytes) -> int:
        if self.coding != "deflate":
            return _GZIP_WBITS
        # "deflate" should be zlib-wrapped (RFC 9110), but some servers send raw deflate.
        if len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0:
            return zlib.MAX_WBITS
        return -zlib.MAX_WBITS

    def _count(self, produced: int) -> None:
        self.decoded_bytes += produced
        if self.decoded_bytes > self.max_total:
            raise DecodeLimitExceeded(
                f"the {self.coding} body inflates past {self.max_total} bytes")
        if self.decoded_bytes > RATIO_FREE and self.decoded_bytes > self.max_ratio * self.raw_bytes:
            raise DecodeLimitExceeded(
                f"the {self.coding} body inflates more than {self.max_ratio} times "
                f"({self.raw_bytes} bytes became over {self.decoded_bytes})")
