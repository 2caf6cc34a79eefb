"""Gunicorn settings for the proxy; `deploy/gunicorn.conf.py` and `llm-proxy serve` use them.

Why each value (design.md section 7):
- gthread: one thread per live stream; a stream costs a thread, not a process.
- worker_connections barely above threads: a worker must not accept streams it has no
  thread for (they would wait silently, measured: 30 streams got nothing for 30 s with a
  slack of 32), while a full worker leaves new connections to the other workers.  The
  small slack keeps a few idle keep-alive connections (nginx's pool) open.
- timeout is only the worker heartbeat for gthread; it never cuts a request.
- graceful_timeout leaves room for `stream.shutdown_grace` plus a terminal error event.
- no max_requests: recycling a worker cuts every stream it carries.
- keepalive above nginx's upstream keepalive_timeout, so nginx closes idle connections first.
"""

from __future__ import annotations

import os
import signal
import sys

bind = os.environ.get("LLM_PROXY_BIND", "127.0.0.1:8080")
worker_class = "gthread"
workers = int(os.environ.get("LLM_PROXY_WORKERS", "2"))
threads = int(os.environ.get("LLM_PROXY_THREADS", "256"))
worker_connections = threads + 8
timeout = 30
graceful_timeout = int(os.environ.get("LLM_PROXY_GRACEFUL_TIMEOUT", "30"))
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
    """Check the configuration once, in the master, so a bad file stops start-up clearly."""
    from proxy.config import ConfigError, load_config

    try:
        load_config()
    except ConfigError as err:
        sys.stderr.write(f"llm-proxy: configuration error: {err.message}\n")
        raise SystemExit(2)


def post_worker_init(worker):
    """Chain our shutdown onto gunicorn's SIGTERM handler: live streams get told to finish.

    Also shorten the GIL switch interval: every event crosses from the stream thread to the
    server thread, and with the default 5 ms a busy thread can hold that hand-off back."""
    sys.setswitchinterval(0.0005)
    app = worker.wsgi
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        begin = getattr(app, "begin_shutdown", None)
        if begin is not None:
            begin()
        if callable(gunicorn_handler):
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def worker_exit(server, worker):
    """Drain the usage queue before the worker process ends."""
    close = getattr(worker.wsgi, "close", None)
    if close is not None:
        close()
