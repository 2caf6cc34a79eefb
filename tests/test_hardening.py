"""Hardening end to end: what a hostile client, a broken upstream or a failing disk can do.

Each section is one promise of the hardening issue, tested as the attack run found it
broken: a real proxy under gunicorn (the proxy's own worker), the scripted fake upstream,
raw sockets where bytes matter.  A section's tests fail on the code before its fix.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib

import pytest
import requests

from proxy import formats
from proxy.app import App
from proxy.config import load_config
from proxy.errors import BadRequest, ClientGone, ShuttingDown
from proxy.heartbeat import Exchange
from proxy.pipeline.attempt import Outcome, TryLoop
from proxy.pipeline.finalize import RequestRecord
from proxy.pipeline.request import ProxyRequest
from proxy.pricing import PriceTable

from conftest import fill_filesystem, remount
from support import load
from support.builders import anthropic_error_body, anthropic_message, anthropic_stream, sse
from support.checks import (PROTOS, assert_anthropic_error, assert_error_shape, assert_openai_error,
                            check_terminal_error)
from support.processes import (GUNICORN_CONF, ROOT, ProxyProcess, free_port,
                               without_proxy_variables)
from support.rawhttp import RawResponse, exchange
from support.sse import split
from support.steps import Cut, End, Raw, Send, Stall, Status, WaitFor, json_reply, sse_reply

MiB = 1024 * 1024
SSE_CT = {"Content-Type": "text/event-stream; charset=utf-8"}

ANTHROPIC_JSON = dict(PROTOS["anthropic"].body, stream=False)


def json_body(obj) -> bytes:
    return json.dumps(obj).encode()


def write_config(path, text: str) -> str:
    path.write_text(text)
    return str(path)


# ===========================================================================
# 1. Any text is storable: one odd request can never brick the proxy
# ===========================================================================

SURROGATE_MODEL = b'{"model": "x\\ud800", "max_tokens": 5, "messages": []}'  # json.loads takes it
RAW_SURROGATE_MODEL = b'{"model": "y\xed\xa0\x80", "max_tokens": 5, "messages": []}'  # so does this


def test_poison_text_is_stored_and_the_proxy_serves_after_a_restart(start_proxy, fake, tmp_path):
    db = tmp_path / "poison.db"
    # What a proxy before this fix left behind: a spilled row that could never be replayed.
    spill = tmp_path / "poison.db.spill"
    spill.mkdir()
    (spill / "spill.jsonl").write_text(
        '{"request_id": "req_left_behind", "model_requested": "x\\ud800", "error": "a\\u0000b"}\n')
    server = start_proxy(LLM_PROXY_DB=str(db))
    try:
        # An upstream error message with a lone surrogate (JSON-escaped, as an API echoes it).
        fake.named["poison-400"] = json_reply(json_body({"type": "error", "error": {
            "type": "invalid_request_error", "message": "no such model: x\ud800"}}), status=400)
        bodies = [(SURROGATE_MODEL, {}), (RAW_SURROGATE_MODEL, {}),
                  (json_body({"model": "m" * 100_000, "max_tokens": 5, "messages": []}), {}),
                  (json_body({"model": "line\n2026-11-30 INFO forged", "max_tokens": 5,
                              "messages": []}), {}),
                  (json_body(ANTHROPIC_JSON), {"x-fake-script": "poison-400"})]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            plain = [pool.submit(requests.post, server.url + "/v1/messages", json=ANTHROPIC_JSON,
                                 timeout=10) for _ in range(8)]
            odd = [requests.post(server.url + "/v1/messages", data=b, timeout=10,
                                 headers={"content-type": "application/json", **h}) for b, h in bodies]
            plain = [f.result() for f in plain]
        assert [r.status_code for r in plain] == [200] * 8
        assert [r.status_code for r in odd] == [200, 200, 200, 200, 400]  # the 400 is the upstream's
        ids = [r.headers["x-llm-proxy-request-id"] for r in plain + odd]
        server.flush()
        rows = {r["request_id"]: r for r in server.rows()}
        assert set(ids) <= set(rows) and "req_left_behind" in rows
        models = {rows[i]["model_requested"] for i in ids}
        assert {"x\ufffd", "y\ufffd", "line\n2026-11-30 INFO forged"} <= models
        assert rows["req_left_behind"]["model_requested"] == "x\ufffd"
        assert any(r["error"] == "no such model: x\ufffd" for r in rows.values())
        assert server.health()["tracker"]["spilled"] == 0
    finally:
        server.stop()
    again = start_proxy(LLM_PROXY_DB=str(db))  # the restart
    try:
        r = requests.post(again.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
        assert r.status_code == 200 and again.health()["status"] == "ok"
        assert os.listdir(spill) == []
    finally:
        again.stop()


# ===========================================================================
# 2. The proxy serves while the usage store is down
# ===========================================================================

def run_master(env: dict, timeout: float = 30) -> subprocess.CompletedProcess:
    """gunicorn as deployed, expected to refuse to start."""
    full = {k: v for k, v in without_proxy_variables(os.environ).items()
            if not k.startswith("LLM_PROXY_")}
    full.update({"PYTHONPATH": str(ROOT), "LLM_PROXY_BIND": f"127.0.0.1:{free_port()}", **env})
    return subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF),
                           "proxy.wsgi:application"], env=full, cwd=str(ROOT),
                          capture_output=True, timeout=timeout)


def test_a_database_path_that_cannot_work_is_a_clear_start_up_error(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the database directory should be")
    started = time.monotonic()
    done = run_master({"LLM_PROXY_DB": str(blocker / "usage.db")})
    assert done.returncode != 0 and time.monotonic() - started < 20
    stderr = done.stderr.decode()
    lines = [line for line in stderr.splitlines() if line.startswith("llm-proxy:")]
    assert len(lines) == 1 and str(blocker) in lines[0], stderr
    assert "Booting worker" not in stderr  # the master stopped before any worker ran


def test_a_read_only_database_directory_is_a_clear_start_up_error(small_fs):
    remount(small_fs, "ro")
    done = run_master({"LLM_PROXY_DB": str(small_fs / "usage.db")})
    assert done.returncode != 0
    assert f"llm-proxy: usage database {small_fs / 'usage.db'}" in done.stderr.decode()


def test_requests_flow_while_the_disk_is_full_and_every_row_arrives_when_it_clears(
        start_proxy, tmp_path, small_fs):
    server = start_proxy(LLM_PROXY_DB=str(small_fs / "usage.db"),
                         LLM_PROXY_SPILL_DIR=str(tmp_path / "spill"), LLM_PROXY_SPILL_AFTER="0.3")
    try:
        assert requests.post(server.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10).status_code == 200
        server.flush()
        filler = fill_filesystem(small_fs)
        written_before = server.health()["tracker"]["written"]
        ids = []
        for i in range(60):
            proto = PROTOS[("anthropic", "chat", "responses")[i % 3]]
            r = requests.post(server.url + proto.path, json=dict(proto.body, stream=bool(i % 2)),
                              timeout=10)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-llm-proxy-request-id"])
        def accounted(tracker: dict) -> int:  # a page or two may still fit: those rows are stored
            return tracker["spilled"] + tracker["written"] - written_before

        deadline = time.monotonic() + 15
        while accounted((health := server.health())["tracker"]) < 60 and time.monotonic() < deadline:
            time.sleep(0.1)  # the writer moves rows to disk on its own schedule
        assert health["status"] == "degraded", health
        tracker = health["tracker"]
        assert (tracker["state"], tracker["fault"], tracker["dropped"]) == ("degraded", "disk_full", 0)
        assert accounted(tracker) == 60 and tracker["spilled"] > 30 and tracker["spill_bytes"] > 0
        started = time.monotonic()  # nobody can hold threads by asking for a flush meanwhile
        assert requests.get(server.url + "/health", params={"flush": "1"}, timeout=10).ok
        assert time.monotonic() - started < 1.0
        os.remove(filler)
        deadline = time.monotonic() + 20
        while not set(ids) <= {r["request_id"] for r in server.rows()}:
            assert time.monotonic() < deadline, "rows never reached the database"
            time.sleep(0.1)
        health = server.health()
        assert health["status"] == "ok" and health["tracker"]["spill_bytes"] == 0
    finally:
        server.stop()


# ===========================================================================
# 3. Shutdown keeps its promise under load
# ===========================================================================

@pytest.mark.timeout(150)  # 200 streams to set up and a minute for the workers to exit
@pytest.mark.identical_requests
def test_sigterm_with_200_streams_on_a_busy_machine_ends_each_once_and_loses_no_row(tmp_path):
    """200 streams at 10 events/s on the default 2 workers x 256 threads, one core kept busy
    by another process; the grace is 1 s here (the default 20 s is run ten times over by
    tests/benchmarks/bench_shutdown.py), gunicorn's graceful_timeout follows from it."""
    result = load.sigterm_under_load(tmp_path, streams=200, grace=1.0, busy=True)
    assert result["problems"] == [], result["problems"][:5]
    assert (result["exit_code"], result["killed"]) == (0, False)
    assert (result["rows"], result["shutdown_rows"], result["spilled"]) == (200, 200, 0)
    assert result["upstream_closed"] == 200  # every upstream connection was let go
    assert 1.0 <= result["ended_after"][0] and result["ended_after"][-1] < 6.0, result["ended_after"]


def test_a_worker_records_the_rows_of_its_last_requests_before_it_closes_the_tracker(tmp_path):
    """Stream threads record their rows after the client got its last byte; the worker must
    wait for them (and record a straggler itself) before it closes the usage writer."""
    app = App(load_config(env={"LLM_PROXY_DB": str(tmp_path / "u.db")}))
    app.start()

    def account(request_id: str) -> RequestRecord:
        record = RequestRecord(app.tracker, PriceTable({}), request_id=request_id,
                               endpoint="anthropic", client_key_id=None, bytes_in=0,
                               on_finish=app.inflight.done)
        app.inflight.add(record)
        return record

    late = account("req_late")
    account("req_stuck")  # its thread never records it: the worker must
    threading.Timer(0.3, lambda: late.failed(200, ShuttingDown("ended at shutdown"))).start()
    app.close(timeout=3)
    conn = sqlite3.connect(tmp_path / "u.db")
    rows = dict(conn.execute("SELECT request_id, end_reason FROM usage_records"))
    conn.close()
    assert rows == {"req_late": "shutdown", "req_stuck": "shutdown"}
    assert not os.path.exists(tmp_path / "u.db.spill" / "spill.jsonl")


# ===========================================================================
# 4. Only upstream faults count against a deployment
# ===========================================================================

def test_a_client_sending_unsendable_headers_never_opens_a_breaker(start_proxy, fake, tmp_path):
    config = write_config(tmp_path / "brk.toml", f"""
[providers.anthropic]
base_url = "{fake.url}"
[breaker]
failure_threshold = 2
[routes."claude-brk-*"]
deployments = [{{ provider = "anthropic", name = "only" }}]
""")
    server = start_proxy(LLM_PROXY_CONFIG=config)
    body = json_body(dict(ANTHROPIC_JSON, model="claude-brk-1"))
    for value in (b"\xa0starts-with-nbsp", b"\x85starts-with-nel", b"\x01control"):
        for _ in range(3):
            r = RawResponse(server.url, "/v1/messages", body,
                            headers=[("X-Odd", value.decode("latin-1"))]).read_head()
            assert r.status == 400, r.status
            error = r.json()
            assert_anthropic_error(error, "invalid_request_error")
            assert "x-odd" in error["error"]["message"].lower()  # said before any try
            row = server.row(r.request_id)
            assert (row["status"], row["end_reason"], row["deployment"]) == (400, "rejected", None)
    assert fake.requests == []  # nothing was sent upstream
    ok = requests.post(server.url + "/v1/messages", data=body, timeout=10,
                       headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.headers["x-llm-proxy-deployment"] == "only"
    assert server.health()["breakers"]["only"] == {"state": "closed", "recent_failures": 0,
                                                   "recent_attempts": 1}
    server.stop()


def test_a_request_the_upstream_client_cannot_send_is_the_clients_fault_not_the_deployments(tmp_path):
    """The second line of defence: should admission miss a header, the upstream client
    refuses it before any I/O, and the try neither retries nor counts against the breaker."""
    config_path = write_config(tmp_path / "c.toml", """
[providers.anthropic]
base_url = "http://127.0.0.1:9"
[routes."claude-x-*"]
deployments = [{ provider = "anthropic", name = "a" }, { provider = "anthropic", name = "b" }]
""")
    app = App(load_config(config_path, env={"LLM_PROXY_DB": str(tmp_path / "u.db")}))
    route = app.router.route_for("claude-x-1", "anthropic", lambda name: True)
    preq = ProxyRequest(request_id="req_t", endpoint="anthropic", fmt=formats.ANTHROPIC, route=route,
                        method="POST", path="/v1/messages", body=b"{}",
                        headers=[("X-Odd", "\xa0value")], model="claude-x-1")
    record = RequestRecord(app.tracker, PriceTable({}), request_id="req_t", endpoint="anthropic",
                           client_key_id=None, bytes_in=2)
    final = TryLoop(app.proxy.relay.tries, preq, record, Exchange(None, None, lambda err: None)).run(
        lambda resp, attempt: Outcome.taken())
    assert isinstance(final.error, BadRequest) and "cannot be sent upstream" in final.error.message
    assert record.row.attempts == 1  # not retried, not moved on to deployment b
    assert app.router.breakers.snapshot() == {
        "a": {"state": "closed", "recent_failures": 0, "recent_attempts": 0}}
    app.close(1)


def test_a_request_ended_before_its_try_gives_a_half_open_circuit_its_probe_back(tmp_path):
    """The plan reserves a half-open circuit's single probe for a try; a request that ends
    (client gone, shutdown) before sending it must hand the probe back, or that deployment
    is skipped in this worker until a restart."""
    config_path = write_config(tmp_path / "c.toml", """
[providers.anthropic]
base_url = "http://127.0.0.1:9"
[breaker]
failure_threshold = 1
cooldown = 0
[routes."claude-x-*"]
deployments = [{ provider = "anthropic", name = "a" }]
""")
    app = App(load_config(config_path, env={"LLM_PROXY_DB": str(tmp_path / "u.db")}))
    breaker = app.router.breakers.get("a")
    breaker.record_failure("down")  # open; with no cool-down the next allow() is the probe
    route = app.router.route_for("claude-x-1", "anthropic", lambda name: True)
    preq = ProxyRequest(request_id="req_t", endpoint="anthropic", fmt=formats.ANTHROPIC, route=route,
                        method="POST", path="/v1/messages", body=b"{}", headers=[], model="claude-x-1")
    record = RequestRecord(app.tracker, PriceTable({}), request_id="req_t", endpoint="anthropic",
                           client_key_id=None, bytes_in=2)
    exchange = Exchange(None, None, lambda err: None)
    exchange.end(ClientGone("the client left"))
    final = TryLoop(app.proxy.relay.tries, preq, record, exchange).run(
        lambda resp, attempt: Outcome.taken())
    assert isinstance(final.error, ClientGone)
    assert breaker.allow()  # the probe is free again
    app.close(1)


# ===========================================================================
# 5. No secret leaves through an echo
# ===========================================================================

PROVIDER_KEY = "sk-ant-PROVIDER-0123456789abcdef"
CLIENT_KEY = "sk-ant-CLIENT-fedcba9876543210"


def echo(text: str) -> str:
    return f"{text} (x-api-key was {PROVIDER_KEY}; the caller sent {CLIENT_KEY})"


def read_if_there(path) -> str:
    """A spill file's text, or nothing: the writer may claim it (a rename) as we list it."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def test_echoed_keys_are_masked_everywhere(start_proxy, fake, tmp_path):
    """Provider key and client key, echoed by the upstream in a 401 body, a 5xx page, a
    response header, a mid-stream error event and a JSON answer: masked in what the client
    gets, in rows, in spill lines, in the log and in /health."""
    config = write_config(tmp_path / "keys.toml", f"""
[auth]
mode = "open"
[providers.anthropic]
base_url = "{fake.url}"
api_key_env = "TEST_PROVIDER_KEY"
[breaker]
failure_threshold = 100
[routes."claude-keys-*"]
deployments = [{{ provider = "anthropic", name = "keyed" }}]
""")
    server = start_proxy(LLM_PROXY_CONFIG=config, TEST_PROVIDER_KEY=PROVIDER_KEY,
                         LLM_PROXY_SPILL_DIR=str(tmp_path / "spill"), LLM_PROXY_SPILL_AFTER="0")
    lock = None
    try:
        requests.post(server.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
        server.flush()
        lock = sqlite3.connect(server.db_path, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # rows now go to the spill directory: check them there
        events = anthropic_stream()
        committed = threading.Event()
        scripts = [
            json_reply(anthropic_error_body("authentication_error", echo("invalid key")), status=401,
                       headers={"x-echo": PROVIDER_KEY}),
            [Status(502, headers={"Content-Type": "text/html", "x-echo": CLIENT_KEY},
                    body_mode="length"), Send(f"<h1>{echo('bad gateway')}</h1>".encode()), End()],
            sse_reply(events[:4] + [sse({"type": "error", "error": {
                "type": "overloaded_error", "message": echo("overloaded")}}, "error")],
                headers={"x-echo": f"Bearer {PROVIDER_KEY}"}),
            json_reply(anthropic_message(text=echo("the model repeats")), headers={"x-echo": CLIENT_KEY}),
            # a 401 after the stream committed to 200: the terminal error quotes its message
            [WaitFor(committed, timeout=8)] + json_reply(
                anthropic_error_body("authentication_error", echo("invalid key")), status=401),
        ]
        received = []
        for i, script in enumerate(scripts):
            fake.named[f"echo{i}"] = script
            stream = i in (2, 4)
            r = RawResponse(server.url, "/v1/messages",
                            dict(ANTHROPIC_JSON, model="claude-keys-1", stream=stream),
                            headers={"x-api-key": CLIENT_KEY, "x-fake-script": f"echo{i}"}).read_head()
            if i == 4:
                committed.set()  # the 200 is out: now the upstream answers 401
            body = r.read_all()
            received.append((r, body))
            raw = json.dumps(r.headers).encode() + body
            assert PROVIDER_KEY.encode() not in raw and CLIENT_KEY.encode() not in raw, raw
            assert b"[REDACTED" in raw, raw
        assert [r.status for r, _ in received] == [401, 502, 200, 200, 200]
        assert fake.requests[-1].headers["x-api-key"] == PROVIDER_KEY  # the upstream got the real one
        check_terminal_error("anthropic", split(received[2][1])[0][-1], anthropic_type="overloaded_error")
        assert b"[REDACTED" in split(received[4][1])[0][-1]
        deadline = time.monotonic() + 20
        spill_text = ""
        while spill_text.count('"request_id"') < 5 and time.monotonic() < deadline:
            names = os.listdir(tmp_path / "spill") if (tmp_path / "spill").is_dir() else []
            spill_text = "".join(read_if_there(tmp_path / "spill" / n) for n in names)
            time.sleep(0.1)
        assert spill_text.count("[REDACTED") >= 4, spill_text
        health = requests.get(server.url + "/health", timeout=5).text
        lock.execute("ROLLBACK")
        lock.close()
        lock = None
        ids = [r.request_id for r, _ in received]
        rows = {r["request_id"]: r for r in wait_for_rows(server, ids)}
    finally:
        if lock is not None:
            lock.close()
        server.stop()
    log = server.log()
    for text in (spill_text, health, log, json.dumps(rows)):
        assert PROVIDER_KEY not in text and CLIENT_KEY not in text
    errors = [rows[i]["error"] for i in ids]
    assert "[REDACTED" in errors[0] and "[REDACTED" in errors[2], errors
    # key ids: a keyed hash under this installation's secret, not a bare SHA-256 prefix
    secret = (tmp_path / "installation-secret").read_bytes().strip()
    expected = "key_" + hmac.new(secret, CLIENT_KEY.encode(), hashlib.sha256).hexdigest()[:20]
    assert {rows[i]["client_key_id"] for i in ids} == {expected}
    assert hashlib.sha256(CLIENT_KEY.encode()).hexdigest()[:16] not in json.dumps(rows)


def wait_for_rows(server: ProxyProcess, ids: list[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in server.rows() if r["request_id"] in ids]
        if len(rows) >= len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)  # replay of the spill directory runs on the writer's schedule


def test_health_shows_breaker_states_and_counts_only(start_proxy, fake, tmp_path):
    config = write_config(tmp_path / "h.toml", f"""
[providers.anthropic]
base_url = "{fake.url}"
[routes."claude-h-*"]
deployments = [{{ provider = "anthropic", name = "h" }}]
""")
    server = start_proxy(LLM_PROXY_CONFIG=config)
    fake.enqueue(json_reply(anthropic_error_body("api_error", echo("down")), status=500))
    requests.post(server.url + "/v1/messages", json=dict(ANTHROPIC_JSON, model="claude-h-1"),
                  headers={"x-api-key": CLIENT_KEY}, timeout=10)
    breaker = server.health()["breakers"]["h"]
    server.stop()
    assert breaker == {"state": "closed", "recent_failures": 1, "recent_attempts": 2}  # retried


# ===========================================================================
# 6. Bounded memory and CPU for any input
# ===========================================================================

@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of zeros."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    block = b"\0" * MiB
    return b"".join(comp.compress(block) for _ in range(1024)) + comp.flush()


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_a_gzip_bomb_is_a_clear_upstream_error_and_the_worker_stays_small(start_proxy, fake,
                                                                          gzip_bomb, kind):
    server = start_proxy(LLM_PROXY_COMMIT_AFTER="5")
    before = server.worker_peak_rss()
    content_type = "application/json" if kind == "json" else "text/event-stream"
    fake.enqueue([Status(200, headers={"Content-Type": content_type, "Content-Encoding": "gzip"}),
                  Send(gzip_bomb), End()])
    r = RawResponse(server.url, "/v1/messages", dict(ANTHROPIC_JSON, stream=kind == "sse"),
                    timeout=20).read_head()
    if kind == "json":  # read before its status goes out: a clean 502
        assert r.status == 502, r.status
        message = r.json()["error"]["message"]
        assert_anthropic_error(r.json(), "api_error")
    else:  # an unrouted stream commits on the upstream's 200: one terminal error
        assert r.status == 200
        body = r.read_all()
        assert r.complete
        message = check_terminal_error("anthropic", split(body)[0][-1])["message"]
    assert "inflates" in message
    row = server.row(r.request_id)
    assert (row["status"], row["end_reason"]) == (r.status, "upstream_error")
    grew = server.worker_peak_rss() - before
    assert grew < 150 * MiB, f"the worker grew by {grew / MiB:.0f} MiB"


def test_an_sse_line_that_never_ends_is_cut_off_and_the_worker_stays_small(start_proxy, fake):
    server = start_proxy(LLM_PROXY_MAX_EVENT_BYTES=str(4 * MiB))
    before = server.worker_peak_rss()
    events = anthropic_stream()
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in events[:4]]
                 + [Send(b"data: ")] + [Send(b"x" * MiB)] * 64 + [Stall()])
    started = time.monotonic()
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=20).read_head()
    body = r.read_all()
    assert r.complete and time.monotonic() - started < 10
    last = split(body)[0][-1]
    error = check_terminal_error("anthropic", last, anthropic_type="api_error")
    assert "larger than" in error["message"]
    [upstream] = fake.wait_for_requests(1)
    assert upstream.peer_closed.wait(5)  # the proxy let go of the upstream
    row = server.row(r.request_id)
    assert row["end_reason"] == "upstream_error" and row["output_tokens"] >= 1
    grew = server.worker_peak_rss() - before
    assert grew < 100 * MiB, f"the worker grew by {grew / MiB:.0f} MiB"


def test_a_chunk_of_gigabytes_announced_and_trickled_is_cut_at_the_event_limit(start_proxy, fake):
    """A chunk header may announce 2 GiB; the proxy reads it in pieces (the event limit
    applies), not whole (which waited for all of it, growing, past any limit)."""
    server = start_proxy(LLM_PROXY_MAX_EVENT_BYTES=str(MiB), LLM_PROXY_IDLE_TIMEOUT="5")
    before = server.worker_peak_rss()
    fake.enqueue([Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n7fffffff\r\ndata: ")]
                 + [Raw(b"x" * 65536)] * 64 + [Stall()])
    started = time.monotonic()
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=20).read_head()
    body = r.read_all()
    assert r.complete and time.monotonic() - started < 4  # well before the 5 s idle timeout
    assert "larger than" in check_terminal_error("anthropic", split(body)[0][-1])["message"]
    assert server.worker_peak_rss() - before < 50 * MiB


@pytest.mark.parametrize("size_line", [b"-1", b"f" * (20 * MiB)], ids=["negative", "endless"])
def test_an_upstream_chunk_size_line_cannot_make_the_proxy_read_without_bound(start_proxy, fake,
                                                                           size_line):
    """urllib3 reads a chunk-size line however long it is, and takes "-1" as "read to the
    end of the connection"; the proxy's reader of that line has bounds."""
    server = start_proxy(LLM_PROXY_COMMIT_AFTER="5")
    before = server.worker_peak_rss()
    events = anthropic_stream()
    fake.enqueue([Raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n"
                      + b"%x\r\n%s\r\n" % (len(events[0]), events[0]) + size_line),
                  Raw(b"\r\n" + b"x" * MiB), Stall()])
    started = time.monotonic()
    r = RawResponse(server.url, "/v1/messages", PROTOS["anthropic"].body, timeout=20).read_head()
    body = r.read_all() if r.status == 200 else r.json()
    assert time.monotonic() - started < 4
    if r.status == 200:
        check_terminal_error("anthropic", split(body)[0][-1])
    else:
        assert r.status == 502
    assert server.worker_peak_rss() - before < 50 * MiB


def test_a_deeply_nested_upstream_error_body_is_relayed_not_a_proxy_500(proxy, fake):
    fake.enqueue(json_reply(b"[" * 100_000, status=503))
    r = requests.post(proxy.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
    assert r.status_code == 503 and r.content == b"[" * 100_000
    row = proxy.row(r.headers["x-llm-proxy-request-id"])
    assert (row["status"], row["end_reason"]) == (503, "upstream_error")


@pytest.mark.timeout(120)  # four 31 MiB uploads on a busy machine
def test_request_bodies_cost_memory_within_the_budget(start_proxy, fake):
    """32 MiB of `{}` would take ~1.6 GB to parse: refused up front (413), four at once
    included, and the worker never swells; a body that fits waits for none of that."""
    server = start_proxy()
    before = server.worker_peak_rss()
    body = b'{"model": "claude", "pad": [' + b",".join([b"{}"] * 11_000_000) + b"]}"
    assert 31 * MiB < len(body) < 32 * MiB

    def send(_):
        return RawResponse(server.url, "/v1/messages", body, timeout=60).read_head()

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    for r in answers:
        assert r.status == 413
        assert_anthropic_error(r.json(), "request_too_large")
        assert server.row(r.request_id)["end_reason"] == "rejected"
    grew = server.worker_peak_rss() - before
    assert grew < 400 * MiB, f"the worker grew by {grew / MiB:.0f} MiB"
    assert fake.requests == []


def test_a_full_memory_budget_refuses_with_503_or_529_and_retry_after(start_proxy, fake):
    """While one request holds its body, another that would not fit beside it (but would
    alone) is refused with the endpoint's overloaded answer; once the first ends, it fits."""
    from proxy.limits import json_parse_cost

    holder_body = json_body(dict(PROTOS["anthropic"].body, pad="p" * (3 * MiB)))
    second = {name: json_body(dict(PROTOS[name].body, stream=False, pad="q" * (3 * MiB)))
              for name in ("anthropic", "chat")}
    costs = [len(b) + json_parse_cost(b) for b in second.values()]
    budget = len(holder_body) + min(costs) - 1  # each fits alone, none beside the holder's body
    assert max(costs) <= budget and len(holder_body) + json_parse_cost(holder_body) <= budget
    server = start_proxy(LLM_PROXY_MEMORY_BUDGET=str(budget), LLM_PROXY_COMMIT_AFTER="5")
    release = threading.Event()
    fake.named["hold"] = [Status(200, headers=SSE_CT), WaitFor(release, 20), End()]
    holder = RawResponse(server.url, "/v1/messages", holder_body,
                         headers={"x-fake-script": "hold"}, timeout=30)
    fake.wait_for_requests(1)  # its body is held while it runs
    try:
        for name, status in (("anthropic", 529), ("chat", 503)):
            r = RawResponse(server.url, PROTOS[name].path, second[name]).read_head()
            assert r.status == status, (name, r.status)
            assert r.header("retry-after") == "1"
            assert_error_shape(name, r.json(), "overloaded_error")
            assert server.row(r.request_id)["end_reason"] == "rejected"
    finally:
        release.set()
    holder.read_all()
    r = RawResponse(server.url, "/v1/messages", second["anthropic"]).read_head()
    assert r.status == 200  # the budget came back when the first request ended
    r.read_all()
    server.row(r.request_id)  # finished: its memory is given back with its row
    assert server.health()["memory_budget"]["used"] == 0


def test_the_usage_report_is_bounded(start_proxy):
    server = start_proxy()
    requests.post(server.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
    server.flush()
    now = time.time()
    conn = sqlite3.connect(server.db_path)
    conn.executemany("INSERT INTO usage_records (request_id, started_at, client_key_id, endpoint, "
                     "end_reason, input_tokens) VALUES (?, ?, ?, 'anthropic', 'complete', 1)",
                     [(f"req_{i}", now - i % 30 * 3600, f"key_{i}") for i in range(5000)])
    conn.commit()
    conn.close()
    started = time.monotonic()
    r = requests.get(server.url + "/usage", timeout=30)
    assert r.status_code == 200 and time.monotonic() - started < 5
    summary = r.json()
    assert len(summary["by_client_key"]) == 50 and summary["groups"]["by_client_key"] == 5001
    assert summary["totals"]["requests"] == 5001
    assert len(requests.get(server.url + "/usage", params={"top": 5}, timeout=30).json()["by_client_key"]) == 5
    for params in ({"since": "2020-01-01"}, {"top": "0"}, {"top": "100000"}, {"since": "soon"}):
        bad = requests.get(server.url + "/usage", params=params, timeout=10)
        assert bad.status_code == 400, params
        assert_openai_error(bad.json())


# ===========================================================================
# 7. Slow clients cannot starve others
# ===========================================================================

@pytest.mark.parametrize("front", ["direct", "nginx"])
def test_a_thousand_trickling_connections_do_not_delay_a_normal_request(start_proxy, tmp_path, front):
    """gthread gave each connection a thread at its first byte: 1,000 clients sending a byte a
    second held every thread.  Here the worker has only 8 threads, and still answers at once."""
    from support.nginx import NginxProcess

    server = start_proxy(workers=1, threads=8)
    nginx = None
    if front == "nginx":
        (tmp_path / "nginx").mkdir()
        nginx = NginxProcess(tmp_path / "nginx", f"127.0.0.1:{server.port}",
                             worker_connections=4096).start()
    url = nginx.url if nginx else server.url
    port = nginx.port if nginx else server.port
    tricklers = load.Tricklers(port, 1000)
    try:
        time.sleep(1.5)  # let the trickle start: the server has seen a byte from everyone
        for _ in range(5):
            started = time.monotonic()
            r = requests.post(url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
            took = time.monotonic() - started
            assert r.status_code == 200 and took < 1.0, f"{took:.2f} s"
        assert tricklers.still_open() >= 990  # they are not just being dropped
    finally:
        tricklers.close()
        if nginx is not None:
            nginx.stop()
        server.stop()


def test_running_out_of_file_descriptors_costs_the_slowest_reader_not_the_worker(start_proxy):
    """400 idle connections against a worker allowed 300 descriptors: it keeps as many
    readers as its descriptors allow, answers the slowest with 408, and keeps serving (an
    accept that failed with EMFILE used to raise out of the event loop)."""
    server = start_proxy(open_files=300)
    pid = server.health()["pid"]
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(400)]
    try:
        started = time.monotonic()
        r = requests.post(server.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=20)
        assert r.status_code == 200 and time.monotonic() - started < 5
        assert server.health()["pid"] == pid
    finally:
        for sock in idle:
            sock.close()
    assert "Exception in worker process" not in server.log()


def test_readers_past_the_memory_budget_are_refused_at_once_not_left_to_time_out(start_proxy):
    """Pausing every reader when the budget is full let none of them finish: they all got
    their 408 after client_timeout.  A reader that would pass the budget is refused (529
    here) at once, and the others are served."""
    server = start_proxy(LLM_PROXY_MEMORY_BUDGET=str(50 * MiB), LLM_PROXY_CLIENT_TIMEOUT="20")
    body = json_body(dict(ANTHROPIC_JSON, pad="p" * (10 * MiB)))

    def send(_):
        started = time.monotonic()
        try:
            r = requests.post(server.url + "/v1/messages", data=body, timeout=30,
                              headers={"content-type": "application/json"})
            return r.status_code, time.monotonic() - started
        except requests.ConnectionError:  # refused while it was still sending
            return "refused", time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(send, range(8)))
    statuses = [status for status, _ in outcomes]
    assert 200 in statuses and set(statuses) <= {200, 529, "refused"}, outcomes
    assert max(took for _, took in outcomes) < 10, outcomes  # nobody waited for a 408
    assert server.health()["memory_budget"]["used"] == 0


def test_a_request_slower_than_client_timeout_gets_408_in_its_shape_with_a_row(start_proxy, fake):
    server = start_proxy(LLM_PROXY_CLIENT_TIMEOUT="1")
    started = time.monotonic()
    slow_body = RawResponse(server.url, "/v1/messages", b"{",
                            headers=[("Content-Length", "500"), ("x-api-key", "sk-slow-client-1")])
    r = slow_body.read_head()
    assert r.status == 408 and 0.9 <= time.monotonic() - started < 4
    assert_anthropic_error(r.json(), "invalid_request_error")
    row = server.row(r.request_id)
    assert (row["status"], row["end_reason"], row["endpoint"]) == (408, "rejected", "anthropic")
    assert row["client_key_id"].startswith("key_")
    slow_head = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    slow_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    answer = slow_head.recv(65536)
    slow_head.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert_openai_error(json.loads(answer.split(b"\r\n\r\n", 1)[1]))
    assert fake.requests == []


# ===========================================================================
# 8. Every malformed request is a 4xx in the endpoint's shape, with a row
# ===========================================================================

H = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
HC = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
OK_BODY = json_body(ANTHROPIC_JSON)


def with_length(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


MALFORMED = {
    # name: (raw request, status, shape, half-close after sending)
    "deep-nesting": (with_length(H, b'{"model": "m", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                     400, "anthropic", False),
    "bad-chunk-size": (H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "anthropic", False),
    "chunk-without-crlf": (H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX0\r\n\r\n", 400, "anthropic", False),
    "bad-trailer": (H + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nno colon here\r\n\r\n"
                    % (len(OK_BODY), OK_BODY), 400, "anthropic", False),
    "eof-mid-body": (H + b"Content-Length: 500\r\n\r\n" + OK_BODY[:20], 400, "anthropic", True),
    "eof-mid-chunk": (H + b"Transfer-Encoding: chunked\r\n\r\n50\r\n" + OK_BODY[:20], 400, "anthropic", True),
    "stream-options-not-object": (with_length(HC, b'{"model": "g", "stream": true, "stream_options": 5}'),
                                  400, "chat", False),
    "stream-is-a-string": (with_length(H, b'{"model": "m", "stream": "true"}'), 400, "anthropic", False),
    "stream-is-a-number": (with_length(HC, b'{"model": "g", "stream": 1}'), 400, "chat", False),
    "header-without-colon": (H + b"Bad Header Line\r\nContent-Length: 2\r\n\r\n{}", 400, "anthropic", False),
    "control-byte-in-header": (H + b"X-Odd: a\x01b\r\nContent-Length: 2\r\n\r\n{}", 400, "anthropic", False),
    "length-and-chunked": (H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                           400, "anthropic", False),
    "header-too-large": (H + b"X-Big: " + b"b" * 20000 + b"\r\n\r\n", 431, "anthropic", False),
    "not-json": (with_length(HC, b"\xff\xfe not json"), 400, "chat", False),
    "unknown-path": (with_length(b"POST /v1/nope HTTP/1.1\r\nHost: x\r\n", b"{}"), 404, "chat", False),
    "wrong-method": (b"GET /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 405, "anthropic", False),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_every_malformed_request_is_a_4xx_in_its_shape_with_a_row(proxy, fake, name):
    raw, status, shape, half_close = MALFORMED[name]
    pid = proxy.health()["pid"]
    answer = RawResponse(proxy.url, raw=raw, half_close=half_close)
    body = answer.read_all()
    head = answer.head
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert b"content-type: application/json" in head.lower(), head
    assert_error_shape(shape, json.loads(body))
    row = proxy.row(answer.request_id)
    assert (row["status"], row["end_reason"]) == (status, "rejected")
    assert fake.requests == [] and proxy.health()["pid"] == pid


@pytest.mark.parametrize("raw", [
    H + b"Transfer-Encoding: chunked\r\n\r\n-6\r\n",  # a negative chunk size
    H + b"Transfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
    H + b"Content-Length: \xb2\r\n\r\n{}",  # a digit int() takes, and then refuses
    H + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n",
    H + b"X-A: a\nb\r\nContent-Length: 5\r\n\r\n",  # a bare LF inside a value
], ids=["negative-chunk", "signed-chunk", "superscript-length", "endless-length", "bare-lf-value"])
def test_framing_values_that_once_killed_the_worker_are_answered(proxy, raw):
    pid = proxy.health()["pid"]
    started = time.monotonic()
    answer = exchange(proxy.port, raw, timeout=10)
    assert answer.startswith(b"HTTP/1.1 400 ") and time.monotonic() - started < 2, answer[:200]
    assert proxy.health()["pid"] == pid


@pytest.mark.parametrize("tail, status", [
    (b"2000001\r\n{", 413),  # a chunk larger than the body limit
    (b"f" * 9000, 400),  # a chunk-size line that never ends
    (b"5\r\nhello\r\n0\r\n" + b"X-T: v\r\n" * 3000, 431),  # trailers that never end
    (b"10 ;a=b\r\n{", 408),  # syntax gunicorn takes: read whole by the loop, then 408
    (b"0000000000000000000010\r\n{", 408),
], ids=["huge-chunk", "endless-chunk-line", "endless-trailers", "blank-before-ext",
        "leading-zeros"])
def test_a_request_that_could_only_trickle_on_is_answered_by_the_event_loop(start_proxy, tail, status):
    """Handed to a thread, these would hold it for as long as the client trickles: the loop
    answers them at once, so 50 of them leave the worker's 4 threads free."""
    server = start_proxy(threads=4, LLM_PROXY_CLIENT_TIMEOUT="2")
    socks = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(H + b"Transfer-Encoding: chunked\r\n\r\n" + tail)
        socks.append(sock)
    started = time.monotonic()
    r = requests.post(server.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10)
    assert r.status_code == 200 and time.monotonic() - started < 1.0
    answers = [sock.recv(65536) for sock in socks]
    for sock in socks:
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 %d " % status) for a in answers), answers[0][:200]
    assert_anthropic_error(json.loads(answers[0].split(b"\r\n\r\n", 1)[1]))


def test_a_refused_request_with_an_unread_malformed_body_gets_one_answer_and_one_row(proxy, fake):
    """A 404 answered without reading the body, whose chunked framing then turns out to be
    broken: the connection closes; nobody answers the same request twice."""
    raw = (b"POST /v1/nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"zz\r\nabc\r\n0\r\n\r\n")
    answer = exchange(proxy.port, raw)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 404 "), answer
    request_id = answer.split(b"x-llm-proxy-request-id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    proxy.flush()
    assert [r["request_id"] for r in proxy.rows("status = 400 AND endpoint = 'other'")] == []
    assert proxy.row(request_id)["status"] == 404


def test_a_body_of_a_hundred_thousand_tiny_chunks_is_read_in_linear_time(proxy, fake):
    """The worker hands gunicorn's parser the bytes it buffered in socket-sized pieces: all
    at once, the parser's buffer was copied once per chunk (seconds for this body)."""
    body = json_body(dict(ANTHROPIC_JSON, pad="p" * 1_000_000))
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10]), body[i:i + 10])
                       for i in range(0, len(body), 10)) + b"0\r\n\r\n"
    started = time.monotonic()
    answer = exchange(proxy.port, H + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked,
                      timeout=20)
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 200 ") and took < 6.0, f"{took:.1f} s"
    [upstream] = fake.wait_for_requests(1)
    assert json.loads(upstream.body)["pad"] == "p" * 1_000_000


def test_garbage_that_is_not_http_gets_a_json_400_and_no_row(proxy):
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"<html>" not in answer
    assert_openai_error(json.loads(answer.split(b"\r\n\r\n", 1)[1]))


# ===========================================================================
# 9. Upstream oddities are upstream errors
# ===========================================================================

ODD_UPSTREAMS = {
    "control-byte-header": lambda: [Raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                        b"X-Odd: a\x01b\r\nContent-Length: 2\r\n\r\n{}"), End()],
    "html-captive-portal": lambda: [Status(200, headers={"Content-Type": "text/html"}, body_mode="length"),
                                    Send(b"<html><body>Sign in to the Wi-Fi</body></html>"), End()],
    "no-content-type": lambda: [Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), End()],
    "redirect": lambda: [Status(302, headers={"Location": "https://elsewhere.example/v1/messages"},
                                body_mode="length"), End()],
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", sorted(ODD_UPSTREAMS))
def test_an_upstream_oddity_is_a_502_in_the_endpoints_shape(start_proxy, fake, name, stream):
    server = start_proxy(LLM_PROXY_COMMIT_AFTER="5")  # before the commit: a real status
    fake.enqueue(ODD_UPSTREAMS[name]())
    r = RawResponse(server.url, "/v1/messages", dict(ANTHROPIC_JSON, stream=stream)).read_head()
    assert r.status == 502, r.status
    assert_anthropic_error(r.json(), "api_error")
    assert b"<html>" not in r.read_all()
    row = server.row(r.request_id)
    assert (row["status"], row["end_reason"]) == (502, "upstream_error")


@pytest.mark.parametrize("name", ["control-byte-header", "html-captive-portal"])
def test_an_upstream_oddity_after_the_commit_is_one_terminal_error(proxy, fake, name):
    release = threading.Event()  # the upstream answers only after the stream committed
    fake.enqueue([WaitFor(release, 10)] + ODD_UPSTREAMS[name]())
    r = RawResponse(proxy.url, "/v1/messages", PROTOS["anthropic"].body).read_head()
    assert r.status == 200
    r.read_until(lambda b: b": keepalive" in b, "a keepalive: the stream has committed")
    release.set()
    body = r.read_all()
    assert r.complete
    check_terminal_error("anthropic", split(body)[0][-1], anthropic_type="api_error")
    assert proxy.row(r.request_id)["end_reason"] == "upstream_error"


# ===========================================================================
# 10. Found while testing as a user would
# ===========================================================================

def held_preamble_proxy(start_proxy, fake, tmp_path, **env) -> ProxyProcess:
    """Two deployments on the same fake: the first one's preamble is held back (a second
    remains), and with commit_after 5 s nothing has been committed while it is held."""
    config = write_config(tmp_path / "held.toml", f"""
[providers.anthropic]
base_url = "{fake.url}"
[stream]
commit_after = {env.pop("commit_after", 5.0)}
[routes."claude-held-*"]
deployments = [{{ provider = "anthropic", name = "first" }}, {{ provider = "anthropic", name = "second" }}]
""")
    return start_proxy(LLM_PROXY_CONFIG=config, **env)


PREAMBLE_ONLY = [Status(200, headers=SSE_CT), Send(anthropic_stream()[0]), Stall()]
HELD_BODY = dict(PROTOS["anthropic"].body, model="claude-held-1")


def test_a_hang_up_while_the_preamble_is_held_frees_the_thread_and_upstream_at_once(start_proxy, fake,
                                                                                  tmp_path):
    server = held_preamble_proxy(start_proxy, fake, tmp_path, threads=2)
    try:
        fake.enqueue(PREAMBLE_ONLY)
        r = RawResponse(server.url, "/v1/messages", HELD_BODY)
        [upstream] = fake.wait_for_requests(1)
        time.sleep(0.2)  # the message_start has reached the proxy and is held back
        closed_at = time.monotonic()
        r.close()
        assert upstream.peer_closed.wait(2)
        assert upstream.peer_closed_at - closed_at < 0.25
        # the worker thread is free again: both threads serve at once, nothing waits 5 s
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            oks = list(pool.map(lambda _: requests.post(server.url + "/v1/messages",
                                                        json=ANTHROPIC_JSON, timeout=10), range(2)))
        assert [o.status_code for o in oks] == [200, 200] and time.monotonic() - started < 1.5
        deadline = time.monotonic() + 5
        while (rows := server.rows("end_reason = 'client_gone'")) == [] and time.monotonic() < deadline:
            server.flush()
        assert len(rows) == 1 and rows[0]["status"] == 499
        # the deployment was neither credited nor blamed for the client's hang-up
        assert "first" not in server.health()["breakers"] or \
            server.health()["breakers"]["first"]["recent_attempts"] == 0
    finally:
        server.stop()


@pytest.mark.parametrize("committed", [False, True], ids=["before-commit", "after-commit"])
def test_sigterm_while_the_preamble_is_held(start_proxy, fake, tmp_path, committed):
    server = held_preamble_proxy(start_proxy, fake, tmp_path, commit_after=0.2 if committed else 5.0,
                                 LLM_PROXY_SHUTDOWN_GRACE="0.5", LLM_PROXY_GRACEFUL_TIMEOUT="8")
    fake.enqueue(PREAMBLE_ONLY)
    r = RawResponse(server.url, "/v1/messages", HELD_BODY, timeout=10)
    fake.wait_for_requests(1)
    if committed:
        r.read_head()
        r.read_until(lambda b: b": keepalive" in b, "a keepalive: the stream has committed")
    server.signal(signal.SIGTERM)
    if committed:
        body = r.read_all()
        assert r.status == 200 and r.complete
        check_terminal_error("anthropic", split(body)[0][-1], anthropic_type="overloaded_error")
    else:
        r.read_head()
        assert r.status == 529
        assert_anthropic_error(r.json(), "overloaded_error")
    assert server.proc.wait(10) == 0
    rows = server.rows()
    assert [(row["end_reason"], row["status"]) for row in rows] == [("shutdown", 200 if committed else 529)]
    server.stop()


@pytest.mark.parametrize("name", ["anthropic", "chat", "responses"])
def test_output_that_reached_the_client_is_recorded_after_a_mid_stream_failure(proxy, fake, name):
    proto = PROTOS[name]
    fake.enqueue([Status(200, headers=SSE_CT)] + [Send(e) for e in proto.content] + [Cut()])
    r = RawResponse(proxy.url, proto.path, proto.body).read_head()
    r.read_all()
    row = proxy.row(r.request_id)
    assert row["end_reason"] == "upstream_error" and row["usage_complete"] == 0
    assert row["output_tokens"] >= 2, row  # "Hello" and ", héllo" (and more) reached the client


def test_a_refused_connection_and_an_unknown_host_get_their_own_messages(start_proxy):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        refused = start_proxy(upstream_url=f"http://127.0.0.1:{port}")
        body = requests.post(refused.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=10).json()
    assert body["error"]["message"] == f"the upstream 127.0.0.1:{port} refused the connection"
    unknown = start_proxy(upstream_url="http://no-such-host.invalid")
    r = requests.post(unknown.url + "/v1/messages", json=ANTHROPIC_JSON, timeout=30)
    assert r.status_code == 502
    assert r.json()["error"]["message"] == \
        "the upstream host no-such-host.invalid could not be resolved (DNS)"


# ===========================================================================
# 11. No input can forge a log line; every field is capped
# ===========================================================================

@pytest.mark.timeout(120)  # a 30 MB request
def test_no_input_can_forge_a_log_line_and_huge_fields_are_capped(start_proxy, fake):
    server = start_proxy()
    forged = "claude\n2026-11-30 00:00:00,000 INFO [1] proxy.requests: FORGED request"
    requests.post(server.url + "/v1/messages", json=dict(ANTHROPIC_JSON, model=forged), timeout=10)
    requests.post(server.url + "/v1/messages", json=dict(ANTHROPIC_JSON, model="m" * 30_000_000),
                  timeout=60)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /v1/nope%0a2026-11-30%2000:00:00,000%20INFO%20FORGED HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.recv(65536)
    sock.close()
    server.flush()
    log = server.log()
    assert not [line for line in log.splitlines() if "FORGED" in line and not line.startswith("20")
                and not line.startswith("[")]
    assert all("FORGED" not in line.split(" ", 3)[-1][:40] for line in log.splitlines()
               if line.startswith("2026-11-30 00:00:00"))
    assert max(len(line) for line in log.splitlines()) < 4000
    rows = server.rows()
    assert max(len(r["model_requested"] or "") for r in rows) < 400
    assert any((r["model_requested"] or "").startswith("claude\n2026") for r in rows)  # stored as sent


def test_a_body_shorter_than_its_content_length_is_refused_even_when_it_parses(proxy, fake):
    """The client stops after a whole JSON object but had announced more: the request is
    incomplete and goes nowhere, however valid the part that came (mutant d1)."""
    raw = H + b"Content-Length: %d\r\n\r\n" % (len(OK_BODY) + 100) + OK_BODY
    answer = RawResponse(proxy.url, raw=raw, half_close=True)
    body = answer.read_all()
    assert answer.head.startswith(b"HTTP/1.1 400 "), answer.head
    assert_anthropic_error(json.loads(body), "invalid_request_error")
    assert b"ended after" in body
    assert fake.requests == []
    row = proxy.row(answer.request_id)
    assert (row["status"], row["end_reason"]) == (400, "rejected")


def test_the_proxys_own_error_quoting_an_upstream_is_masked(start_proxy, fake, tmp_path):
    """Every deployment sends an error event before any content, echoing the keys: the
    proxy's own 502 quotes the last one's message, and masks the keys in it (mutant p4)."""
    config = write_config(tmp_path / "quote.toml", f"""
[auth]
mode = "open"
[providers.anthropic]
base_url = "{fake.url}"
api_key_env = "TEST_PROVIDER_KEY"
[stream]
commit_after = 5.0
[routes."claude-quote-*"]
deployments = [{{ provider = "anthropic", name = "one" }}, {{ provider = "anthropic", name = "two" }}]
""")
    server = start_proxy(LLM_PROXY_CONFIG=config, TEST_PROVIDER_KEY=PROVIDER_KEY)
    try:
        fake.named["error-first"] = sse_reply(
            [anthropic_stream()[0], sse({"type": "error", "error": {
                "type": "overloaded_error", "message": echo("overloaded")}}, "error")])
        r = RawResponse(server.url, "/v1/messages", dict(ANTHROPIC_JSON, model="claude-quote-1", stream=True),
                        headers={"x-api-key": CLIENT_KEY, "x-fake-script": "error-first"}).read_head()
        body = r.read_all()
        assert r.status == 502, (r.head, body)
        assert len(fake.requests) >= 2  # both deployments were tried
        assert b"error before any content" in body and b"[REDACTED" in body, body
        raw = json.dumps(r.headers).encode() + body
        assert PROVIDER_KEY.encode() not in raw and CLIENT_KEY.encode() not in raw, raw
    finally:
        server.stop()
