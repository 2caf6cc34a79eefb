"""Tools for tests that put a real load on the proxy: many streams, many slow clients.

The scripted fake upstream runs a thread per connection, which is right for exact scripts
but heavy for hundreds of endless streams.  `TickingUpstream` serves any number of them
from one thread: every stream gets one Anthropic content event per tick.  `StreamReader`
reads any number of proxied streams from one thread and tells when each ended, and how
(with the suite's one HTTP response parser and SSE splitter).
`busy_core()` keeps one core busy, as another process on a shared machine would.
`Tricklers` are slow clients: connections that send a byte a second.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from support.processes import ProxyProcess
from support.rawhttp import ResponseParser, build_request
from support.sse import Splitter, is_comment, parse

SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(name: str, obj: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


MESSAGE_START = _event("message_start", {"type": "message_start", "message": {
    "id": "msg_tick", "type": "message", "role": "assistant", "model": "claude-tick",
    "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 1}}})
BLOCK_START = _event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})
def delta_event(text: str) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": text}})


# About what a model sends per event when it writes fast (a few hundred tokens a second).
DELTA_TEXT = "lorem ipsum dolor sit amet, " * 64


class TickingUpstream:
    """An Anthropic-format upstream whose streams never end on their own: one content event
    per stream every `interval` seconds, all from one thread."""

    def __init__(self, interval: float = 0.1, text: str = DELTA_TEXT) -> None:
        self.interval = interval
        self._delta = _chunk(delta_event(text))
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._pending: dict[socket.socket, bytes] = {}  # connections still sending a request
        self.streams: set[socket.socket] = set()
        self.closed_by_peer = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticking-upstream", daemon=True)

    def __enter__(self) -> "TickingUpstream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in list(self.streams) + list(self._pending):
            sock.close()
        self._listener.close()

    def _run(self) -> None:
        next_tick = time.monotonic() + self.interval
        while not self._stop.is_set():
            for key, _ in self._sel.select(max(0.0, next_tick - time.monotonic())):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj)
            if time.monotonic() >= next_tick:
                next_tick += self.interval
                self._tick()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._pending[sock] = b""
        self._sel.register(sock, selectors.EVENT_READ, "conn")

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._forget(sock, peer=True)
            return
        if sock in self.streams:
            return  # nothing more is expected from a client whose stream runs
        buf = self._pending[sock] + data
        head, sep, body = buf.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        if not sep or len(body) < length:
            self._pending[sock] = buf
            return
        del self._pending[sock]
        self.streams.add(sock)
        self._send(sock, SSE_HEAD + _chunk(MESSAGE_START) + _chunk(BLOCK_START))

    def _tick(self) -> None:
        for sock in list(self.streams):
            self._send(sock, self._delta)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)  # small writes to a reader that keeps up: never blocks long
        except OSError:
            self._forget(sock, peer=True)

    def _forget(self, sock: socket.socket, peer: bool) -> None:
        if sock in self.streams or sock in self._pending:
            self.closed_by_peer += peer
        self.streams.discard(sock)
        self._pending.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        sock.close()


@dataclass
class StreamState:
    sock: socket.socket
    parser: ResponseParser = field(default_factory=ResponseParser)
    events: Splitter = field(default_factory=Splitter)
    body: bytes = b""
    ended_at: float | None = None
    first_content_at: float | None = None

    @property
    def complete(self) -> bool:
        """The chunked terminator arrived."""
        return self.parser.complete


class StreamReader:
    """Opens `count` streaming requests to `url` and reads them all from one thread."""

    def __init__(self, url: str, count: int, body: dict, headers: dict | None = None) -> None:
        host, port = url.split("//", 1)[1].split(":")
        request = build_request("POST", "/v1/messages", host, body,
                                {"anthropic-version": "2023-06-01", **(headers or {})})
        self.streams: list[StreamState] = []
        self._sel = selectors.DefaultSelector()
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(request)
            sock.setblocking(False)
            state = StreamState(sock)
            self.streams.append(state)
            self._sel.register(sock, selectors.EVENT_READ, state)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self._sel.get_map():
            for key, _ in self._sel.select(0.05):
                self._read(key.data)

    def _read(self, state: StreamState) -> None:
        try:
            data = state.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        now = time.monotonic()
        with self._lock:
            if not data:
                state.parser.eof()
                state.ended_at = state.ended_at or now
                self._sel.unregister(state.sock)
                state.sock.close()
                return
            for piece in state.parser.feed(data):
                self._received(state, piece, now)
            if state.parser.done:
                state.ended_at = now
                self._sel.unregister(state.sock)
                state.sock.close()

    @staticmethod
    def _received(state: StreamState, piece: bytes, now: float) -> None:
        state.body += piece
        for block in state.events.feed(piece):  # decode every event, as an SDK would
            if not is_comment(block):
                for event in parse(block):
                    event.json
        if state.first_content_at is None and b"content_block_delta" in piece:
            state.first_content_at = now

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if predicate(self.streams):
                    return
            if time.monotonic() > deadline:
                with self._lock:
                    done = sum(1 for s in self.streams if s.ended_at)
                    content = sum(1 for s in self.streams if s.first_content_at)
                raise AssertionError(f"timed out waiting for {what} "
                                     f"({content} with content, {done} ended)")
            time.sleep(0.02)  # the reader thread has no event to wait on per condition

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for state in self.streams:
            state.sock.close()


@contextlib.contextmanager
def busy_core():
    """Keep one core busy, as another process on a shared machine would."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield hog
    finally:
        hog.kill()
        hog.wait()


@dataclass
class ShutdownOutcome:
    """How 200 streams ended after a SIGTERM."""

    ended_after: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def judge_shutdown(streams: list[StreamState], signalled_at: float) -> ShutdownOutcome:
    """Each stream: content, then exactly one terminal overloaded_error, then a clean end."""
    outcome = ShutdownOutcome()
    for i, state in enumerate(streams):
        events = parse(state.body, complete=False)  # a cut stream is reported below
        errors = [(n, d) for n, d in events if n == "error"]
        if not state.complete:
            outcome.problems.append(f"stream {i}: cut without the chunked end")
        elif len(errors) != 1 or events[-1][0] != "error":
            outcome.problems.append(f"stream {i}: {len(errors)} terminal errors, last event "
                                    f"{events[-1][0] if events else None}")
        elif json.loads(errors[0][1])["error"]["type"] != "overloaded_error":
            outcome.problems.append(f"stream {i}: terminal error {errors[0][1]}")
        if state.ended_at is not None:
            outcome.ended_after.append(state.ended_at - signalled_at)
    return outcome


ANTHROPIC_STREAM_BODY = {"model": "claude-tick", "max_tokens": 4096, "stream": True,
                         "messages": [{"role": "user", "content": "count forever"}]}


def sigterm_under_load(tmp, streams: int = 200, interval: float = 0.1, grace: float | None = None,
                       busy: bool = True, workers: int = 2, threads: int = 256) -> dict:
    """SIGTERM a proxy (the default 2 workers x 256 threads) carrying `streams` endless
    streams at one event per `interval`, optionally with one core kept busy; report how every
    stream ended and how many usage rows were written before the workers exited."""
    import signal

    env = {"LLM_PROXY_HEARTBEAT_INTERVAL": "15", "LLM_PROXY_IDLE_TIMEOUT": "120"}
    if grace is not None:
        env["LLM_PROXY_SHUTDOWN_GRACE"] = str(grace)
    hog = busy_core() if busy else contextlib.nullcontext()
    with TickingUpstream(interval) as upstream, hog:
        server = ProxyProcess(upstream.url, tmp, workers=workers, threads=threads, **env).start()
        reader = StreamReader(server.url, streams, ANTHROPIC_STREAM_BODY)
        try:
            reader.wait(lambda ss: all(s.first_content_at for s in ss), 60, "content on every stream")
            signalled_at = time.monotonic()
            server.signal(signal.SIGTERM)
            exit_code = server.proc.wait((grace if grace is not None else 20) + 60)
            exited_after = time.monotonic() - signalled_at
            reader.wait(lambda ss: all(s.ended_at for s in ss), 10, "every stream to end")
        finally:
            reader.close()
            server.stop()
        outcome = judge_shutdown(reader.streams, signalled_at)
        rows = server.rows()
        spill_dir = server.db_path + ".spill"
        spilled = sum(len(open(f"{spill_dir}/{n}").read().splitlines())
                      for n in (os.listdir(spill_dir) if os.path.isdir(spill_dir) else []))
        log = server.log()
    return {
        "exit_code": exit_code, "exited_after": exited_after, "problems": outcome.problems,
        "ended_after": sorted(outcome.ended_after),
        "rows": len(rows), "shutdown_rows": sum(r["end_reason"] == "shutdown" for r in rows),
        "spilled": spilled, "killed": "SIGKILL" in log or "was sent SIGKILL" in log,
        "upstream_closed": upstream.closed_by_peer, "log": log,
    }


class Tricklers:
    """`count` connections that send one byte a second: half trickle their request head, half
    send a whole head and then trickle the body (Content-Length 1 MB)."""

    HEAD_START = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n"
    WHOLE_HEAD = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000\r\n\r\n{")

    def __init__(self, port: int, count: int) -> None:
        self.socks = []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(self.HEAD_START if i % 2 else self.WHOLE_HEAD)
            sock.setblocking(False)
            self.socks.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(1.0):
            for sock in self.socks:
                try:
                    sock.send(b" ")
                except OSError:
                    pass

    def still_open(self) -> int:
        """How many connections the server has not closed."""
        open_count = 0
        for sock in self.socks:
            try:
                open_count += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                open_count += 1
            except OSError:
                pass
        return open_count

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.socks:
            sock.close()
