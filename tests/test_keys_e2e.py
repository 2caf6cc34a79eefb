"""Client keys end to end: the proxy under real gunicorn (4 workers) in keys mode, keys made
with the real `llm-proxy keys` command, the official SDKs and raw HTTP as clients, the
scripted fake upstream behind.

What a team that hands out proxy keys relies on: a key opens the proxy and nothing else
does; a revoked or expired key, or a model outside its list, is refused by every worker; a
budget holds under 200 concurrent streams; RPM and TPM hold for the host, not per worker;
every refusal is in the client's own error shape, with a usage row and no upstream call;
and no key, the client's or the provider's, ends up anywhere it should not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import openai
import pytest

from support.builders import DEFAULT_ANTHROPIC_MODEL, DEFAULT_CHAT_MODEL, DEFAULT_USAGE
from support.processes import GUNICORN_CONF, ROOT, ProxyProcess, connections_to_every_worker, \
    local_session, without_proxy_variables
from support.rawhttp import RID, RawConnection, RawResponse
from support.builders import chat_stream
from support.steps import Send, Stall, Status, WaitFor, default_script

pytestmark = pytest.mark.timeout(120)

ANTHROPIC_PROVIDER_KEY = "sk-ant-provider-key-of-the-proxy-0123456789abcdef"
OPENAI_PROVIDER_KEY = "sk-openai-provider-key-of-the-proxy-0123456789abcdef"
BUDGET_MODEL = "budget-model"  # priced below: $1 per M input tokens, $10 per M output
CONFIG = f"""
[auth]
mode = "keys"

[providers.anthropic]
api_key_env = "TEST_ANTHROPIC_PROVIDER_KEY"

[providers.openai]
api_key_env = "TEST_OPENAI_PROVIDER_KEY"

[prices."{BUDGET_MODEL}"]
input = 1.0
output = 10.0

[routes."fast"]
deployments = [{{ provider = "anthropic", model = "claude-sonnet-5" }}]
"""
MESSAGES = [{"role": "user", "content": "Hello"}]
# Every token type of the fake's default answer, as a provider bills them.
DEFAULT_TOKENS = (DEFAULT_USAGE["input"] + DEFAULT_USAGE["output"] + DEFAULT_USAGE["cache_read"]
                  + DEFAULT_USAGE["cache_write"])
LOG_LINE = re.compile(r"\[(\d+)\] proxy\.requests: request (req_[0-9a-f]+) ")


@pytest.fixture(scope="module")
def keyed(fake, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keys")
    config = tmp / "proxy.toml"
    config.write_text(CONFIG)
    server = ProxyProcess(fake.url, tmp, workers=4, threads=64, LLM_PROXY_CONFIG=str(config),
                          TEST_ANTHROPIC_PROVIDER_KEY=ANTHROPIC_PROVIDER_KEY,
                          TEST_OPENAI_PROVIDER_KEY=OPENAI_PROVIDER_KEY).start()
    yield server
    server.stop()


def keys_cli(proxy: ProxyProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "keys", *args], env=proxy.env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=30)


def create_key(proxy: ProxyProcess, *options: str, name: str | None = None) -> tuple[str, str]:
    """(name, the new key) from `llm-proxy keys create`."""
    name = name or f"key-{uuid.uuid4().hex[:8]}"
    done = keys_cli(proxy, "create", "--name", name, *options)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert re.fullmatch(r"sk-llmp-[A-Za-z0-9_-]{43}", secret), secret
    return name, secret


def show(proxy: ProxyProcess, name: str) -> dict:
    done = keys_cli(proxy, "show", name, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def claude(proxy: ProxyProcess, key: str | None, **kwargs) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=key, max_retries=0, **kwargs)


def gpt(proxy: ProxyProcess, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)


def post(proxy: ProxyProcess, key: str | None, body: dict, path: str = "/v1/messages",
         header: str = "x-api-key", headers: dict | None = None, **kwargs):
    headers = {"anthropic-version": "2023-06-01", **(headers or {})}
    if key is not None:
        headers[header] = key if header == "x-api-key" else f"Bearer {key}"
    with local_session() as session:
        return session.post(proxy.url + path, json=body, headers=headers, timeout=30, **kwargs)


def message(model: str = "claude-sonnet-5", **extra) -> dict:
    return {"model": model, "max_tokens": 64, "messages": MESSAGES, **extra}


def worker_of(proxy: ProxyProcess, request_ids: list[str]) -> dict[str, int]:
    """The worker pid that logged each request's line."""
    found = {rid: int(pid) for pid, rid in LOG_LINE.findall(proxy.log())}
    return {rid: found[rid] for rid in request_ids if rid in found}


def post_on(conn: RawConnection, proxy: ProxyProcess, key: str, body: dict) -> RawResponse:
    answer = RawResponse(proxy.url, "/v1/messages", body, conn=conn,
                         headers={"anthropic-version": "2023-06-01", "x-api-key": key})
    answer.read_head().read_all()
    return answer


def rows_of(proxy: ProxyProcess, request_ids: list[str]) -> list[dict]:
    return [proxy.row(rid) for rid in request_ids]


def key_rows(proxy: ProxyProcess, name: str, count: int, timeout: float = 10.0) -> list[dict]:
    """The key's rows once all `count` are stored (each worker writes its own)."""
    deadline = time.monotonic() + timeout
    while True:
        proxy.flush()
        rows = proxy.rows("key_name = ?", (name,))
        if len(rows) >= count or time.monotonic() > deadline:
            assert len(rows) == count, f"{len(rows)} rows of {name}, expected {count}"
            return rows


# ---------------------------------------------------------------------------------------------
# Keys through the SDKs


def test_a_valid_key_works_through_both_sdks_and_never_goes_upstream(keyed, fake):
    name, key = create_key(keyed)
    reply = claude(keyed, key).messages.create(**message())
    assert reply.content[0].text
    with claude(keyed, key).messages.stream(**message()) as stream:
        assert stream.get_final_message().usage.output_tokens == DEFAULT_USAGE["output"]
    chat = gpt(keyed, key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert chat.choices[0].message.content

    sent = fake.requests
    assert len(sent) == 3
    for request in sent[:2]:  # the proxy's own provider key, in the header its API expects
        assert request.headers["x-api-key"] == ANTHROPIC_PROVIDER_KEY
    assert sent[2].headers["authorization"] == f"Bearer {OPENAI_PROVIDER_KEY}"
    assert "x-api-key" not in sent[2].headers
    assert all(key not in str(r.headers.raw) for r in sent)
    rows = key_rows(keyed, name, 3)
    assert {r["end_reason"] for r in rows} == {"complete"}
    assert len({r["client_key_id"] for r in rows}) == 1 and rows[0]["client_key_id"].startswith("lk_")


def test_a_bearer_key_works_like_x_api_key(keyed, fake):
    _, key = create_key(keyed)
    assert post(keyed, key, message(), header="authorization").status_code == 200
    assert fake.requests[0].headers["x-api-key"] == ANTHROPIC_PROVIDER_KEY


def test_a_missing_or_unknown_key_is_a_401_with_a_row_and_no_upstream_call(keyed, fake):
    missing = post(keyed, None, message())
    with pytest.raises(anthropic.AuthenticationError) as unknown:
        claude(keyed, "sk-llmp-" + "x" * 43).messages.create(**message())
    with pytest.raises(anthropic.AuthenticationError):  # a provider key is not a proxy key
        claude(keyed, "sk-ant-api03-someones-own-anthropic-key").messages.create(**message())
    with pytest.raises(openai.AuthenticationError) as chat:
        gpt(keyed, "sk-llmp-" + "y" * 43).chat.completions.create(model="gpt-4o",
                                                                  messages=MESSAGES)
    assert fake.requests == []
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert unknown.value.status_code == 401
    assert chat.value.code == "invalid_api_key"
    row = keyed.row(unknown.value.response.headers[RID])
    assert (row["status"], row["end_reason"], row["cost_usd"]) == (401, "rejected", None)
    assert row["key_name"] is None


def test_an_expired_key_is_refused_with_403(keyed, fake):
    name, key = create_key(keyed, "--expires", "2020-01-01")
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        claude(keyed, key).messages.create(**message())
    assert "expired" in refused.value.message and fake.requests == []
    row = keyed.row(refused.value.response.headers[RID])
    assert (row["status"], row["end_reason"], row["key_name"]) == (403, "rejected", name)


def test_the_model_allowlist_holds_on_every_endpoint_with_globs(keyed, fake):
    name, key = create_key(keyed, "--models", "claude-sonnet-*, gpt-4o*")
    assert claude(keyed, key).messages.create(**message("claude-sonnet-5")).content
    assert gpt(keyed, key).chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
    refused = []
    for call in (lambda: claude(keyed, key).messages.create(**message("claude-opus-4-7")),
                 lambda: claude(keyed, key).messages.count_tokens(model="claude-opus-4-7",
                                                                  messages=MESSAGES),
                 # An alias that routes to an allowed model is checked as sent.
                 lambda: claude(keyed, key).messages.create(**message("fast")),
                 lambda: gpt(keyed, key).chat.completions.create(model="gpt-4.1",
                                                                 messages=MESSAGES)):
        with pytest.raises((anthropic.PermissionDeniedError, openai.PermissionDeniedError)) as err:
            call()
        refused.append(err.value)
    assert len(fake.requests) == 2  # the refused ones never went upstream
    assert "may not use model 'claude-opus-4-7'" in refused[0].message
    counted = claude(keyed, key).messages.count_tokens(model="claude-sonnet-5",
                                                       messages=MESSAGES)
    assert counted.input_tokens > 0
    listed = [m.id for m in gpt(keyed, key).models.list()]
    assert listed == [DEFAULT_CHAT_MODEL, DEFAULT_ANTHROPIC_MODEL]  # gpt-4.1-... is not listed
    _, anything = create_key(keyed)
    assert len(list(gpt(keyed, anything).models.list())) == 3


def test_a_revoked_key_is_refused_by_every_worker_within_a_second(keyed, fake):
    """An unlimited key (no transaction per request: the workers' copies must follow)."""
    for _ in range(3):
        name, key = create_key(keyed)
        with ThreadPoolExecutor(12) as pool:  # every worker learns the key
            assert {r.status_code for r in pool.map(lambda _: post(keyed, key, message()),
                                                    range(12))} == {200}
        done = keys_cli(keyed, "revoke", name)
        assert done.returncode == 0, done.stderr
        revoked_at = time.monotonic()
        time.sleep(max(0.0, revoked_at + 1.0 - time.monotonic()))  # the promise: one second
        fake.reset()
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: post(keyed, key, message()), range(16)))
        assert [a.status_code for a in answers] == [403] * 16
        assert all(a.json()["error"]["type"] == "permission_error" for a in answers)
        assert "revoked" in answers[0].json()["error"]["message"]
        assert fake.requests == []
        if len(set(worker_of(keyed, [a.headers[RID] for a in answers]).values())) >= 2:
            return
    pytest.fail("the refusals never came from more than one worker")


def test_a_rotated_key_stops_the_old_secret(keyed):
    name, old = create_key(keyed, "--rpm", "1000")  # limited: checked in its transaction
    assert post(keyed, old, message()).status_code == 200
    done = keys_cli(keyed, "rotate", name)
    assert done.returncode == 0
    new = done.stdout.strip()
    deadline = time.monotonic() + 1.0
    while post(keyed, old, message()).status_code != 401:
        assert time.monotonic() < deadline, "the old secret still works after a second"
    assert post(keyed, new, message()).status_code == 200
    assert show(keyed, name)["requests_last_minute"] >= 2  # same key, same counters


# ---------------------------------------------------------------------------------------------
# Limits across 4 workers


def test_rpm_holds_for_the_host_not_per_worker(keyed, fake):
    """30 concurrent requests against an RPM of 10: exactly 10 pass, whichever workers take
    them (tried again with a new key if the kernel gave all 30 to one worker)."""
    for _ in range(3):
        fake.reset()
        _, key = create_key(keyed, "--rpm", "10")
        with ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda _: post(keyed, key, message()), range(30)))
        assert sorted(a.status_code for a in answers) == [200] * 10 + [429] * 20
        assert len(fake.requests) == 10
        served = worker_of(keyed, [a.headers[RID] for a in answers])
        if len(set(served.values())) >= 2:
            break
    else:
        pytest.fail("the requests never spread over the workers")
    refused = [a for a in answers if a.status_code == 429]
    assert all(1 <= int(a.headers["retry-after"]) <= 60 for a in refused)
    assert all(a.json()["error"]["type"] == "rate_limit_error" for a in refused)
    assert "10 requests per minute" in refused[0].json()["error"]["message"]
    rows = rows_of(keyed, [a.headers[RID] for a in refused])
    assert {(r["status"], r["end_reason"], r["cost_usd"]) for r in rows} == {(429, "rejected", None)}


def test_tpm_counts_streamed_tokens_across_workers(keyed, fake):
    """Each default stream bills DEFAULT_TOKENS tokens, known only from its final usage.
    Three streams on three workers use the TPM up; a fourth worker, which served none,
    refuses the next."""
    name, key = create_key(keyed, "--tpm", str(int(DEFAULT_TOKENS * 2.5)))
    workers = connections_to_every_worker(keyed)
    try:
        answers = [post_on(conn, keyed, key, message(stream=True)) for _, conn in workers]
    finally:
        for _, conn in workers:
            conn.close()
    assert [a.status for a in answers] == [200, 200, 200, 429]
    assert answers[-1].header("retry-after")
    assert b"tokens per minute" in answers[-1].body
    assert show(keyed, name)["tokens_last_minute"] == 3 * DEFAULT_TOKENS


def test_max_parallel_counts_requests_running_on_any_worker(keyed, fake):
    release = threading.Event()
    fake.named["hold"] = lambda request: [WaitFor(release, 20)] + default_script(request)
    name, key = create_key(keyed, "--max-parallel", "2")
    headers = {"x-fake-script": "hold"}
    try:
        with ThreadPoolExecutor(2) as pool:
            running = [pool.submit(post, keyed, key, message(), headers=headers) for _ in range(2)]
            fake.wait_for_requests(2, timeout=10)
            third = post(keyed, key, message())
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert "2 requests running" in third.json()["error"]["message"]
            release.set()
            assert [f.result().status_code for f in running] == [200, 200]
        assert post(keyed, key, message()).status_code == 200
    finally:
        release.set()
        fake.named.pop("hold", None)


def test_a_budget_holds_under_200_concurrent_streams(keyed, fake):
    """Each request reserves its worst case, $0.50 and a fraction (50,000 output tokens at
    $10/M, plus an estimate of its input); the budget, $10.25, covers 20 of them.  All 200
    are decided while the admitted ones are still streaming."""
    name, key = create_key(keyed, "--budget", "10.25", "--period", "day")
    release = threading.Event()
    fake.named["gate"] = lambda request: [WaitFor(release, 30)] + default_script(request)
    body = message(BUDGET_MODEL, max_tokens=50_000, stream=True)
    try:
        with ThreadPoolExecutor(200) as pool:
            answers = list(pool.map(
                lambda _: post(keyed, key, body, headers={"x-fake-script": "gate"}, stream=True),
                range(200)))
            admitted = [a for a in answers if a.status_code == 200]
            refused = [a for a in answers if a.status_code != 200]
            mid = show(keyed, name)
            release.set()
            list(pool.map(lambda a: a.content, admitted))
    finally:
        release.set()
        fake.named.pop("gate", None)
    assert len(admitted) == 20
    assert 10.0 <= mid["reserved_usd"] <= 10.25 and mid["running"] == 20
    assert {a.status_code for a in refused} == {402}
    assert all(a.json()["error"]["type"] == "billing_error" for a in refused)
    assert all(a.headers["x-should-retry"] == "false" for a in refused)
    assert len(fake.requests) == 20
    rows = key_rows(keyed, name, 200)
    assert sorted(r["status"] for r in rows) == [200] * 20 + [402] * 180
    assert {r["end_reason"] for r in rows if r["status"] == 402} == {"rejected"}
    spent = sum(r["cost_usd"] or 0 for r in rows)
    after = show(keyed, name)
    assert after["reserved_usd"] == 0 and after["running"] == 0
    assert after["spent_usd"] == pytest.approx(spent) and 0 < spent <= 10.25
    assert after["remaining_usd"] == pytest.approx(10.25 - spent)


def test_an_unpriced_model_is_refused_for_a_budget_key(keyed, fake):
    _, key = create_key(keyed, "--budget", "5")
    answer = post(keyed, key, message("model-without-a-price"))
    assert answer.status_code == 403 and "has no price" in answer.json()["error"]["message"]
    assert fake.requests == []


# ---------------------------------------------------------------------------------------------
# The proxy's own endpoints and secrets


def test_a_client_key_sees_only_its_own_usage(keyed):
    name, key = create_key(keyed)
    other, other_key = create_key(keyed)
    for _ in range(3):
        assert post(keyed, key, message()).status_code == 200
    assert post(keyed, other_key, message()).status_code == 200
    key_rows(keyed, name, 3)
    key_rows(keyed, other, 1)
    with local_session() as session:
        own = session.get(keyed.url + "/usage", headers={"x-api-key": key}, timeout=10).json()
        everyone = session.get(keyed.url + "/usage", timeout=10).json()  # loopback: the admin
        flush = session.get(keyed.url + "/health?flush=1", headers={"x-api-key": key},
                            timeout=10)
    assert own["totals"]["requests"] == 3
    assert [g["key"] for g in own["by_key"]] == [name]
    assert everyone["totals"]["requests"] > 3
    assert flush.status_code == 403
    report = subprocess.run([sys.executable, "-m", "proxy", "usage", "keys", "--json"],
                            env=keyed.env, cwd=str(ROOT), capture_output=True, text=True,
                            timeout=30)
    by_key = {g["key"]: g["requests"] for g in json.loads(report.stdout)["rows"]}
    assert by_key[name] == 3


def test_no_key_reaches_logs_rows_error_bodies_or_the_key_list(keyed, fake):
    name, key = create_key(keyed, "--rpm", "1")
    fake.enqueue(lambda request: default_script(request))
    bodies = [post(keyed, key, message()).text, post(keyed, key, message()).text,
              post(keyed, key + "x", message()).text]
    keyed.flush()
    listing = keys_cli(keyed, "list").stdout + keys_cli(keyed, "list", "--json").stdout \
        + keys_cli(keyed, "show", name).stdout
    files = b"".join(p.read_bytes() for p in Path(keyed.db_path).parent.iterdir() if p.is_file())
    for secret in (key, ANTHROPIC_PROVIDER_KEY, OPENAI_PROVIDER_KEY):
        for where, text in (("error bodies", "".join(bodies)), ("log", keyed.log()),
                            ("keys list", listing)):
            assert secret not in text, where
        assert secret.encode() not in files, "a file beside the database"
    assert key[-4:] in listing  # the hint, so an operator can tell keys apart


def test_open_mode_on_a_network_bind_with_a_provider_key_refuses_to_start(tmp_path, fake):
    config = tmp_path / "open.toml"
    config.write_text('[auth]\nmode = "open"\n[providers.anthropic]\napi_key_env = "K"\n')
    env = without_proxy_variables({**__import__("os").environ})
    env.update(LLM_PROXY_CONFIG=str(config), LLM_PROXY_BIND="0.0.0.0:0", K="sk-provider-123456",
               LLM_PROXY_DB=str(tmp_path / "usage.db"), PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF),
                           "proxy.wsgi:application"], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "anyone could spend that key" in done.stderr


def test_a_provider_key_makes_keys_the_default(start_proxy, tmp_path, fake):
    config = tmp_path / "keyed.toml"
    config.write_text('[providers.anthropic]\napi_key_env = "K"\n')
    server = start_proxy(LLM_PROXY_CONFIG=str(config), K="sk-provider-123456")
    answer = post(server, "sk-someones-own-key-123", message())
    assert answer.status_code == 401 and fake.requests == []


def test_an_admin_token_guards_usage_and_flush(start_proxy):
    token = "admin-token-" + uuid.uuid4().hex
    server = start_proxy(LLM_PROXY_ADMIN_TOKEN=token)
    with local_session() as session:
        get = lambda path, **headers: session.get(server.url + path, headers=headers,  # noqa
                                                  timeout=10)
        assert get("/health").status_code == 200  # load balancers need no token
        assert get("/usage").status_code == 401  # loopback is not enough once a token is set
        assert get("/health?flush=1").status_code == 401
        assert get("/usage", authorization="Bearer wrong").status_code == 401
        assert get("/usage", authorization=f"Bearer {token}").status_code == 200
        assert get("/health?flush=1", **{"x-api-key": token}).status_code == 200
        assert token not in server.log()


def test_without_a_token_the_admin_endpoints_answer_loopback_only(proxy):
    with local_session() as session:
        assert session.get(proxy.url + "/usage", timeout=10).status_code == 200
        forwarded = session.get(proxy.url + "/usage", headers={"X-Forwarded-For": "203.0.113.9"},
                                timeout=10)
        assert forwarded.status_code == 401
        assert "loopback" in forwarded.json()["error"]["message"]
        assert session.get(proxy.url + "/health", headers={"X-Forwarded-For": "203.0.113.9"},
                           timeout=10).status_code == 200


def test_no_client_credential_header_goes_upstream_in_keys_mode(keyed, fake):
    _, key = create_key(keyed)
    answer = post(keyed, key, message(), headers={"api-key": key, "x-goog-api-key": key})
    assert answer.status_code == 200
    sent = fake.requests[0].headers
    assert "api-key" not in sent and "x-goog-api-key" not in sent
    assert key not in str(sent.raw)


def test_a_stream_the_client_leaves_is_charged_what_it_cost_so_far(keyed, fake):
    """An OpenAI stream tells its usage last: cut short, the provider has billed the prompt
    all the same.  The key is charged the output its client got (the row's estimate) and
    the prompt's estimate, and its reservation is gone."""
    name, key = create_key(keyed, "--budget", "10")
    chunks = chat_stream(model=BUDGET_MODEL)
    fake.enqueue([Status(200, headers={"content-type": "text/event-stream"}), Send(chunks[0]),
                  Send(chunks[1]), Stall()])
    with local_session() as session:
        answer = session.post(keyed.url + "/v1/chat/completions", stream=True, timeout=30,
                              headers={"authorization": f"Bearer {key}"},
                              json={"model": BUDGET_MODEL, "stream": True, "messages": MESSAGES})
        got = b""
        for piece in answer.iter_content(None):  # until the content has begun
            got += piece
            if got.count(b"data:") >= 2:
                break
        assert got.count(b"data:") >= 2
        answer.close()  # the client hangs up mid-answer, having some of the output
    row = keyed.row(answer.headers[RID])
    assert row["end_reason"] == "client_gone" and row["input_tokens"] is None
    prompt_usd = -(-len(fake.requests[0].body) // 3) * 1.0 / 1e6  # the estimate, $1/M input
    deadline = time.monotonic() + 5
    while show(keyed, name)["running"]:
        assert time.monotonic() < deadline
    after = show(keyed, name)
    assert after["spent_usd"] == pytest.approx((row["cost_usd"] or 0) + prompt_usd)
    assert after["tokens_last_minute"] >= -(-len(fake.requests[0].body) // 3)
