"""The dashboard's and /metrics' HTTP rules, in process (werkzeug's test client): who may
open them, the login and its session cookie, errors in the endpoint's own shape, and the
page's own files.  The browser test (test_dashboard_browser.py) drives the page itself."""

from __future__ import annotations

import time

import pytest
from werkzeug.test import Client

from proxy.admin.app import DASHBOARD_COOKIE, dashboard_session
from proxy.app import App
from proxy.config import load_config

TOKEN = "the-admin-token"
REMOTE = {"REMOTE_ADDR": "10.1.2.3"}
LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_PROXY_ADMIN_TOKEN", TOKEN)
    app = App(load_config(env={"LLM_PROXY_DB": str(tmp_path / "usage.db"),
                               "LLM_PROXY_TRACKER": "false"}))
    yield app
    app.close()


@pytest.fixture
def open_app(tmp_path, monkeypatch):
    monkeypatch.delenv("LLM_PROXY_ADMIN_TOKEN", raising=False)
    app = App(load_config(env={"LLM_PROXY_DB": str(tmp_path / "usage.db"),
                               "LLM_PROXY_TRACKER": "false"}))
    yield app
    app.close()


def login(client: Client, token: str = TOKEN, headers: dict | None = None):
    return client.post("/dashboard/login", data={"token": token}, headers=headers or {},
                       environ_overrides=REMOTE)


def test_without_a_token_the_dashboard_is_for_loopback_only(open_app):
    client = Client(open_app)
    assert client.get("/dashboard", environ_overrides=LOCAL).status_code == 200
    page = client.get("/dashboard", environ_overrides=REMOTE)
    assert page.status_code == 401 and b"loopback only" in page.data
    assert b"<form" not in page.data  # no token to ask for
    data = client.get("/dashboard/data", environ_overrides=REMOTE)
    assert data.status_code == 401 and "loopback" in data.json["error"]["message"]
    forwarded = client.get("/dashboard", environ_overrides=LOCAL,
                           headers={"X-Forwarded-For": "10.9.9.9"})
    assert forwarded.status_code == 401  # nginx on the same host is not the admin


def test_the_login_sets_a_session_that_opens_the_dashboard_and_nothing_else(app):
    client = Client(app)
    assert client.get("/dashboard", environ_overrides=LOCAL).status_code == 401  # token set
    assert login(client, "wrong").status_code == 401
    done = login(client)
    assert done.status_code == 303 and done.headers["Location"] == "/dashboard"
    cookie = done.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=43200" in cookie
    assert "Path=/dashboard" in cookie and "Secure" not in cookie and TOKEN not in cookie
    assert client.get("/dashboard", environ_overrides=REMOTE).status_code == 200
    assert client.get("/dashboard/data", environ_overrides=REMOTE).status_code == 200
    # The cookie is the dashboard's: the other admin endpoints still want the token.
    for path in ("/usage", "/metrics", "/health?flush=1"):
        assert client.get(path, environ_overrides=REMOTE).status_code == 401, path
    secure = login(Client(app), headers={"X-Forwarded-Proto": "https"})
    assert "Secure" in secure.headers["Set-Cookie"]


@pytest.mark.parametrize("forge", ["tampered", "expired", "other token", "garbage"])
def test_a_forged_or_expired_session_is_refused(app, forge):
    later, earlier = int(time.time()) + 3600, int(time.time()) - 1
    value = {"tampered": dashboard_session(TOKEN, later)[:-1] + "0",
             "expired": dashboard_session(TOKEN, earlier),
             "other token": dashboard_session("another-token", later),
             "garbage": "x.y"}[forge]
    client = Client(app)
    client.set_cookie(DASHBOARD_COOKIE, value, path="/dashboard")
    assert client.get("/dashboard/data", environ_overrides=REMOTE).status_code == 401
    assert client.get("/dashboard", environ_overrides=REMOTE).status_code == 401


def test_a_guessing_loop_is_refused_after_ten_wrong_tokens(app):
    client = Client(app)
    for _ in range(10):
        assert login(client, "guess").status_code == 401
    stopped = login(client)  # even the right one, for the rest of the minute
    assert stopped.status_code == 429 and b"Too many wrong tokens" in stopped.data


def test_bad_dashboard_queries_get_a_clear_400(open_app):
    client = Client(open_app)
    bad = client.get("/dashboard/data?period=1y", environ_overrides=LOCAL)
    assert bad.status_code == 400 and "period must be one of" in bad.json["error"]["message"]
    long = client.get("/dashboard/data?model=" + "m" * 300, environ_overrides=LOCAL)
    assert long.status_code == 400
    posted = client.post("/dashboard/data", environ_overrides=LOCAL)
    assert posted.status_code == 405


def test_the_page_and_its_files_load_nothing_from_elsewhere(open_app):
    client = Client(open_app)
    page = client.get("/dashboard", environ_overrides=LOCAL)
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert b"http" not in page.data  # no CDN, no absolute URL
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        served = client.get(f"/dashboard/{name}", environ_overrides=REMOTE)  # no data in them
        assert served.status_code == 200 and served.headers["Content-Type"].startswith(kind)
        assert served.headers["X-Content-Type-Options"] == "nosniff"
    assert b"innerHTML" not in client.get("/dashboard/app.js", environ_overrides=LOCAL).data


def test_metrics_without_a_token_answer_loopback_only(open_app):
    client = Client(open_app)
    assert client.get("/metrics", environ_overrides=LOCAL).status_code == 200
    assert client.get("/metrics", environ_overrides=REMOTE).status_code == 401
