"""A worker killed outright (OOM, SIGKILL): what it loses is bounded, told, and its streams
end for their clients as cut connections (which the SDKs retry)."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading

import pytest

from support.builders import anthropic_stream
from support.processes import ProxyProcess, http_get, wait_for
from support.rawhttp import RawResponse
from support.steps import Send, Status, WaitFor, json_reply

pytestmark = pytest.mark.timeout(90)

HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "sk-test"}
ANSWER = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
          "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
          "usage": {"input_tokens": 3, "output_tokens": 2}}


def body(stream: bool) -> dict:
    return {"model": "claude-sonnet-5", "max_tokens": 16, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}


def test_a_killed_worker_is_told_with_the_rows_it_lost_and_its_stream_ends_cut(fake, tmp_path):
    proxy = ProxyProcess(fake.url, tmp_path, LLM_PROXY_SPILL_AFTER="60").start()
    locker = sqlite3.connect(proxy.db_path, timeout=10, isolation_level=None)
    release = threading.Event()
    try:
        worker = http_get(proxy.proxy_url + "/health").json()["pid"]
        locker.execute("BEGIN EXCLUSIVE")  # the writer cannot store: rows stay queued
        for _ in range(3):
            fake.enqueue(json_reply(ANSWER))
            answer = RawResponse(proxy.url, "/v1/messages", body(False), headers=HEADERS).read_head()
            assert answer.status == 200
            answer.read_all()
        events = anthropic_stream()
        fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream"}),
                      Send(b"".join(events[:3])), WaitFor(release, 60)])
        stream = RawResponse(proxy.url, "/v1/messages", body(True), headers=HEADERS, timeout=20)
        stream.read_until(lambda b: b"content_block_start" in b, "the stream's first events")

        os.kill(worker, signal.SIGKILL)
        stream.read_all()
        assert stream.eof_early and not stream.complete  # a cut connection, not an ending
        wait_for(lambda: f"worker {worker} ended without storing 3 usage rows" in proxy.log(),
                 "line telling the rows the killed worker lost", timeout=20)
        locker.execute("ROLLBACK")
        wait_for(lambda: http_get(proxy.proxy_url + "/health").json()["pid"] != worker,
                 "new worker", timeout=20)
        proxy.flush()
        assert proxy.rows() == []  # the three told were indeed lost: none came later
        assert proxy.log().count("ended without storing") == 1  # told once, master or worker
    finally:
        release.set()
        locker.close()
        proxy.stop()


def test_a_worker_that_stops_cleanly_leaves_nothing_to_tell(fake, tmp_path):
    proxy = ProxyProcess(fake.url, tmp_path).start()
    try:
        fake.enqueue(json_reply(ANSWER))
        answer = RawResponse(proxy.url, "/v1/messages", body(False), headers=HEADERS).read_head()
        answer.read_all()
        spill = os.path.join(os.path.dirname(proxy.db_path))
        proxy.flush()
    finally:
        proxy.stop()
    assert "ended without storing" not in proxy.log()
    leftovers = [name for _, _, files in os.walk(spill) for name in files
                 if name.startswith("unwritten-")]
    assert leftovers == []


def test_only_this_hosts_dead_workers_are_claimed_and_odd_names_are_left(tmp_path):
    """A spill directory on shared storage: another host's files are not ours to judge; a
    name that is no pid (or an impossible one) is skipped, never a crash of the master."""
    from proxy import unwritten

    host = unwritten._host()
    dead = 4_000_000  # below Linux's highest pid, and not running here
    layout = unwritten._LAYOUT
    mine = unwritten.UnwrittenCount(str(tmp_path))  # a tracker of this process: never claimed
    mine.set(3, 1)
    for name, counts in [(f"unwritten-{dead}-1@{host}.count", (7, 2)),
                         (f"unwritten-{dead}.count", (1, 0)),  # the older form: this host's
                         (f"unwritten-{dead}-1@elsewhere.count", (9, 0)),
                         (f"unwritten-99999999999999999999-1@{host}.count", (5, 0)),
                         (f"unwritten-{os.getpid()}-999@{host}.count", (4, 1))]:
        (tmp_path / name).write_bytes(layout.pack(*counts))
    told = []
    total = unwritten.report_dead(str(tmp_path), lambda msg, *args: told.append(msg % args))
    assert total == 5 + 1 + 3  # the dead ones, and a predecessor of this process's pid
    assert sorted(name.name for name in tmp_path.iterdir()) == sorted([
        f"unwritten-{dead}-1@elsewhere.count", f"unwritten-99999999999999999999-1@{host}.count",
        os.path.basename(mine.path)])
    assert any(f"worker {dead} ended without storing 5 usage rows" in line for line in told)
    mine.remove()
