"""Shared helpers for the on-demand benchmarks (not collected by pytest).

- imports `ProxyProcess` (tests/conftest.py) and the fake upstream (tests/fakeupstream.py);
- a raw-socket HTTP/1.1 client that timestamps every `recv` (no `iter_lines`, no buffering
  between the socket and the timestamp), with an incremental chunked decoder and SSE splitter;
- custom fake-upstream steps: `TimedDelta` (an Anthropic delta carrying the upstream's
  `time.perf_counter_ns()` taken just before the write) and `WaitForPipe` (wait for a release
  without any polling wake-ups, so 500 silent upstream connections cost nothing while idle);
- /proc helpers (process tree, RSS, CPU ticks, thread counts) and table printing.
"""

from __future__ import annotations

import json
import os
import re
import resource
import select
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent
for p in (str(TESTS), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from conftest import ProxyProcess, free_port  # noqa: E402,F401
from fakeupstream import (  # noqa: E402,F401
    End, FakeUpstream, Send, Sleep, Status, WaitFor, sse,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------------------------
# Statistics and printing


def percentile(values, p: float) -> float:
    """Linear-interpolated percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return float(s[0])
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (k - lo))


def mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def print_table(title: str, header: list[str], rows: list[list], note: str | None = None) -> None:
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print()
    print(title)
    print(line)
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                for j, (c, w) in enumerate(zip(r, widths))) + " |")
        if i == 0:
            print(line)
    print(line)
    if note:
        for n in note.strip().splitlines():
            print("  " + n)
    sys.stdout.flush()


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "n/a"
        if abs(c) >= 100:
            return f"{c:.1f}"
        if abs(c) >= 10:
            return f"{c:.2f}"
        return f"{c:.3f}"
    return str(c)


def machine_load() -> str:
    """The 1-minute load average against the CPU count, with a warning when others are busy:
    these are latency benchmarks on a shared machine, and other processes skew them."""
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    cpus = os.cpu_count() or 1
    text = f"load average (1 min) {load1:.2f} on {cpus} CPUs"
    if load1 > 0.5 * cpus:
        text += "  WARNING: the machine is busy with other work; latency numbers will be noisy"
    return text


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# ---------------------------------------------------------------------------------------------
# Process helpers


def raise_nofile(want: int = 8192) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/*/stat parent pids)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def rss_kb(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * PAGE_KB
        except OSError:
            pass
    return total


def cpu_seconds(pids) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / CLK_TCK


def thread_count(pids) -> int:
    total = 0
    for pid in pids:
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return total


# ---------------------------------------------------------------------------------------------
# Raw HTTP/1.1 client


def build_request(host_port: str, path: str, body: bytes, headers: dict | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host_port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "x-api-key: bench-key", "anthropic-version: 2023-06-01"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ResponseParser:
    """Incremental HTTP/1.1 response parser: feed bytes, get decoded body bytes back."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = "head"
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.remaining = 0

    @property
    def head_done(self) -> bool:
        return self.state != "head"

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        buf = self.buf
        while True:
            st = self.state
            if st == "head":
                i = buf.find(b"\r\n\r\n")
                if i < 0:
                    break
                lines = bytes(buf[:i]).decode("latin-1").split("\r\n")
                del buf[:i + 4]
                self.status = int(lines[0].split()[1])
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    self.headers[k.strip().lower()] = v.strip()
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    self.state = "size"
                elif "content-length" in self.headers:
                    self.remaining = int(self.headers["content-length"])
                    self.state = "length" if self.remaining else "done"
                else:
                    self.state = "close"
            elif st == "size":
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                size = int(bytes(buf[:i]).split(b";")[0].strip(), 16)
                del buf[:i + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.remaining = size
                    self.state = "data"
            elif st in ("data", "length"):
                n = min(self.remaining, len(buf))
                if n == 0:
                    break
                out += buf[:n]
                del buf[:n]
                self.remaining -= n
                if self.remaining == 0:
                    self.state = "crlf" if st == "data" else "done"
            elif st == "crlf":
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                del buf[:2]
                self.state = "size"
            elif st == "trailer":
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                empty = i == 0
                del buf[:i + 2]
                if empty:
                    self.state = "done"
            elif st == "close":
                out += buf
                buf.clear()
                break
            else:  # done
                break
        return bytes(out)

    def eof(self) -> None:
        if self.state == "close":
            self.state = "done"


class SSESplitter:
    """Cuts a body into blocks at blank lines (LF framing, as the fake and the proxy send)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        self.buf += data
        if b"\n\n" not in self.buf:
            return []
        *blocks, self.buf = self.buf.split(b"\n\n")
        return blocks


def is_comment(block: bytes) -> bool:
    return all(line.startswith(b":") for line in block.split(b"\n") if line)


@dataclass
class Exchange:
    status: int
    t_sent: int  # perf_counter_ns just before sendall of the request
    t_head: int  # perf_counter_ns of the recv that completed the response head
    t_first_body: int | None  # ... that delivered the first body byte
    t_end: int  # ... that completed the body
    blocks: list  # (arrival perf_counter_ns, block bytes)
    body_len: int


class RawClient:
    """One keep-alive connection; each exchange is timed at the socket."""

    def __init__(self, url_or_port) -> None:
        port = url_or_port if isinstance(url_or_port, int) else int(str(url_or_port).rsplit(":", 1)[1])
        self.host_port = f"127.0.0.1:{port}"
        self.port = port
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _honour_connection_close(self, parser) -> None:
        """gunicorn closes a kept-alive connection when its worker has too many idle ones."""
        if parser.headers.get("connection", "").lower() == "close":
            self.sock.close()
            self._connect()
            self.reconnects += 1

    def close(self) -> None:
        self.sock.close()

    def get_ms(self, path: str, timeout: float = 30.0) -> float:
        """A GET on the keep-alive connection: request sent -> whole response, in ms."""
        self.sock.settimeout(timeout)
        parser = ResponseParser()
        t0 = time.perf_counter_ns()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host_port}\r\n\r\n".encode())
        while not parser.done:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("connection closed mid-response")
            parser.feed(data)
        elapsed = (time.perf_counter_ns() - t0) / 1e6
        self._honour_connection_close(parser)
        return elapsed

    def post(self, path: str, payload: dict, headers: dict | None = None, timeout: float = 30.0,
             keep_blocks: bool = True) -> Exchange:
        req = build_request(self.host_port, path, json.dumps(payload).encode(), headers)
        parser, sse_split = ResponseParser(), SSESplitter()
        blocks = []
        t_head = t_first = None
        body_len = 0
        self.sock.settimeout(timeout)
        recv = self.sock.recv
        clock = time.perf_counter_ns
        t_sent = clock()
        self.sock.sendall(req)
        while not parser.done:
            data = recv(262144)
            t = clock()
            if not data:
                parser.eof()
                if not parser.done:
                    raise ConnectionError("connection closed mid-response")
                break
            body = parser.feed(data)
            if t_head is None and parser.head_done:
                t_head = t
            if body:
                if t_first is None:
                    t_first = t
                body_len += len(body)
                if keep_blocks:
                    for b in sse_split.feed(body):
                        blocks.append((t, b))
        self._honour_connection_close(parser)
        return Exchange(parser.status, t_sent, t_head, t_first, t, blocks, body_len)


# ---------------------------------------------------------------------------------------------
# Custom fake-upstream steps (duck-typed like fakeupstream's: `run(ex)`)


_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
              b'"delta":{"type":"text_delta","text":"tok "},'
STAMP_RE = re.compile(rb'"seq":(\d+),"t":(\d+)\}')


class TimedDelta:
    """An Anthropic text delta whose payload carries the send time (perf_counter_ns)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def run(self, ex) -> None:
        ex.ensure_status()
        ex.send_body(_DELTA_HEAD + b'"seq":%d,"t":%d}\n\n' % (self.seq, time.perf_counter_ns()))


class WaitForPipe:
    """Wait until the read end of a pipe becomes readable (a release for every waiter at once;
    nobody reads the pipe) or the client hangs up; no timed wake-ups while waiting."""

    def __init__(self, read_fd: int, timeout: float = 120.0) -> None:
        self.read_fd = read_fd
        self.timeout = timeout

    def run(self, ex) -> None:
        poller = select.poll()
        poller.register(ex.conn.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        poller.register(self.read_fd, select.POLLIN)
        deadline = time.monotonic() + self.timeout
        while True:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return
            for fd, _ in poller.poll(wait * 1000):
                if fd == self.read_fd:
                    return
                try:
                    data = ex.conn.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    ex._gone()
                ex.conn.buf += data


def anthropic_event(obj: dict) -> bytes:
    return sse(obj, obj["type"])


MESSAGE_START = anthropic_event({"type": "message_start", "message": {
    "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench",
    "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 1}}})
BLOCK_START = anthropic_event({"type": "content_block_start", "index": 0,
                               "content_block": {"type": "text", "text": ""}})
FIRST_DELTA = anthropic_event({"type": "content_block_delta", "index": 0,
                               "delta": {"type": "text_delta", "text": "Hello"}})
BLOCK_STOP = anthropic_event({"type": "content_block_stop", "index": 0})
MESSAGE_DELTA = anthropic_event({"type": "message_delta",
                                 "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": 20}})
MESSAGE_STOP = anthropic_event({"type": "message_stop"})
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

ANTHROPIC_BODY = {"model": "claude-bench", "max_tokens": 64,
                  "messages": [{"role": "user", "content": "hi"}]}
