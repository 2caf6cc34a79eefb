"""The ways the proxy is started: `llm-proxy serve`, `llm-proxy usage`, and as a plain WSGI
callable inside another WSGI server (werkzeug's threaded server here)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import requests

from support.builders import anthropic_stream
from support.processes import free_port, wait_until_healthy, without_proxy_variables
from support.rawhttp import RawResponse
from support.sse import KEEPALIVE
from support.steps import Send, Stall, Status

ROOT = Path(__file__).resolve().parent.parent


def test_llm_proxy_serve_with_config_file_and_flags(fake, tmp_path):
    config = tmp_path / "proxy.toml"
    config.write_text(f'[providers.anthropic]\nbase_url = "{fake.url}"\n'
                      f'[tracker]\ndb = "{tmp_path / "u.db"}"\n')
    port = free_port()
    env = {k: v for k, v in without_proxy_variables(os.environ).items() if not k.startswith("LLM_PROXY_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config),
                             "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, proc)
        r = requests.post(url + "/v1/messages", json={"model": "claude-x", "max_tokens": 5,
                                                       "messages": [], "stream": True}, timeout=10)
        assert r.status_code == 200 and r.content.endswith(b'data: {"type":"message_stop"}\n\n')
        assert fake.requests[-1].path == "/v1/messages"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"proxy.worker.ProxyWorker" in err  # the worker class from the shared settings
    # The worker drained its queue on exit: `llm-proxy usage` sees the request.
    out = subprocess.run([sys.executable, "-m", "proxy", "usage", "summary", "--config", str(config), "--json"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["totals"]["requests"] == 1
    assert summary["by_model"][0]["model"] == "claude-x"


def test_plain_wsgi_callable_in_another_server(fake, llm_proxy):
    """No gunicorn: werkzeug's threaded server (the `llm_proxy` fixture users get) runs the
    app; streams, keepalives and hang-up detection (through `werkzeug.socket`) still work."""
    served = llm_proxy(upstream=fake.url, heartbeat_interval=0.05)
    events = anthropic_stream()
    fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
    stream = RawResponse(served.url, "/v1/messages", {
        "model": "claude-x", "max_tokens": 5, "messages": [], "stream": True}).read_head()
    stream.read_until(lambda body: body.count(KEEPALIVE) >= 2, "two keepalives")
    upstream = fake.wait_for_requests(1)[0]
    stream.close()
    assert upstream.peer_closed.wait(2.0)
    r = requests.post(served.url + "/v1/messages", timeout=10,
                      json={"model": "claude-x", "max_tokens": 5, "messages": []})
    assert r.status_code == 200 and r.json()["type"] == "message"
    assert [(row.end_reason, row.stream) for row in served.wait_for_rows(2)] == [
        ("client_gone", True), ("complete", False)]


def test_one_start_up_line_names_the_bind_address_the_upstreams_and_the_database(proxy, fake):
    log = proxy.log()
    lines = [line for line in log.splitlines() if "llm-proxy: listening on" in line]
    assert len(lines) == 1, log[-2000:]
    line = lines[0]
    assert f"127.0.0.1:{proxy.port}" in line and proxy.db_path in line
    assert f"anthropic {fake.url} (anthropic, client keys)" in line
    assert f"openai {fake.url} (openai, client keys)" in line


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`llm-proxy` as a newcomer runs it: no LLM_PROXY_* settings from this shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_PROXY_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "proxy", *args], env=env, capture_output=True,
                          text=True, timeout=30)


def test_llm_proxy_usage_on_a_missing_or_empty_database_prints_an_empty_report(tmp_path):
    missing, blank = tmp_path / "missing.db", tmp_path / "blank.db"
    sqlite3.connect(blank).close()
    for db in (missing, blank):
        table = run_cli("usage", "summary", "--db", str(db))
        assert (table.returncode, table.stderr) == (0, ""), db
        assert table.stdout.startswith("Usage: all recorded requests")
        assert "(no requests)" in table.stdout
        summary = json.loads(run_cli("usage", "summary", "--db", str(db), "--json").stdout)
        assert summary["totals"]["requests"] == 0 and summary["by_model"] == []
        daily = json.loads(run_cli("usage", "--db", str(db), "--json").stdout)
        assert daily["view"] == "daily" and daily["rows"] == []
        assert daily["totals"]["requests"] == 0
    assert not missing.exists()  # a report never creates the database


def test_bare_llm_proxy_prints_the_help():
    out = run_cli()
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.startswith("usage: llm-proxy [-h] [--version] {serve,usage,keys}")


def test_llm_proxy_version_names_the_installed_version():
    from importlib.metadata import version

    out = run_cli("--version")
    assert (out.returncode, out.stdout) == (0, f"llm-proxy {version('llm-stream-proxy')}\n")
