"""The proxy inside other Python: `create_app` with each kind of config, several apps in one
process, mounting under a prefix beside another WSGI app (the official SDKs pointed at the
prefix), `wsgiref.validate` on every endpoint, and the pytest plugin used as a user would."""

from __future__ import annotations

import re
import signal
import sys
import textwrap
import threading
from pathlib import Path
import warnings
from wsgiref.validate import WSGIWarning, validator

import anthropic
import openai
import pytest
import requests
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client

import proxy
from proxy.config import ConfigError, load_config
from proxy.testing import CannedUpstream, ServedProxy
from support.builders import anthropic_stream
from support.processes import ProxyProcess, http_get
from support.rawhttp import RawResponse
from support.sse import KEEPALIVE
from support.steps import Send, Stall, Status

ROOT = Path(__file__).resolve().parent.parent
STREAM_BODY = {"model": "claude-x", "max_tokens": 5, "messages": [], "stream": True}
README = ROOT / "README.md"


def providers(url: str) -> dict:
    return {"anthropic": {"base_url": url}, "openai": {"base_url": url}}


@pytest.fixture
def canned():
    upstream = CannedUpstream(input_tokens=12, output_tokens=7)
    yield upstream
    upstream.stop()


def legacy_app(environ, start_response):
    """An application that was there first."""
    body = f"legacy {environ['PATH_INFO']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# -- the factory -------------------------------------------------------------------------------
def test_create_app_takes_a_config_a_dict_a_toml_path_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PROXY_HEARTBEAT_INTERVAL", "7")
    monkeypatch.setenv("LLM_PROXY_DB", str(tmp_path / "env.db"))
    toml = tmp_path / "proxy.toml"
    toml.write_text('[stream]\nheartbeat_interval = 3.0\n[providers.anthropic]\n'
                    'base_url = "http://toml.test"\n')
    from_env = proxy.create_app()
    from_dict = proxy.create_app({"stream": {"heartbeat_interval": 2.0},
                                  "providers": {"anthropic": {"base_url": "http://dict.test"}}})
    from_path = proxy.create_app(toml)
    from_config = proxy.create_app(load_config(str(toml), env={}), heartbeat_interval=4)
    overridden = proxy.create_app({}, db=str(tmp_path / "o.db"), **{"stream.idle_timeout": 9})
    try:
        assert (from_env.config.heartbeat_interval, from_env.config.db) == (7.0, str(tmp_path / "env.db"))
        # a dict or a file stands alone: the environment does not change it
        assert (from_dict.config.heartbeat_interval, from_dict.config.db) == (2.0, "")
        assert from_dict.config.providers["anthropic"].base_url == "http://dict.test"
        assert from_path.config.heartbeat_interval == 3.0
        assert from_path.config.providers["anthropic"].base_url == "http://toml.test"
        assert from_config.config.heartbeat_interval == 4.0
        assert (overridden.config.db, overridden.config.idle_timeout) == (str(tmp_path / "o.db"), 9.0)
    finally:
        for app in (from_env, from_dict, from_path, from_config, overridden):
            app.close(1)
    with pytest.raises(ConfigError, match="unknown setting 'heartbeat'"):
        proxy.create_app({}, heartbeat=1)
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        proxy.create_app({"stream": {"heartbeat_interval": -1}})
    with pytest.raises(TypeError):
        proxy.create_app(42)


def test_two_apps_in_one_process_keep_their_own_upstreams_and_rows(tmp_path):
    with CannedUpstream(text="one", output_tokens=3) as first_up, \
            CannedUpstream(text="two", output_tokens=4) as second_up:
        first = ServedProxy(proxy.create_app({"providers": providers(first_up.url),
                                              "tracker": {"db": str(tmp_path / "1.db")}}))
        second = ServedProxy(proxy.create_app({"providers": providers(second_up.url),
                                               "tracker": {"db": str(tmp_path / "2.db")}}))
        try:
            for served, text in ((first, "one"), (second, "two"), (first, "one")):
                client = anthropic.Anthropic(base_url=served.url, api_key="k", max_retries=0)
                reply = client.messages.create(model="claude-sonnet-5", max_tokens=9,
                                               messages=[{"role": "user", "content": "hi"}])
                assert reply.content[0].text == text
            assert [r.output_tokens for r in first.rows()] == [3, 3]
            assert [r.output_tokens for r in second.rows()] == [4]
            assert (first.app.summary()["totals"]["requests"],
                    second.app.summary()["totals"]["output_tokens"]) == (2, 4)
        finally:
            first.stop()
            second.stop()


def test_a_plain_answers_row_is_queued_before_its_last_byte_leaves(tmp_path, canned):
    served = ServedProxy(proxy.create_app({"providers": providers(canned.url),
                                           "tracker": {"db": str(tmp_path / "u.db")}}))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="k", max_retries=0)
        for _ in range(20):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
            assert served.app.flush(5)
        assert len(served.app.rows()) == 20  # each one stored by the time flush returned
    finally:
        served.stop()


def test_close_ends_live_streams_drains_the_rows_refuses_later_requests_and_stops_its_threads(
        tmp_path, fake):
    before = {t.ident for t in threading.enumerate()}
    app = proxy.create_app({"providers": providers(fake.url), "tracker": {"db": str(tmp_path / "u.db")}},
                           heartbeat_interval=0.05)
    served = ServedProxy(app)
    fake.enqueue([Status(200), Send(anthropic_stream()[0]), Stall()])
    stream = RawResponse(served.url, "/v1/messages", dict(
        model="claude-x", max_tokens=5, messages=[], stream=True)).read_head()
    stream.read_until(lambda body: b"message_start" in body, "message_start")
    upstream = fake.wait_for_requests(1)[0]
    mine = [t for t in threading.enumerate() if t.ident not in before
            and t.name in ("llm-proxy-heartbeat", "usage-tracker")]
    assert sorted(t.name for t in mine) == ["llm-proxy-heartbeat", "usage-tracker"]
    served.stop(timeout=2)  # the upstream is silent: only close can end this stream
    body = stream.read_all()
    assert stream.complete and b'"overloaded_error"' in body.rsplit(b"\n\n", 2)[-2], body
    assert upstream.peer_closed.wait(2.0)
    [row] = app.rows()  # no flush needed: close drained the queue
    assert (row.status, row.end_reason) == (200, "shutdown")
    late = Client(app).post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": [],
                                                  "stream": True})
    assert (late.status_code, late.json["error"]["type"]) == (529, "overloaded_error")
    for thread in mine:
        thread.join(2)  # each ends after its current pass
    assert [t.name for t in mine if t.is_alive()] == []
    assert app.heartbeat.live_count() == 0


def test_flush_does_not_wait_for_a_request_still_running(tmp_path, fake):
    served = ServedProxy(proxy.create_app({"providers": providers(fake.url),
                                           "tracker": {"db": str(tmp_path / "u.db")}}))
    try:
        fake.enqueue([Status(200), Send(anthropic_stream()[0]), Stall()])
        silent = RawResponse(served.url, "/v1/messages", dict(
            model="claude-x", max_tokens=5, messages=[], stream=True)).read_head()
        silent.read_until(lambda body: b"message_start" in body, "message_start")
        assert served.flush(0.5)  # a stream still running is not waited for
        done = requests.post(served.url + "/v1/messages", timeout=5,
                             json={"model": "claude-x", "max_tokens": 5, "messages": []})
        rid = done.headers["x-llm-proxy-request-id"]
        assert served.row(rid, timeout=2).end_reason == "complete"  # despite the live stream
    finally:
        served.stop(timeout=2)


def test_a_config_built_in_code_is_checked_and_its_overrides_reach_its_routes(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[retry]\nmax_attempts = 2\n[routes."m-*"]\n'
                    'deployments = [{ provider = "anthropic", name = "a" }]\n'
                    '[routes."own-*"]\nmax_attempts = 7\n'
                    'deployments = [{ provider = "anthropic", name = "b" }]\n')
    config = load_config(str(toml), env={})
    app = proxy.create_app(config, max_attempts=5, backoff_max=1)
    try:
        assert [r.retry.max_attempts for r in app.config.routes] == [5, 7]
        assert {r.retry.backoff_max for r in app.config.routes} == {1.0}
        assert [r.retry.max_attempts for r in config.routes] == [2, 7]  # the caller's is untouched
    finally:
        app.close(1)
    config.heartbeat_interval = -1
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        proxy.create_app(config)
    config.heartbeat_interval = 1.0
    config.providers["anthropic"].base_url = "localhost:8080"
    with pytest.raises(ConfigError, match="base_url"):
        proxy.create_app(config)


def test_a_mounted_proxy_answers_refusals_below_its_prefix_and_leaves_the_others_to_the_site(tmp_path):
    from proxy.errors import RequestTimeout
    from proxy.request_framing import Head

    llm = proxy.create_app({"tracker": {"db": str(tmp_path / "u.db")}})
    site = proxy.mount(legacy_app, "/llm/", llm)
    try:
        err = RequestTimeout("the request did not arrive in time")
        status, headers, body = site.refuse_unread(err, Head("POST", "/upload", "HTTP/1.1"))
        assert (status, body) == (408, b"the request did not arrive in time\n")
        status, headers, body = site.refuse_unread(err, Head("POST", "/llm/v1/messages", "HTTP/1.1",
                                                             [("anthropic-version", "2023-06-01")]))
        assert status == 408 and b'"invalid_request_error"' in body
        assert llm.flush(2)
        assert [(r.endpoint, r.status) for r in llm.rows()] == [("anthropic", 408)]
    finally:
        llm.close(1)
    with pytest.raises(ValueError, match="prefix"):
        proxy.mount(legacy_app, "/", llm)


# -- mounted under a prefix -----------------------------------------------------------------
@pytest.fixture
def mounted(tmp_path, canned):
    """The proxy at /llm inside a legacy application, served by werkzeug's threaded server."""
    app = proxy.create_app({"providers": providers(canned.url),
                            "tracker": {"db": str(tmp_path / "u.db")}})
    served = ServedProxy(app, DispatcherMiddleware(legacy_app, {"/llm": app}))
    yield served
    served.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_the_sdks_work_with_base_url_at_the_prefix(mounted, canned, stream):
    claude = anthropic.Anthropic(base_url=mounted.url + "/llm", api_key="k", max_retries=0)
    gpt = openai.OpenAI(base_url=mounted.url + "/llm/v1", api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        with claude.messages.stream(model="claude-sonnet-5", max_tokens=9,
                                    messages=messages) as events:
            assert events.get_final_message().content[0].text == canned.text
        chunks = list(gpt.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == canned.text
    else:
        reply = claude.messages.create(model="claude-sonnet-5", max_tokens=9, messages=messages)
        assert reply.content[0].text == canned.text and reply.usage.output_tokens == 7
        completion = gpt.chat.completions.create(model="gpt-4o", messages=messages)
        assert completion.choices[0].message.content == canned.text
    rows = mounted.rows()
    assert [(r.endpoint, r.stream, r.end_reason, r.input_tokens, r.output_tokens) for r in rows] == [
        ("anthropic", stream, "complete", 12, 7), ("openai-chat", stream, "complete", 12, 7)]
    assert all(r.cost_usd for r in rows)
    # the prefix is the mount's, never sent upstream; the legacy app keeps its routes
    assert [req.get("model") for req in canned.requests] == ["claude-sonnet-5", "gpt-4o"]
    client = Client(mounted.wsgi_app)
    assert client.get("/other").get_data() == b"legacy /other"
    health = client.get("/llm/health")
    assert health.status_code == 200 and health.json["status"] == "ok"


@pytest.mark.parametrize("keepalive", [True, False])
def test_keepalives_flow_and_a_hang_up_is_seen_in_silence_under_the_prefix(tmp_path, fake, keepalive):
    """With keepalives off only the socket probe can see the client go during the silence."""
    app = proxy.create_app({"providers": providers(fake.url), "tracker": {"db": str(tmp_path / "u.db")}},
                           heartbeat_interval=0.05, keepalive=keepalive)
    served = ServedProxy(app, DispatcherMiddleware(legacy_app, {"/llm": app}))
    try:
        events = anthropic_stream()
        fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
        stream = RawResponse(served.url, "/llm/v1/messages", STREAM_BODY).read_head()
        upstream = fake.wait_for_requests(1)[0]
        assert upstream.path == "/v1/messages"  # the prefix belongs to the mount
        # the preamble, then silence (filled with keepalives, if they are on)
        stream.read_until(lambda body: b"content_block_start" in body
                          and body.count(KEEPALIVE) >= 2 * keepalive, "the preamble")
        stream.close()
        assert upstream.peer_closed.wait(2.0), "the upstream was not closed after the hang-up"
        [row] = served.wait_for_rows(1)
        assert (row.status, row.end_reason) == (499, "client_gone")
    finally:
        served.stop()


# -- PEP 3333, checked ------------------------------------------------------------------------
ENDPOINT_CALLS = [
    ("POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": [], "stream": True}),
    ("POST", "/v1/messages", {"model": "m", "max_tokens": 5, "messages": []}),
    ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": []}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [], "stream": True}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ("POST", "/v1/responses", {"model": "m", "input": "x", "stream": True}),
    ("POST", "/v1/responses", {"model": "m", "input": "x"}),
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("GET", "/usage", None),
    ("POST", "/health", None),
    ("GET", "/nowhere", None),
    ("GET", "/v1/messages", None),
    ("POST", "/v1/messages", b"{not json"),
]


@pytest.mark.parametrize("prefix", ["", "/llm"], ids=["alone", "mounted"])
@pytest.mark.parametrize("method, path, body", ENDPOINT_CALLS,
                         ids=[f"{m} {p} {'stream' if isinstance(b, dict) and b.get('stream') else ''}"
                              for m, p, b in ENDPOINT_CALLS])
def test_every_endpoint_passes_wsgiref_validate(tmp_path, canned, method, path, body, prefix):
    app = proxy.create_app({"providers": providers(canned.url), "tracker": {"db": str(tmp_path / "u.db")}})
    try:
        site = proxy.mount(legacy_app, prefix, app) if prefix else app
        path = prefix + path
        client = Client(validator(site))  # an AssertionError or a WSGIWarning for each breach
        kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answer = client.open(path, method=method, **kwargs)
            answer.get_data()
            answer.close()
        assert [str(w.message) for w in caught if issubclass(w.category, WSGIWarning)] == []
        assert answer.status_code in (200, 400, 404, 405)
    finally:
        app.close(2)


# -- the pytest plugin, as a user's test suite runs it -------------------------------------------
def readme_example(name: str) -> str:
    """The code block after `<!-- example: NAME -->` in the README."""
    text = README.read_text()
    found = re.search(rf"<!-- example: {name} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"README has no example {name!r}"
    return found.group(1)


def test_the_readme_fixture_example_runs_as_a_users_test_suite(pytester):
    pytester.makepyfile(test_users_code=readme_example("pytest"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_the_fixtures_are_inert_unless_a_test_asks(pytester):
    """Loaded in every session of a project that installs the package: nothing runs, and
    nothing but the config module is imported, until a test asks for a fixture."""
    pytester.makepyfile(test_plain=textwrap.dedent("""
        import sys, threading

        def test_nothing(request):
            assert request.config.pluginmanager.has_plugin("llm_proxy")
            assert "proxy.pytest_plugin" in sys.modules
            assert "proxy.app" not in sys.modules and "werkzeug" not in sys.modules
            assert threading.active_count() == 1
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


def test_the_readme_mount_example_serves_both_apps(tmp_path, canned, monkeypatch):
    monkeypatch.setenv("LLM_PROXY_ANTHROPIC_BASE_URL", canned.url)
    monkeypatch.setenv("LLM_PROXY_OPENAI_BASE_URL", canned.url)
    monkeypatch.setenv("LLM_PROXY_DB", str(tmp_path / "u.db"))
    module = tmp_path / "site_app.py"
    module.write_text(readme_example("mount"))
    monkeypatch.syspath_prepend(str(tmp_path))
    import site_app
    try:
        served = ServedProxy(site_app.llm, site_app.application)
        claude = anthropic.Anthropic(base_url=served.url + "/llm", api_key="k", max_retries=0)
        reply = claude.messages.create(model="claude-sonnet-5", max_tokens=9,
                                       messages=[{"role": "user", "content": "hi"}])
        assert reply.content[0].text == canned.text
        assert [r.output_tokens for r in served.rows()] == [7]
        assert Client(site_app.application).get("/").status_code == 200
        served.stop()
    finally:
        sys.modules.pop("site_app", None)


def test_the_mounted_site_under_gunicorn_keeps_what_the_proxys_worker_gives(fake, tmp_path):
    """The README's site under `gunicorn -c deploy/gunicorn.conf.py site_app:application`:
    the legacy route, the SDK at the prefix, keepalives, and on SIGTERM the live stream's
    terminal error and its row stored at exit (the worker found the proxy's hooks)."""
    (tmp_path / "site_app.py").write_text(readme_example("mount"))
    server = ProxyProcess(fake.url, tmp_path, app="site_app:application", prefix="/llm",
                          pythonpath=(str(tmp_path),), LLM_PROXY_SHUTDOWN_GRACE="0.5",
                          LLM_PROXY_GRACEFUL_TIMEOUT="5").start()
    try:
        assert http_get(server.url + "/", timeout=5).text == "the application that was here first\n"
        claude = anthropic.Anthropic(base_url=server.proxy_url, api_key="k", max_retries=0)
        reply = claude.messages.create(model="claude-sonnet-5", max_tokens=9,
                                       messages=[{"role": "user", "content": "hi"}])
        assert reply.type == "message"
        events = anthropic_stream()
        fake.enqueue([Status(200), Send(events[0]), Send(events[1]), Stall()])
        stream = RawResponse(server.url, "/llm/v1/messages", dict(
            model="claude-x", max_tokens=5, messages=[], stream=True)).read_head()
        stream.read_until(lambda body: body.count(KEEPALIVE) >= 2, "two keepalives")
        server.signal(signal.SIGTERM)
        body = stream.read_all()
        assert stream.complete and b'"overloaded_error"' in body.rsplit(b"\n\n", 2)[-2]
        assert server.proc.wait(timeout=10) == 0
        assert sorted(r["end_reason"] for r in server.rows()) == ["complete", "shutdown"]
    finally:
        server.stop()
