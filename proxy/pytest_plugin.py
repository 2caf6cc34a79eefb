"""pytest fixtures for testing code that calls LLM APIs through the proxy.

Registered through the `pytest11` entry point, so a project with the package installed
has them without any import; they do nothing unless a test asks for them.

    def test_my_agent_is_billed(llm_proxy, llm_canned_upstream):
        proxy = llm_proxy(upstream=llm_canned_upstream.url)
        client = anthropic.Anthropic(base_url=proxy.url, api_key="test")
        client.messages.create(model="claude-sonnet-5", max_tokens=50, messages=[...])
        [row] = proxy.rows()  # flushes the usage queue, then reads the rows
        assert row.output_tokens == 5

`llm_proxy(upstream=None, config=None, **settings)` starts a proxy in this process on a
free loopback port (a real HTTP server), stopped after the test.  `upstream` is the base URL
every provider points at; `config` is a dict shaped like the TOML file (or a TOML path, or a
`Config`); `settings` override single settings.  Unless the config names one, the usage
database lives in the test's temporary directory.  The environment's LLM_PROXY_* variables
are not read.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest


@pytest.fixture
def llm_proxy(tmp_path_factory) -> Iterator[Callable[..., Any]]:
    """A factory of proxies served in-process; each is stopped (and its rows drained) at
    the end of the test."""
    from .app import App
    from .config import check_url, resolve_config
    from .testing import ServedProxy

    started: list[ServedProxy] = []

    def start(upstream: str | None = None, config: Any = None, **settings: Any) -> ServedProxy:
        resolved = resolve_config({} if config is None else config, settings)
        if not resolved.db:
            resolved.db = str(tmp_path_factory.mktemp("llm-proxy") / "usage.db")
        if upstream is not None:
            url = check_url(upstream, "llm_proxy(upstream=...)")
            for provider in resolved.providers.values():
                provider.base_url = url
        proxy = ServedProxy(App(resolved))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def llm_canned_upstream() -> Iterator[Any]:
    """A stand-in provider on a loopback port: one fixed answer (10 input, 5 output tokens)
    to every Messages and Chat Completions request, streamed or not."""
    from .testing import CannedUpstream

    upstream = CannedUpstream()
    yield upstream
    upstream.stop()
