"""Gunicorn settings for the proxy; `deploy/gunicorn.conf.py` and `llm-proxy serve` use them.

Why each value (design.md section 7):
- the worker is `proxy.worker.ProxyWorker`: gthread (one thread per live stream) whose event
  loop reads whole requests, so slow clients never hold a thread, and whose exit keeps time
  to record the last usage rows.
- worker_connections barely above threads: a worker must not accept streams it has no
  thread for (they would wait silently, measured: 30 streams got nothing for 30 s with a
  slack of 32), while a full worker leaves new connections to the other workers.  The
  small slack keeps a few idle keep-alive connections (nginx's pool) open.  Connections
  still sending their request do not count.
- timeout is only the worker heartbeat for gthread; it never cuts a request.
- graceful_timeout is `stream.shutdown_grace` plus 15 s: after the grace, live streams get
  their terminal error, and the worker records their rows and drains the usage queue.
- no max_requests: recycling a worker cuts every stream it carries.
- keepalive above nginx's upstream keepalive_timeout, so nginx closes idle connections first.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import time

# Seconds gunicorn's graceful_timeout leaves after stream.shutdown_grace: streams get their
# terminal errors (all at once), the worker waits for their rows and drains the usage queue.
DRAIN_ROOM = 15


def _shutdown_grace() -> float:
    from proxy.config import ConfigError, load_config

    try:
        return load_config().shutdown_grace
    except ConfigError:
        return 20.0  # on_starting reports the error and stops


bind = os.environ.get("LLM_PROXY_BIND", "127.0.0.1:8080")
worker_class = "proxy.worker.ProxyWorker"
workers = int(os.environ.get("LLM_PROXY_WORKERS", "2"))
threads = int(os.environ.get("LLM_PROXY_THREADS", "1100"))
worker_connections = threads + 8
timeout = 30
graceful_timeout = int(os.environ.get("LLM_PROXY_GRACEFUL_TIMEOUT") or
                       int(_shutdown_grace()) + DRAIN_ROOM)
keepalive = 75
max_requests = 0
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LLM_PROXY_LOG_LEVEL", "info").lower()
wsgi_app = "proxy.wsgi:application"
# The runtime control socket is shared per user by default; several proxies (or test runs)
# on one host would fight over it, and nothing here needs it.
control_socket_disable = True


def on_starting(server):
    """Check everything that can be checked once, in the master, so that a bad setting or an
    unusable database path stops start-up with one clear line instead of failing requests."""
    from proxy.config import ConfigError, load_config
    from proxy.redact import installation_secret
    from proxy.store import TrackerPathError, open_store

    try:
        config = load_config()
    except ConfigError as err:
        _stop(f"configuration error: {err.message}")
    if config.enabled:
        try:
            warning = open_store(config.db_path, busy_timeout_ms=2000).check()
        except TrackerPathError as err:
            _stop(f"{err} (set tracker.db / LLM_PROXY_DB to a writable path)")
        if warning:
            server.log.warning("llm-proxy: %s; requests are served, rows wait", warning)
    try:
        installation_secret(config.secret_path)
    except (OSError, ValueError) as err:
        _stop(f"installation secret {config.secret_path}: {err}")
    _check_auth(server, config)
    if config.collect:  # before any worker exists: each writes its values there
        from proxy.metrics import prepare_directory
        prepare_directory()
    server.log.info("llm-proxy: listening on %s; upstreams: %s; usage database: %s",
                    ", ".join(server.cfg.bind), _upstreams(config),
                    config.db_label if config.enabled else "off (tracker disabled)")
    if server.cfg.graceful_timeout < config.shutdown_grace + 5:
        server.log.warning("llm-proxy: graceful_timeout %s s leaves under 5 s after "
                           "shutdown_grace %s s to end streams and store their rows",
                           server.cfg.graceful_timeout, config.shutdown_grace)


def _check_auth(server, config) -> None:
    """`open` mode with a provider key of the proxy's own, reachable from the network,
    lets anyone spend that key: refused unless the operator said so explicitly."""
    mode = config.auth_mode
    if mode == "open":
        exposed = [b for b in server.cfg.bind if not is_loopback_bind(b)]
        keyed = [p.name for p in config.providers.values() if p.api_key_env]
        if exposed and keyed and not config.open_on_network:
            _stop(f"auth.mode is open, provider {keyed[0]} has a key of the proxy's own, and "
                  f"{exposed[0]} is reachable from the network: anyone could spend that key. "
                  "Use auth.mode = \"keys\" (and `llm-proxy keys create`), bind to loopback, "
                  "or set auth.open_on_network = true (LLM_PROXY_OPEN_ON_NETWORK=1)")
        server.log.info("llm-proxy: auth open: clients' own provider keys pass through")
        return
    from proxy.keys.pgstore import open_key_store
    from proxy.store import StoreFault

    where = "the usage database" if config.db_is_url and not config.keys_db \
        else config.keys_db_path
    store = open_key_store(config)
    try:
        live = [k for k in store.all_keys() if k.state(time.time()) == "active"]
    except StoreFault as err:
        if config.db_is_url and not config.keys_db:  # a server that is down for now
            server.log.warning("llm-proxy: client keys in %s cannot be read yet (%s); keys "
                               "with limits are refused until they can", where, err.kind)
            return
        _stop(f"client keys database {where}: {err.detail}")
    finally:
        store.close()  # each worker opens its own
    server.log.info("llm-proxy: auth keys: %d live client keys in %s%s", len(live), where,
                    "" if live else
                    " (none yet: create one with `llm-proxy keys create --name NAME`)")


def is_loopback_bind(bind: str) -> bool:
    """`127.0.0.1:8080`, `[::1]:8080`, `localhost:8080` or a Unix socket: this host only.
    A socket handed over (`fd://`, systemd) may listen anywhere: assume the network."""
    if bind.startswith("unix:"):
        return True
    if bind.startswith("fd://"):
        return False
    host = bind.rsplit(":", 1)[0] if not bind.startswith("[") else bind[1:].split("]", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume the network


def _upstreams(config) -> str:
    """Where requests go, in one line: each provider's name, URL, format and key source."""
    return ", ".join(
        f"{p.name} {p.base_url} ({p.format}, "
        f"{'key from $' + p.api_key_env if p.api_key_env else 'client keys'})"
        for p in config.providers.values())


def _stop(message: str) -> None:
    sys.stderr.write(f"llm-proxy: {message}\n")
    raise SystemExit(2)


def child_exit(server, worker):
    """In the master, after a worker exited (or was killed): its live gauges stop counting,
    and the usage rows it had queued and not stored, if it was killed, are told."""
    from proxy.metrics import forget_worker
    forget_worker(worker.pid)
    _report_lost_rows(server)


def _report_lost_rows(server) -> None:
    """The next worker would tell too (see proxy/unwritten.py); the master tells at once.
    Nothing here may raise: this runs in the master's loop, which a raise would stop."""
    try:
        from proxy.config import load_config
        from proxy.unwritten import directory_for, report_dead

        config = load_config()
        if config.enabled:
            report_dead(directory_for(config.spill_path), server.log.error)
    except Exception as err:
        server.log.warning("llm-proxy: could not count a dead worker's unstored rows: %s", err)


def on_exit(server):
    """The master stops: the metrics directory it made goes with it."""
    from proxy.metrics import remove_own_directory
    remove_own_directory()


def worker_exit(server, worker):
    """Drain the usage queue before the worker process ends (the worker does it first)."""
    close = getattr(worker.wsgi, "close", None)
    if close is not None:
        close()
