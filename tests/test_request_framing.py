"""When an HTTP request is whole (the worker's event loop reads requests with this).

Data-driven: raw request bytes beside what the framer says, fed whole and byte by byte."""

import pytest

from proxy.request_framing import Progress, RequestFraming

BODY = b'{"model":"claude","max_tokens":5}'
HEAD = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"

CASES = {
    "get-no-body": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", Progress.WHOLE),
    "content-length": (HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY, Progress.WHOLE),
    "chunked": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY), Progress.WHOLE),
    "chunked-ext-and-trailer": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                                + b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", Progress.WHOLE),
    "bad-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
                       Progress.HAND_OVER),
    "chunk-without-crlf": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
                           Progress.HAND_OVER),
    "length-and-chunked": (HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                           Progress.HAND_OVER),
    "two-lengths": (HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", Progress.HAND_OVER),
    "bad-length": (HEAD + b"Content-Length: -1\r\n\r\n", Progress.HAND_OVER),
    "too-large": (HEAD + b"Content-Length: 999999999\r\n\r\n", Progress.REFUSE),
    "negative-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n-6\r\n", Progress.HAND_OVER),
    "signed-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n", Progress.HAND_OVER),
    "0x-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n", Progress.HAND_OVER),
    "underscore-chunk-size": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n1_0\r\n", Progress.HAND_OVER),
    "non-ascii-length": (HEAD + b"Content-Length: \xb2\r\n\r\n", Progress.HAND_OVER),
    "endless-length": (HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", Progress.HAND_OVER),
    "chunk-too-large": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2000001\r\n{", Progress.REFUSE),
    "bad-request-line": (b"HELLO\r\n\r\n", Progress.HAND_OVER),
    "header-without-colon": (HEAD + b"oops\r\n\r\n", Progress.HAND_OVER),
    "bare-lf": (b"GET / HTTP/1.1\nHost: x\n\n", Progress.HAND_OVER),
    "bare-lf-in-a-value": (HEAD + b"X-A: a\nb\r\nContent-Length: 5\r\n\r\n", Progress.HAND_OVER),
    "gzip-te": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n", Progress.HAND_OVER),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_request_given_whole_is_judged_at_once(name):
    raw, expected = CASES[name]
    assert RequestFraming(max_body=1 << 20).advance(raw) is expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_byte_by_byte_never_decides_early(name):
    raw, expected = CASES[name]
    framing = RequestFraming(max_body=1 << 20)
    buf = bytearray()
    for i, byte in enumerate(raw):
        buf.append(byte)
        progress = framing.advance(buf)
        if progress is not Progress.MORE:
            break
    assert progress is expected
    if expected is Progress.WHOLE:
        assert i == len(raw) - 1  # not a byte early


@pytest.mark.parametrize("framing, body", [
    (b"Content-Length: 00000000000000000000005\r\n\r\n", b"hello"),  # leading zeros
    (b"Transfer-Encoding: chunked\r\n\r\n", b"5 ;ext=1\r\nhello\r\n0\r\n\r\n"),  # blank before ;
    (b"Transfer-Encoding: chunked\r\n\r\n", b"00000000000000000005\r\nhello\r\n0\r\n\r\n"),
], ids=["length-leading-zeros", "chunk-blank-before-ext", "chunk-leading-zeros"])
def test_what_gunicorn_accepts_is_read_whole_not_handed_over_unfinished(framing, body):
    """A request gunicorn would take must be whole before a thread gets it: handed over
    early, a client could hold the thread by trickling the rest."""
    framing_ = RequestFraming(max_body=1 << 20)
    assert framing_.advance(HEAD + framing + body[:-1]) is Progress.MORE
    assert framing_.advance(HEAD + framing + body) is Progress.WHOLE


def test_head_is_kept_for_the_error_answer():
    framing = RequestFraming(max_body=1 << 20)
    assert framing.advance(HEAD + b"anthropic-version: 2023-06-01\r\nContent-Length: 10\r\n\r\nabc") \
        is Progress.MORE
    head = framing.head
    assert (head.method, head.path, head.header("ANTHROPIC-VERSION")) == \
        ("POST", "/v1/messages", "2023-06-01")


def test_expect_100_continue_is_noticed():
    framing = RequestFraming(max_body=1 << 20)
    framing.advance(HEAD + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert framing.expects_continue


def test_a_huge_head_is_handed_over():
    framing = RequestFraming(max_body=1 << 20, max_head=1000)
    assert framing.advance(HEAD + b"X-Pad: " + b"p" * 2000) is Progress.HAND_OVER


def test_chunked_body_past_the_limit_is_refused_by_the_loop():
    framing = RequestFraming(max_body=10)
    assert framing.advance(HEAD + b"Transfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n") \
        is Progress.REFUSE
    assert framing.refusal.status == 413


@pytest.mark.parametrize("tail, status", [
    (b"f" * 9000, 400),  # a chunk-size line that never ends: gunicorn would wait for more
    (b"0\r\n" + b"X-T: v\r\n" * 3000, 431),  # trailers past the loop's limit
    (b"0" * 5 + b"fffffffffffffffff\r\n", 413),  # 17 hex digits: more than any body may be
], ids=["endless-chunk-line", "endless-trailers", "huge-chunk"])
def test_lines_a_thread_would_wait_for_are_refused_by_the_loop(tail, status):
    framing = RequestFraming(max_body=1 << 20)
    assert framing.advance(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + tail) is Progress.REFUSE
    assert framing.refusal.status == status


def test_pipelined_bytes_after_a_whole_request_are_left_alone():
    framing = RequestFraming(max_body=1 << 20)
    raw = CASES["content-length"][0]
    assert framing.advance(raw + b"GET /health HTT") is Progress.WHOLE
