"""Decompressing upstream bodies within limits (no I/O)."""

import gzip
import os
import zlib

import pytest

from proxy.upstream.decoding import PIECE, BodyDecoder, DecodeError, DecodeLimitExceeded

MiB = 1024 * 1024


def gzip_of_zeros(size: int) -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    block = b"\0" * MiB
    return b"".join(comp.compress(block) for _ in range(size // MiB)) + comp.flush()


def decode(body: bytes, coding: str | None, split: int = 4096, **limits) -> bytes:
    decoder = BodyDecoder(coding, limits.get("max_total", 256 * MiB), limits.get("max_ratio", 100))
    out = b"".join(piece for i in range(0, len(body), split) for piece in decoder.feed(body[i:i + split]))
    return out + decoder.finish()


@pytest.mark.parametrize("coding, compress", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress),
    ("deflate", lambda b: zlib.compressobj(wbits=-15).compress(b) + zlib.compressobj(wbits=-15).flush()),
    (None, lambda b: b), ("identity", lambda b: b),
])
def test_ordinary_bodies_decode(coding, compress):
    body = b'{"text": "' + b"hello world " * 5000 + b'"}'
    if coding == "deflate" and compress is not zlib.compress:  # raw deflate, as some servers send
        comp = zlib.compressobj(wbits=-15)
        encoded = comp.compress(body) + comp.flush()
    else:
        encoded = compress(body)
    assert decode(encoded, coding) == body


def test_no_step_produces_more_than_a_piece():
    bomb = gzip.compress(b"\0" * (8 * MiB))
    decoder = BodyDecoder("gzip", 64 * MiB, 10_000)
    sizes = [len(p) for p in decoder.feed(bomb)]
    assert max(sizes) <= PIECE and sum(sizes) + len(decoder.finish()) == 8 * MiB


def test_a_gzip_bomb_stops_at_the_ratio():
    bomb = gzip_of_zeros(128 * MiB)  # 128 KiB that inflates to 128 MiB
    with pytest.raises(DecodeLimitExceeded, match="more than 100 times"):
        decode(bomb, "gzip", split=65536)


def test_a_large_body_stops_at_the_absolute_limit():
    body = os.urandom(10 * MiB)  # incompressible: the ratio stays near 1
    with pytest.raises(DecodeLimitExceeded, match="past"):
        decode(gzip.compress(body), "gzip", max_total=4 * MiB)


@pytest.mark.parametrize("coding", ["br", "gzip, gzip", "compress"])
def test_codings_the_proxy_does_not_speak_are_refused(coding):
    with pytest.raises(DecodeError):
        BodyDecoder(coding, MiB, 100)


def test_corrupt_data_is_a_decode_error():
    with pytest.raises(DecodeError):
        decode(b"\x1f\x8b\x08\x00garbage-garbage", "gzip")
