"""llm-stream-proxy: a WSGI reverse proxy for LLM APIs.

For embedding (README: "Embedding"): `create_app(...)` returns the proxy as a plain WSGI
callable, with `flush`, `rows`, `summary` and `close` for the application that runs it;
`mount(...)` puts it below a prefix of another application.  The rest of the package is
imported when first used, so `import proxy` (and the pytest plugin) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import Config, ConfigError, resolve_config

if TYPE_CHECKING:
    from .app import App, Mounted


def create_app(config: Any = None, /, **overrides: Any) -> "App":
    """A new proxy application, configured from a `Config`, a dict shaped like the TOML
    file, the path of a TOML file, or (with None) the LLM_PROXY_* environment as the
    server reads it; keyword arguments override single settings (`db="usage.db"`,
    `heartbeat_interval=5`).  Each call makes an independent proxy: several can live in
    one process.  Raises ConfigError for a bad setting."""
    from .app import App

    return App(resolve_config(config, overrides))


def mount(app: Any, prefix: str, llm: "App") -> "Mounted":
    """`app` with the proxy `llm` answering below `prefix` (`/llm/v1/messages`, ...);
    served by the proxy's gunicorn worker, the whole site keeps the proxy's protections."""
    from .app import Mounted

    return Mounted(app, prefix, llm)


def __getattr__(name: str) -> Any:
    if name in ("App", "Mounted"):
        from . import app
        return getattr(app, name)
    raise AttributeError(f"module 'proxy' has no attribute {name!r}")


__all__ = ["App", "Config", "ConfigError", "Mounted", "create_app", "mount"]
