"""Several proxy hosts on one PostgreSQL database: three gunicorn masters on three ports (as
three machines would run them), one `tracker.db` URL.  What holds across them: one key's
budget under 200 concurrent streams spread over the three, its RPM, a revocation, and
every row in the one database."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from support.processes import ProxyProcess
from support.steps import WaitFor, default_script
from test_keys_e2e import BUDGET_MODEL, CONFIG, create_key, message, post, show

pytestmark = pytest.mark.timeout(180)

ANTHROPIC_PROVIDER_KEY = "sk-ant-provider-key-of-the-hosts-0123456789abcdef"


@pytest.fixture
def hosts(fake, postgres, tmp_path):
    """Three proxies (two workers each) sharing one fresh database."""
    url = postgres.database()
    config = tmp_path / "proxy.toml"
    config.write_text(CONFIG)
    started = []
    try:
        for i in range(3):
            folder = tmp_path / f"host{i}"
            folder.mkdir()
            started.append(ProxyProcess(
                fake.url, folder, workers=2, threads=48, LLM_PROXY_CONFIG=str(config),
                LLM_PROXY_DB=url, LLM_PROXY_SPILL_DIR=str(folder / "spill"),
                LLM_PROXY_SECRET_FILE=str(tmp_path / "installation-secret"),
                TEST_ANTHROPIC_PROVIDER_KEY=ANTHROPIC_PROVIDER_KEY,
                TEST_OPENAI_PROVIDER_KEY="sk-openai-provider-key-0123456789").start())
        yield started
    finally:
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
