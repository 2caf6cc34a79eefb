"""Several proxy hosts on one PostgreSQL database: three gunicorn masters on three ports (as
three machines would run them), one `tracker.db` URL.  What holds across them: one key's
budget under 200 concurrent streams spread over the three, its RPM, a revocation, and
every row in the one database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from proxy.report import summarize
from proxy.store import open_store
from support.builders import DEFAULT_USAGE
from support.nginx import NginxProcess
from support.postgres import PostgresServer
from support.processes import ROOT, ProxyProcess, local_session
from support.rawhttp import RID
from support.steps import WaitFor, default_script
from test_keys_e2e import BUDGET_MODEL, CONFIG, create_key, message, post, show

pytestmark = pytest.mark.timeout(180)

ANTHROPIC_PROVIDER_KEY = "sk-ant-provider-key-of-the-hosts-0123456789abcdef"


def start_hosts(fake, url: str, tmp_path, count: int = 3, **env) -> list[ProxyProcess]:
    """`count` proxies (two workers each) sharing the database at `url`, each with its own
    spill directory, all with one installation secret (as hosts sharing keys must)."""
    started = []
    try:
        for i in range(count):
            folder = tmp_path / f"host{i}"
            folder.mkdir()
            started.append(ProxyProcess(
                fake.url, folder, workers=2, threads=48, LLM_PROXY_DB=url,
                LLM_PROXY_SPILL_DIR=str(folder / "spill"),
                LLM_PROXY_SECRET_FILE=str(tmp_path / "installation-secret"), **env).start())
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started


@pytest.fixture
def hosts(fake, postgres, tmp_path):
    """Three proxies in keys mode sharing one fresh database."""
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    started = start_hosts(fake, postgres.database(), tmp_path, LLM_PROXY_CONFIG=str(config),
                          TEST_ANTHROPIC_PROVIDER_KEY=ANTHROPIC_PROVIDER_KEY,
                          TEST_OPENAI_PROVIDER_KEY="sk-openai-provider-key-0123456789")
    yield started
    for server in started:
        server.stop()


def test_a_budget_holds_across_hosts_under_200_concurrent_streams(hosts, fake):
    """As in the one-host test: 20 worst cases fit the budget; now the 200 requests go to
    three hosts in turn, and the reservations are counted in PostgreSQL."""
    name, key = create_key(hosts[0], "--budget", "10.25", "--period", "day")
    release = fake_gate(fake)
    body = message(BUDGET_MODEL, max_tokens=50_000, stream=True)
    try:
        with ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(
                lambda i: post(hosts[i % 3], key, body, headers={"x-fake-script": "gate"},
                               stream=True), range(200)))
            admitted = [a for a in answers if a.status_code == 200]
            mid = show(hosts[1], name)
            release.set()
            list(pool.map(lambda a: a.content, admitted))
    finally:
        release.set()
    assert len(admitted) == 20
    assert mid["running"] == 20 and 10.0 <= mid["reserved_usd"] <= 10.25
    assert sorted(a.status_code for a in answers) == [200] * 20 + [402] * 180
    assert len(fake.requests) == 20
    after = show(hosts[2], name)
    assert after["running"] == 0 and 0 < after["spent_usd"] <= 10.25


def test_rpm_and_revocation_hold_across_hosts(hosts, fake):
    name, key = create_key(hosts[0], "--rpm", "6")
    statuses = [post(hosts[i % 3], key, message()).status_code for i in range(9)]
    assert statuses == [200] * 6 + [429] * 3
    name, key = create_key(hosts[1])
    assert {post(host, key, message()).status_code for host in hosts} == {200}
    from test_keys_e2e import keys_cli
    assert keys_cli(hosts[2], "revoke", name).returncode == 0
    time.sleep(1.0)  # the promise: refused everywhere within a second
    assert [post(host, key, message()).status_code for host in hosts] == [403] * 3


def fake_gate(fake):
    import threading

    release = threading.Event()
    fake.named["gate"] = lambda request: [WaitFor(release, 30)] + default_script(request)
    return release


# ---------------------------------------------------------------------------------------------
# Rows from every host, and a database that goes away


def wait_for_rows(url: str, count: int, timeout: float = 30.0) -> list[dict]:
    reader = open_store(url)
    try:
        deadline = time.monotonic() + timeout
        while len(rows := reader.rows()) < count:
            assert time.monotonic() < deadline, f"{len(rows)} of {count} rows arrived"
            time.sleep(0.1)
        return rows
    finally:
        reader.close()


def test_1500_requests_over_three_hosts_behind_nginx_give_1500_rows(fake, postgres, tmp_path):
    """Streaming and not, through nginx to three hosts: one row each, and the report's
    totals are the sum of what the upstream said it used."""
    url = postgres.database()
    hosts = start_hosts(fake, url, tmp_path)
    nginx = NginxProcess(tmp_path, [f"127.0.0.1:{h.port}" for h in hosts]).start()
    try:
        def one(i: int):
            with local_session() as session:
                answer = session.post(nginx.url + "/v1/messages", timeout=60, json=message(
                    stream=i % 2 == 0), headers={"anthropic-version": "2023-06-01",
                                                 "x-api-key": "sk-ant-client-key-123456"})
                answer.content  # noqa: B018 - the whole answer
                return answer.status_code, answer.headers[RID]

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(1500)))
        assert {status for status, _ in answers} == {200}
        rows = wait_for_rows(url, 1500)
    finally:
        nginx.stop()
        for server in hosts:
            server.stop()
    assert sorted(r["request_id"] for r in rows) == sorted(rid for _, rid in answers)
    served = {h.port: sum(1 for line in h.log().splitlines() if "proxy.requests: request" in line)
              for h in hosts}
    assert all(count > 0 for count in served.values()), served  # nginx spread them
    report = subprocess.run([sys.executable, "-m", "proxy", "usage", "--json"],
                            env={**hosts[0].env, "LLM_PROXY_DB": url}, cwd=str(ROOT),
                            capture_output=True, text=True, timeout=60)
    totals = json.loads(report.stdout)["totals"]
    assert totals["requests"] == 1500
    assert (totals["input_tokens"], totals["output_tokens"], totals["cache_read_tokens"],
            totals["cache_write_tokens"]) == tuple(1500 * DEFAULT_USAGE[kind] for kind in (
                "input", "output", "cache_read", "cache_write"))


def test_a_database_stopped_for_10_s_under_load_loses_no_row_and_doubles_none(fake, tmp_path):
    """Three hosts under steady load; PostgreSQL stops for 10 s and comes back.  Every
    request is answered throughout, and every row arrives, once."""
    directory = tempfile.mkdtemp(prefix="llm-proxy-pg-")
    os.chmod(directory, 0o755)
    server = PostgresServer(Path(directory) / "cluster").start()
    url = server.database()
    hosts = start_hosts(fake, url, tmp_path, LLM_PROXY_SPILL_AFTER="1")
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def load(worker: int) -> None:
        i = 0
        with local_session() as session:
            while not stop.is_set():
                answer = session.post(hosts[(worker + i) % 3].url + "/v1/messages", timeout=30,
                                      json=message(stream=i % 2 == 0), headers={
                                          "anthropic-version": "2023-06-01",
                                          "x-api-key": "sk-ant-client-key-123456"})
                answer.content  # noqa: B018
                answers.append((answer.status_code, answer.headers[RID]))
                i += 1

    try:
        with ThreadPoolExecutor(6) as pool:
            running = [pool.submit(load, w) for w in range(6)]
            time.sleep(2)  # load before the outage
            server.stop("immediate")
            before = len(answers)
            time.sleep(10)  # the outage
            during = len(answers) - before
            server.start()
            time.sleep(2)  # load after it
            stop.set()
            for future in running:
                future.result()
        rows = wait_for_rows(url, len(answers), timeout=60)
        totals = summarize(url)["totals"]
    finally:
        stop.set()
        for host in hosts:
            host.stop()
        server.stop("immediate")
    assert during > 50, "requests must be served while the database is down"
    assert {status for status, _ in answers} == {200}
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(answers)  # none lost, none twice
    assert set(ids) == {rid for _, rid in answers}
    # ...in the rollups the reports read too (a retried batch must not count twice there)
    assert totals["requests"] == len(answers)
    assert totals["input_tokens"] == len(answers) * DEFAULT_USAGE["input"]


def test_three_hosts_starting_at_once_on_an_empty_database_migrate_it_once(fake, postgres,
                                                                          tmp_path):
    url = postgres.database()
    with ThreadPoolExecutor(3) as pool:
        folders = [tmp_path / f"start{i}" for i in range(3)]
        for folder in folders:
            folder.mkdir()
        hosts = list(pool.map(lambda folder: ProxyProcess(
            fake.url, folder, workers=2, LLM_PROXY_DB=url,
            LLM_PROXY_SPILL_DIR=str(folder / "spill")).start(), folders))
    try:
        for host in hosts:
            assert post(host, "sk-ant-client-key-123456", message()).status_code == 200
        rows = wait_for_rows(url, 3)
    finally:
        for host in hosts:
            host.stop()
    assert len(rows) == 3
    assert postgres.sql("SELECT count(*) FROM llm_proxy_schema", url.rsplit("/", 1)[1]) == "1"
    for host in hosts:
        assert "Traceback" not in host.log() and "ERROR" not in host.log()
