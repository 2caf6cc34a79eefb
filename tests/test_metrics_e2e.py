"""/metrics under real gunicorn with 2 workers: after a scripted set of requests, each
worker served part of them, and either worker's /metrics shows the whole host's counts,
histogram buckets, tokens, retries, fallbacks, breaker states, keepalives and the writer's
rows (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support.builders import DEFAULT_TOTAL_INPUT, DEFAULT_USAGE, anthropic_stream, chat_stream
from support.processes import ProxyProcess, connections_to_every_worker, wait_for
from support.rawhttp import RawResponse
from support.steps import End, Send, Sleep, Status, WaitFor, default_script, json_reply

pytestmark = pytest.mark.timeout(120)

MODEL = "claude-sonnet-5"  # priced, so it is a label of its own
ROUTED = "claude-metrics-1"


@pytest.fixture
def host(fake, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f"""
[providers.backup]
base_url = "{fake.url}"
format = "anthropic"

[routes."claude-metrics-*"]
deployments = [{{ provider = "anthropic", model = "{MODEL}", name = "primary" }},
               {{ provider = "backup", model = "{MODEL}", name = "backup" }}]

[retry]
backoff_base = 0.01

[breaker]
failure_threshold = 2
cooldown = 600
""")
    server = ProxyProcess(fake.url, tmp_path, workers=2, LLM_PROXY_CONFIG=str(config),
                          LLM_PROXY_REPLAY_WINDOW="0").start()
    try:
        yield server
    finally:
        server.stop()


def scrape(host, conn=None) -> dict:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    r = RawResponse(host.url, "/metrics", method="GET", conn=conn).read_head()
    assert r.status == 200 and r.header("content-type").startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.read_all().decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    """The sum over samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def post(host, conn, body: dict) -> RawResponse:
    r = RawResponse(host.url, "/v1/messages", body, conn=conn,
                    headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test"})
    r.read_head().read_all()
    assert r.status == 200, r.body
    return r


def message(model=MODEL, stream=True) -> dict:
    return {"model": model, "max_tokens": 32, "stream": stream,
            "messages": [{"role": "user", "content": "hi"}]}


def silent_stream():
    """A stream that stays silent for many heartbeats between its first two text deltas."""
    events = anthropic_stream(model=MODEL)
    second = [i for i, e in enumerate(events) if b"content_block_delta" in e][1]
    return [Status(200, headers={"Content-Type": "text/event-stream"}),
            *[Send(e) for e in events[:second]], Sleep(0.4),
            *[Send(e) for e in events[second:]], End()]


def server_error():
    return json_reply({"type": "error", "error": {"type": "api_error", "message": "boom"}},
                      status=500)


def test_metrics_add_up_every_worker_of_the_host(host, fake):
    (pid_a, a), (pid_b, b) = connections_to_every_worker(host)
    fake.enqueue(lambda request: default_script(request))  # worker a: two streams
    fake.enqueue(lambda request: default_script(request))
    post(host, a, message())
    post(host, a, message())
    fake.enqueue(lambda request: default_script(request))  # a: one JSON answer
    post(host, a, message(stream=False))
    fake.enqueue(silent_stream())  # worker b: a stream kept alive through a silence
    post(host, b, message())
    fake.enqueue(server_error())  # b: primary fails twice (a retry), backup answers
    fake.enqueue(server_error())
    fake.enqueue(lambda request: default_script(request))
    routed = post(host, b, message(ROUTED))
    host.flush()
    row = host.row(routed.request_id)
    assert (row["deployment"], row["attempts"], row["fallbacks"]) == ("backup", 3, 1)

    # The live gauges are written by each worker's heartbeat pass: wait for its next ones.
    def settled():
        found = scrape(host, a)
        return found if (value(found, "llm_proxy_breaker_state", deployment="primary") == 2
                         and value(found, "llm_proxy_live_streams") == 0
                         and value(found, "llm_proxy_usage_queue_depth") == 0) else None

    samples = wait_for(settled, "the open breaker of primary, and no live stream")
    assert scrape(host, b).keys() == samples.keys()  # either worker shows the whole host

    assert value(samples, "llm_proxy_requests_total", end_reason="complete") == 5
    assert value(samples, "llm_proxy_requests_total", endpoint="anthropic",
                 deployment="anthropic", end_reason="complete") == 4
    assert value(samples, "llm_proxy_requests_total", deployment="backup") == 1
    # Time to first token: the four streams only, every one in a bucket.
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count") == 4
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_bucket", le="+Inf") == 4
    assert value(samples, "llm_proxy_time_per_output_chunk_seconds_count") == 4
    # The silent stream's chunks were 0.4 s apart around the silence: not in the lowest bucket.
    assert value(samples, "llm_proxy_time_per_output_chunk_seconds_bucket", le="0.001") < 4
    assert value(samples, "gen_ai_server_request_duration_seconds_count") == 5
    assert value(samples, "gen_ai_server_request_duration_seconds_bucket", le="0.25") < 5
    assert value(samples, "llm_proxy_overhead_seconds_count") == 5
    assert value(samples, "llm_proxy_relay_time_per_chunk_seconds_count") == 4
    # Tokens: input as the conventions count it (the whole prompt), per request.
    for kind, each in (("input", DEFAULT_TOTAL_INPUT), ("output", DEFAULT_USAGE["output"]),
                       ("cache_read", DEFAULT_USAGE["cache_read"]),
                       ("cache_write", DEFAULT_USAGE["cache_write"])):
        assert value(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type=kind) == 5 * each
        assert value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type=kind) == 5
    assert value(samples, "llm_proxy_cost_usd_total", gen_ai_request_model=MODEL) > 0
    assert value(samples, "llm_proxy_retries_total", deployment="primary") == 1
    assert value(samples, "llm_proxy_fallbacks_total", from_deployment="primary",
                 to_deployment="backup") == 1
    assert value(samples, "llm_proxy_breaker_state", deployment="backup") == 0
    assert value(samples, "llm_proxy_keepalives_total") >= 2
    assert value(samples, "llm_proxy_live_streams") == 0
    assert value(samples, "llm_proxy_usage_rows_total", outcome="written") >= 5
    assert value(samples, "llm_proxy_usage_batches_total") >= 2  # each worker wrote its own
    assert value(samples, "llm_proxy_usage_queue_depth") == 0
    # Both workers served (and so wrote) part of it: the counts above are their sum.
    served = {json.loads(RawResponse(host.url, "/health", method="GET", conn=c).read_head()
                         .read_all())["pid"] for c in (a, b)}
    assert served == {pid_a, pid_b}
    assert "sk-test" not in repr(samples)


def test_metrics_are_guarded_like_usage_unless_opened_for_scrapers(fake, tmp_path):
    server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_ADMIN_TOKEN="admin-secret").start()
    try:
        refused = RawResponse(server.url, "/metrics", method="GET").read_head()
        assert refused.status == 401 and b"admin token" in refused.read_all()
        allowed = RawResponse(server.url, "/metrics", method="GET",
                              headers={"Authorization": "Bearer admin-secret"}).read_head()
        assert allowed.status == 200 and b"llm_proxy_" in allowed.read_all()
    finally:
        server.stop()
    opened = ProxyProcess(fake.url, tmp_path, LLM_PROXY_ADMIN_TOKEN="admin-secret",
                          LLM_PROXY_METRICS_OPEN="true").start()
    try:
        r = RawResponse(opened.url, "/metrics", method="GET",
                        headers={"X-Forwarded-For": "10.0.0.1"}).read_head()
        assert r.status == 200
        r.read_all()
    finally:
        opened.stop()


def test_a_worker_killed_leaves_no_live_gauge_behind(host, fake):
    """A killed worker's live streams stop counting (the master forgets its files)."""
    import os
    import signal

    (pid_a, a), (pid_b, b) = connections_to_every_worker(host)
    release = threading.Event()  # the upstream's stream waits for it (and ends with the test)
    events = anthropic_stream(model=MODEL)
    fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream"}), Send(events[0]),
                  WaitFor(release, 30), End()])
    stuck = RawResponse(host.url, "/v1/messages", message(), conn=b,
                        headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test"})
    stuck.read_head()
    wait_for(lambda: value(scrape(host, a), "llm_proxy_live_streams") == 1, "one live stream")
    os.kill(pid_b, signal.SIGKILL)
    wait_for(lambda: value(scrape(host, a), "llm_proxy_live_streams") == 0,
             "the dead worker's stream gone from the gauge")
    release.set()


def test_a_stream_may_end_with_its_cost_in_a_comment_that_the_sdk_ignores(fake, tmp_path):
    import anthropic

    server = ProxyProcess(fake.url, tmp_path).start()
    try:
        client = anthropic.Anthropic(base_url=server.url, api_key="sk-test", max_retries=0)
        fake.enqueue(lambda request: default_script(request))
        with client.messages.stream(model=MODEL, max_tokens=32, messages=[
                {"role": "user", "content": "hi"}],
                extra_headers={"X-LLM-Proxy-Cost-Comment": "1"}) as stream:
            text = stream.get_final_text()
            request_id = stream.response.headers["x-llm-proxy-request-id"]
        assert text  # the SDK read the whole answer past the comment
        fake.enqueue(lambda request: default_script(request))
        raw = RawResponse(server.url, "/v1/messages", message(),
                          headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test",
                                   "X-LLM-Proxy-Cost-Comment": "1"}).read_head()
        body = raw.read_all()
        assert body.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith(b": llm-proxy-usage {")
        told = json.loads(body.rstrip(b"\n").rsplit(b"\n", 1)[-1].split(b" ", 2)[2])
        row = server.row(raw.request_id)
        assert told["cost_usd"] == pytest.approx(row["cost_usd"]) and told["priced"]
        assert told["output_tokens"] == DEFAULT_USAGE["output"] == row["output_tokens"]
        assert server.row(request_id)["end_reason"] == "complete"
        fake.enqueue(lambda request: default_script(request))
        plain = RawResponse(server.url, "/v1/messages", message(),
                            headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test"})
        assert b"llm-proxy-usage" not in plain.read_head().read_all()  # opt-in only
        fake.enqueue(lambda request: default_script(request))
        answer = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=32, messages=[{"role": "user", "content": "hi"}])
        cost = float(answer.headers["x-llm-proxy-cost-usd"])
        row = server.row(answer.headers["x-llm-proxy-request-id"])
        assert cost == pytest.approx(row["cost_usd"]) and cost > 0
        assert answer.headers["x-llm-proxy-usage"] == (
            f"input={DEFAULT_USAGE['input']}; output={DEFAULT_USAGE['output']}; "
            f"cache_read={DEFAULT_USAGE['cache_read']}; cache_write={DEFAULT_USAGE['cache_write']}")
        assert answer.parse().content[0].text
    finally:
        server.stop()


def test_the_cost_comment_after_upstream_ids_keeps_the_openai_sdk_reading(fake, tmp_path):
    """An upstream that sends `id:` fields: the comment then ends without a blank line
    (which would dispatch an empty event the OpenAI SDK cannot parse)."""
    import openai

    server = ProxyProcess(fake.url, tmp_path).start()
    events = [b"id: %d\n" % i + e for i, e in enumerate(chat_stream())]
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
        fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream"}),
                      *[Send(e) for e in events], End()])
        chunks = list(client.chat.completions.create(
            model="gpt-5", stream=True, messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-LLM-Proxy-Cost-Comment": "1"}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream"}),
                      *[Send(e) for e in events], End()])
        raw = RawResponse(server.url, "/v1/chat/completions",
                          {"model": "gpt-5", "stream": True,
                           "messages": [{"role": "user", "content": "hi"}]},
                          headers={"Authorization": "Bearer sk-test",
                                   "X-LLM-Proxy-Cost-Comment": "1"}).read_head()
        body = raw.read_all()
        assert body.endswith(b"}\n") and not body.endswith(b"\n\n")
        assert body.rsplit(b"\n", 2)[-2].startswith(b": llm-proxy-usage {")
    finally:
        server.stop()


def test_a_worker_short_of_memory_streams_a_json_answer_through_without_its_cost(fake,
                                                                                 tmp_path):
    """Reading a JSON answer whole costs memory from the worker's budget: without room
    (a budget below the 2 MiB a read may take) the answer streams through, whole and
    correct, only without the cost headers."""
    server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_MEMORY_BUDGET=str(1 << 20)).start()
    try:
        fake.enqueue(lambda request: default_script(request))
        r = RawResponse(server.url, "/v1/messages", message(stream=False),
                        headers={"anthropic-version": "2023-06-01",
                                 "x-api-key": "sk-test"}).read_head()
        body = json.loads(r.read_all())
        assert r.status == 200 and body["usage"]["output_tokens"] == DEFAULT_USAGE["output"]
        assert r.header("x-llm-proxy-cost-usd") is None
        assert server.row(r.request_id)["end_reason"] == "complete"
    finally:
        server.stop()


# --- in process: what one finished request adds (found by mutation testing) ------------------


@pytest.fixture
def own_deployment(monkeypatch):
    """This process's own metrics (no multiprocess directory), and a deployment name of
    this test's own, so that what other tests recorded does not count."""
    import uuid

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    return f"unit-{uuid.uuid4().hex[:8]}"


def local_samples() -> dict:
    """Every sample of this process's /metrics, as scrape() gives a host's."""
    from proxy.metrics import exposition

    samples = {}
    for family in text_string_to_metric_families(exposition().decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def finished(deployment: str, **fields):
    """A finished request's row, as the record hands it to Metrics."""
    import uuid

    from proxy.usage import UsageRecord

    values = dict(request_id=uuid.uuid4().hex, started_at=100.0, ended_at=101.5,
                  endpoint="anthropic", deployment=deployment, model_requested=MODEL,
                  status=200, end_reason="complete", input_tokens=10, output_tokens=11,
                  cache_read_tokens=0, cache_write_tokens=0, cost_usd=0.01, priced=True,
                  usage_complete=True, ttft_ms=300.0, stream=True)
    values.update(fields)
    return UsageRecord(**values)


def test_time_per_chunk_and_per_token_are_means_after_the_first(own_deployment):
    """Five content events over one second: 0.25 s per chunk after the first; 11 output
    tokens over that second: 0.1 s per token after the first (the first is the TTFT's)."""
    from proxy.metrics import Metrics, StreamTiming

    dep = own_deployment
    Metrics(known_deployments={dep}).observe_request(
        finished(dep), StreamTiming(first=10.0, last=11.0, count=5))
    samples = local_samples()
    assert value(samples, "llm_proxy_time_per_output_chunk_seconds_sum",
                 deployment=dep) == pytest.approx(0.25)
    assert value(samples, "gen_ai_server_time_per_output_token_seconds_sum",
                 deployment=dep) == pytest.approx(0.1)


def test_a_stream_of_one_content_event_has_no_time_per_chunk_and_keeps_its_tokens(
        own_deployment):
    """One content event has no gap to measure: nothing per chunk, and the rest of the
    request (its tokens) is recorded all the same."""
    from proxy.metrics import Metrics, StreamTiming

    dep = own_deployment
    Metrics(known_deployments={dep}).observe_request(
        finished(dep, output_tokens=3), StreamTiming(first=10.0, last=10.0, count=1))
    samples = local_samples()
    assert value(samples, "llm_proxy_time_per_output_chunk_seconds_count", deployment=dep) == 0
    assert value(samples, "gen_ai_client_token_usage_sum", deployment=dep,
                 gen_ai_token_type="output") == 3


def test_a_replayed_answer_is_a_dedup_hit_not_tokens_nor_a_first_token(own_deployment):
    """A replay's tokens and first token were the paying request's: counting them again
    would double the tokens and pull the TTFT toward the cache's speed."""
    from proxy.metrics import Metrics

    dep = own_deployment
    hits = value(local_samples(), "llm_proxy_dedup_hits_total", kind="replay")
    Metrics(known_deployments={dep}).observe_request(
        finished(dep, end_reason="replay", paid_by="req-payer", cost_usd=0.0, ttft_ms=2.0))
    samples = local_samples()
    assert value(samples, "llm_proxy_dedup_hits_total", kind="replay") == hits + 1
    assert value(samples, "llm_proxy_requests_total", deployment=dep, end_reason="replay") == 1
    assert value(samples, "gen_ai_server_time_to_first_token_seconds_count", deployment=dep) == 0
    assert value(samples, "gen_ai_client_token_usage_count", deployment=dep) == 0


def test_labels_stay_bounded_unknown_names_are_other_and_keys_only_when_asked(own_deployment):
    """A client chooses model names and a row may name a deployment the config does not
    (an old row, a renamed one): those become "other".  Key names are labels only with
    metrics.key_labels."""
    import uuid

    from proxy.metrics import Metrics

    dep = own_deployment
    made_up, key = f"made-up-{uuid.uuid4().hex[:8]}", f"key-{uuid.uuid4().hex[:8]}"
    metrics = Metrics(lambda name: name == MODEL, known_deployments={dep})
    metrics.observe_request(finished(dep, model_requested=made_up, key_name=key))
    metrics.observe_request(finished(f"gone-{dep}", key_name=key))
    samples = local_samples()
    assert value(samples, "gen_ai_client_token_usage_count", deployment=dep,
                 gen_ai_request_model="other", gen_ai_token_type="output") == 1
    assert value(samples, "llm_proxy_requests_total", deployment=dep, key="") == 1
    labels = repr(samples)
    assert made_up not in labels and key not in labels and f"gone-{dep}" not in labels
    Metrics(lambda name: True, known_deployments={dep}, key_labels=True).observe_request(
        finished(dep, key_name=key))
    assert value(local_samples(), "llm_proxy_requests_total", deployment=dep, key=key) == 1


def test_the_queue_depth_counts_the_batch_the_writer_retries(tmp_path):
    """The gauge reads Tracker.queued(): while the database is locked, the batch the
    writer took and keeps retrying still waits for it, as do the rows queued behind it."""
    import sqlite3

    from proxy.tracker import Tracker
    from proxy.usage import UsageRecord

    path = str(tmp_path / "usage.db")
    tracker = Tracker(path, busy_timeout_ms=20, spill_after=60.0, batch_size=2)
    blocker = None
    try:
        tracker.start()
        blocker = sqlite3.connect(path, isolation_level=None)  # another worker, writing
        blocker.execute("BEGIN IMMEDIATE")
        rows = [UsageRecord(request_id=f"req-{i}", started_at=100.0 + i, ended_at=101.0 + i,
                            endpoint="anthropic", status=200) for i in range(3)]
        for rec in rows[:2]:
            tracker.record(rec)
        wait_for(lambda: tracker.stats()["retries"] >= 1, "the writer retrying its batch")
        tracker.record(rows[2])
        assert tracker.queued() == 3
        blocker.execute("ROLLBACK")
        blocker.close()
        blocker = None
        assert tracker.flush(timeout=10) and tracker.queued() == 0
    finally:
        if blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()
        tracker.close(timeout=5)


def test_a_scrape_forgets_the_live_gauges_of_a_worker_that_is_gone(tmp_path):
    """Without the master's child_exit hook (an old copy of deploy/gunicorn.conf.py), a
    killed worker's live streams would count for ever: the scrape drops the live gauges of
    processes that no longer exist, and keeps its counters."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    worker = ("from proxy.metrics import Metrics; m = Metrics(); m.start(); "
              "m.worker_state(live=7, keepalives=3, queued=0)")
    subprocess.run([sys.executable, "-c", worker], env=env, check=True, timeout=30)  # then gone
    scrape_now = ("import sys; from proxy.metrics import exposition; "
                  "sys.stdout.write(exposition().decode())")
    shown = subprocess.run([sys.executable, "-c", scrape_now], env=env, check=True, timeout=30,
                           capture_output=True, text=True).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(shown) for s in family.samples}
    assert value(samples, "llm_proxy_live_streams") == 0
    assert value(samples, "llm_proxy_keepalives_total") == 3  # a counter stays


def test_the_cost_comment_setting_spares_clients_of_a_provider_without_comments(fake, tmp_path):
    """`stream.cost_comment = true` ends streams with a comment, except where the provider
    says its clients cannot parse comments (`keepalive = false`); a request that asks for
    it still gets it."""
    config = tmp_path / "config.toml"
    config.write_text(f'[stream]\ncost_comment = true\n\n[providers.anthropic]\n'
                      f'base_url = "{fake.url}"\nkeepalive = false\n')
    server = ProxyProcess(fake.url, tmp_path, LLM_PROXY_CONFIG=str(config)).start()
    try:
        bodies = []
        for asked in ({}, {"X-LLM-Proxy-Cost-Comment": "1"}):
            fake.enqueue(lambda request: default_script(request))
            r = RawResponse(server.url, "/v1/messages", message(),
                            headers={"anthropic-version": "2023-06-01", "x-api-key": "sk-test",
                                     **asked}).read_head()
            bodies.append(r.read_all())
        assert b"llm-proxy-usage" not in bodies[0]
        assert b": llm-proxy-usage {" in bodies[1]
    finally:
        server.stop()
