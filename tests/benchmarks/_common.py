"""Shared helpers for the on-demand benchmarks (not collected by pytest).

- imports `ProxyProcess` and the fake upstream from tests/support/;
- a keep-alive client on the suite's raw HTTP/1.1 client (tests/support/rawhttp.py) that
  timestamps every `recv` (no `iter_lines`, no buffering between the socket and the
  timestamp), the events cut by the suite's SSE splitter (tests/support/sse.py);
- custom fake-upstream steps: `TimedDelta` (an Anthropic delta carrying the upstream's
  `time.perf_counter_ns()` taken just before the write) and `WaitForPipe` (wait for a release
  without any polling wake-ups, so 500 silent upstream connections cost nothing while idle);
- /proc helpers (process tree, RSS, CPU ticks, thread counts) and table printing.
"""

from __future__ import annotations

import os
import re
import resource
import select
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

from support.builders import sse  # noqa: E402
from support.fake import FakeUpstream  # noqa: E402,F401
from support.processes import ProxyProcess, drop_proxy_variables, free_port  # noqa: E402,F401
from support.rawhttp import RawConnection, RawResponse, ResponseParser, build_request  # noqa: E402,F401
from support.sse import Splitter, is_comment  # noqa: E402,F401
from support.steps import End, Send, Sleep, Status, WaitFor  # noqa: E402,F401

drop_proxy_variables()  # loopback only: never through a proxy server

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


BENCH_HEADERS = {"x-api-key": "bench-key", "anthropic-version": "2023-06-01"}


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
    """One keep-alive connection; each exchange is timed at the socket (perf_counter_ns)."""

    def __init__(self, url_or_port) -> None:
        port = url_or_port if isinstance(url_or_port, int) else int(str(url_or_port).rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{port}"
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.conn = RawConnection(self.url, timeout=30.0, nodelay=True)

    def _exchange(self, r: RawResponse) -> RawResponse:
        r.read_all()
        if not r.complete:
            raise ConnectionError("connection closed mid-response")
        if (r.header("connection") or "").lower() == "close":
            # gunicorn closes a kept-alive connection when its worker has too many idle ones
            self.conn.close()
            self._connect()
            self.reconnects += 1
        return r

    def close(self) -> None:
        self.conn.close()

    def get_ms(self, path: str, timeout: float = 30.0) -> float:
        """A GET on the keep-alive connection: request sent -> whole response, in ms."""
        r = self._exchange(RawResponse(self.url, path, None, method="GET", timeout=timeout,
                                       conn=self.conn, clock=time.perf_counter_ns))
        return (r.ended_at - r.sent_at) / 1e6

    def post(self, path: str, payload: dict, headers: dict | None = None, timeout: float = 30.0,
             keep_blocks: bool = True) -> Exchange:
        r = self._exchange(RawResponse(self.url, path, payload, {**BENCH_HEADERS, **(headers or {})},
                                       timeout=timeout, conn=self.conn, clock=time.perf_counter_ns))
        blocks = []
        if keep_blocks:
            splitter = Splitter()
            for t, piece in r.chunks:
                blocks += [(t, block) for block in splitter.feed(piece)]
        return Exchange(r.status, r.sent_at, r.head_at, r.chunks[0][0] if r.chunks else None,
                        r.ended_at, blocks, len(r.body))


# ---------------------------------------------------------------------------------------------
# Custom fake-upstream steps (duck-typed like fakeupstream's: `run(ex)`)


_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
              b'"delta":{"type":"text_delta","text":"tok "},'
STAMP_RE = re.compile(rb'"seq":(\d+),"t":(\d+)\}')
# The stamp inside the delta's text: it survives a translation into another API's events.
TEXT_STAMP_RE = re.compile(rb'@(\d+):(\d+)@')
_TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,' \
                   b'"delta":{"type":"text_delta","text":"'


class TimedDelta:
    """An Anthropic text delta that carries its send time (perf_counter_ns): in the payload,
    or, `in_text`, inside its text (`@seq:t@`), where it survives a translation."""

    def __init__(self, seq: int, in_text: bool = False) -> None:
        self.seq, self.in_text = seq, in_text

    def run(self, ex) -> None:
        ex.ensure_status()
        now = time.perf_counter_ns()
        ex.send_body(_TEXT_DELTA_HEAD + b'tok @%d:%d@"}}\n\n' % (self.seq, now) if self.in_text
                     else _DELTA_HEAD + b'"seq":%d,"t":%d}\n\n' % (self.seq, now))


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
