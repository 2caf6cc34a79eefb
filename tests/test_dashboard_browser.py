"""/dashboard in a real headless Chromium (the distribution's, driven by Selenium through
its chromedriver), served by the proxy under gunicorn from a seeded database: the page
loads without console errors, the charts draw the seeded data, a filter changes what is
shown, and with an admin token the page asks for it and keeps a session.  Each test saves
a screenshot in its temporary directory (or in $LLM_PROXY_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import time
import uuid

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from proxy.store import open_store
from proxy.tracker import to_storage_row
from proxy.usage import UsageRecord

from support.processes import ProxyProcess

pytestmark = pytest.mark.timeout(120)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def seeded_rows(now: float) -> list[dict]:
    """30 requests of claude-a (key alice) and 12 of gpt-b (key bob) over the last day."""
    rows = []
    for i in range(42):
        claude = i < 30
        at = now - 3600 * (i % 20) - 60
        rows.append(to_storage_row(UsageRecord(
            request_id=uuid.uuid4().hex, started_at=at, ended_at=at + 3, endpoint="anthropic",
            model_requested="claude-a" if claude else "gpt-b", deployment="d1" if claude else "d2",
            status=200, end_reason="complete" if i % 7 else "upstream_error",
            input_tokens=1000, output_tokens=200, cache_read_tokens=300, cache_write_tokens=50,
            cost_usd=0.01, priced=True, usage_complete=True, ttft_ms=300.0 + 40 * i,
            stream=True, key_name="alice" if claude else "bob")))
    return rows


HOSTILE_MODEL = '<img src=x onerror="window.pwned=1">'
HOSTILE_KEY = '"><script>window.pwned=2</script>'


def hostile_rows(now: float) -> list[dict]:
    """A client chose these names: they must show as text, never run."""
    return [to_storage_row(UsageRecord(
        request_id=uuid.uuid4().hex, started_at=now - 120, ended_at=now - 119,
        endpoint="anthropic", model_requested=HOSTILE_MODEL, deployment="d1", status=200,
        end_reason="complete", input_tokens=1, output_tokens=1, stream=False,
        key_name=HOSTILE_KEY))]


@pytest.fixture
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        assert os.path.exists(path), f"{path} is missing: .ci/run installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1400,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def proxy_with_data(fake, tmp_path, extra=(), **env) -> ProxyProcess:
    server = ProxyProcess(fake.url, tmp_path, **env)
    store = open_store(server.db_path)
    store.insert_rows(seeded_rows(time.time()) + list(extra))
    store.close()
    return server.start()


def loaded(driver, query: str, timeout: float = 15.0) -> None:
    """Wait until the page has drawn the data of `query` (the script marks it)."""
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.loaded") == query)


def tile(driver, name: str) -> str | None:
    """The tile's value; None while the page redraws it (the element found was replaced)."""
    try:
        return driver.find_element(By.CSS_SELECTOR, f'.tile[data-name="{name}"] .value').text
    except StaleElementReferenceException:
        return None


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver, tmp_path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    artifacts = os.environ.get("LLM_PROXY_TEST_ARTIFACTS")
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        shutil.copy(path, os.path.join(artifacts, name))


def test_the_dashboard_draws_the_seeded_data_and_a_filter_changes_it(fake, tmp_path, browser):
    server = proxy_with_data(fake, tmp_path)
    try:
        browser.get(server.url + "/dashboard")
        loaded(browser, "period=24h")
        assert tile(browser, "Requests") == "42"
        assert tile(browser, "Spend") == "$0.4200"
        assert tile(browser, "Cache hit") == f"{100 * 300 / 1350:.1f} %"
        for chart in ("chart-cost", "chart-requests", "chart-tokens"):
            bars = browser.find_elements(By.CSS_SELECTOR, f"#{chart} rect")
            assert len(bars) >= 20, chart  # one bar per hour with requests (more: stacked)
        tokens = browser.find_elements(By.CSS_SELECTOR, "#chart-tokens rect.output")
        assert tokens, "the token chart stacks output on input"
        models = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#by-model td:first-child")]
        assert models == ["claude-a", "gpt-b"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#recent tr")) == 26  # head + 25
        screenshot(browser, tmp_path, "dashboard.png")

        Select(browser.find_element(By.ID, "model")).select_by_value("gpt-b")
        loaded(browser, "period=24h&model=gpt-b")
        assert tile(browser, "Requests") == "12"
        models = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#by-model td:first-child")]
        assert models == ["gpt-b"]
        keys = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#by-key td:first-child")]
        assert keys == ["bob"]
        deployments = browser.find_elements(By.CSS_SELECTOR, "#by-deployment td")
        assert [d.text for d in deployments][:1] == ["d2"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-requests rect")) == 12
        screenshot(browser, tmp_path, "dashboard-gpt-b.png")
        assert console_errors(browser) == []
    finally:
        server.stop()


def test_names_a_client_chose_are_shown_as_text_and_never_run(fake, tmp_path, browser):
    server = proxy_with_data(fake, tmp_path, extra=hostile_rows(time.time()))
    try:
        browser.get(server.url + "/dashboard")
        loaded(browser, "period=24h")
        assert browser.execute_script("return window.pwned") is None
        models = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#by-model td:first-child")]
        assert HOSTILE_MODEL in models
        keys = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#by-key td:first-child")]
        assert HOSTILE_KEY in keys
        assert browser.find_elements(By.CSS_SELECTOR, "#by-model img") == []
        options = [o.get_attribute("value") for o in
                   browser.find_elements(By.CSS_SELECTOR, "#model option")]
        assert HOSTILE_MODEL in options
        Select(browser.find_element(By.ID, "model")).select_by_value(HOSTILE_MODEL)
        WebDriverWait(browser, 15).until(lambda d: tile(d, "Requests") == "1")
        assert browser.execute_script("return window.pwned") is None
        assert console_errors(browser) == []
    finally:
        server.stop()


def test_with_an_admin_token_the_page_asks_for_it_and_keeps_a_session(fake, tmp_path, browser):
    server = proxy_with_data(fake, tmp_path, LLM_PROXY_ADMIN_TOKEN="the-admin-token")
    try:
        browser.get(server.url + "/dashboard")
        field = browser.find_element(By.NAME, "token")
        field.send_keys("wrong")
        field.submit()
        WebDriverWait(browser, 10).until(lambda d: "Wrong token" in d.page_source)
        field = browser.find_element(By.NAME, "token")
        field.send_keys("the-admin-token")
        field.submit()
        loaded(browser, "period=24h")
        assert tile(browser, "Requests") == "42"
        cookie = browser.get_cookie("llm_proxy_dashboard")
        assert cookie["httpOnly"] and "the-admin-token" not in cookie["value"]
        browser.get(server.url + "/dashboard")  # the session holds
        loaded(browser, "period=24h")
        screenshot(browser, tmp_path, "dashboard-after-login.png")
        # The login page's 401s are all the console may hold.
        assert all("401" in e["message"] for e in console_errors(browser))
    finally:
        server.stop()
