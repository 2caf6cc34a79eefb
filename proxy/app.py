"""The WSGI applications: the proxy app (the pipeline's entry) and the root that mounts
the admin endpoints beside it and owns the worker's lifecycle.

Both are plain WSGI callables, so they run under gunicorn (the supported way), any other
WSGI server, or legacy WSGI infrastructure.  Every failure before a response has started is
rendered in the endpoint's own error format with the right status; nothing a client sends
can kill a worker, and a bug costs one request (with its usage row), caught in one place.

The pipeline, in stage order (proxy/pipeline/):  admit → attempt (tries) → relay → finalize.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.wrappers import Request

from .admin import ADMIN_PATHS, AdminApp, AdminDeps
from .config import Config, load_config
from .errors import MethodNotAllowed, NotFound, ProxyError, ShuttingDown
from .formats import Format
from .formats.translate.bridge import Bridges, ProviderTranslation
from .heartbeat import Heartbeat
from .metrics import Metrics
from .limits import MemoryBudget
from .pipeline.admit import (ENDPOINTS, MODELS_PATH, Admission, AdmitDeps, Opened, format_for,
                             new_request_id)
from .dedup.answers import READ_BUSY_TIMEOUT_MS, AnswerCache, StoredAnswers
from .pipeline.attempt import TryDeps
from .pipeline.dedup import DEDUP_HEADER, Dedup, DedupDeps, DedupTicket, DedupTickets
from .pipeline.fanout import LiveCalls
from .pipeline.finalize import ESTIMATE_DEPLOYMENT, InFlight
from .pipeline.gate import Gate, GateDeps, only_allowed_models
from .keys.ledger import KeyBook, Ledger
from .keys.pgstore import open_key_store
from .pipeline.relay import RelayDeps, StreamRelay, serve_estimate, serve_plain
from .pipeline.replies import StartResponse, error_parts, error_response
from .pricing import PriceTable
from .redact import Redactor, installation_secret
from .request_framing import Head
from .routing import Breakers, Router
from .text import loggable
from .store import open_store
from .tracker import NullTracker, Tracker
from .usage import UsageRecord
from .upstream import UpstreamClient, UpstreamRequests

log = logging.getLogger("proxy.app")

METRICS_INTERVAL = 0.5  # seconds between writes of a worker's live gauges


class ProxyApp:
    """The proxied endpoints (`/v1/...`): admit, then relay; one error boundary."""

    def __init__(self, admission: Admission, relay: RelayDeps, dedup: Dedup,
                 shutting_down) -> None:
        self.admission = admission
        self.relay = relay
        self.dedup = dedup
        self._shutting_down = shutting_down

    def __call__(self, environ, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        path = request.path
        fmt = format_for(path, request.headers)
        opened: Opened | None = None
        try:
            endpoint = ENDPOINTS.get(path)
            opened = self.admission.open(request.headers, endpoint.name if endpoint else
                                         "models" if path == MODELS_PATH else "other",
                                         request.content_length or 0)
            return self._serve(request, path, fmt, opened, start_response)
        except ProxyError as err:  # logged once, with the row
            return self._refuse(fmt, err, opened, start_response)
        except Exception as exc:  # a bug must cost one request, never the worker
            log.exception("internal error on %s %s", loggable(request.method, 32), loggable(path))
            err = ProxyError(f"internal error in the proxy: {type(exc).__name__}")
            return self._refuse(fmt, err, opened, start_response)

    def _serve(self, request: Request, path: str, fmt: Format, opened: Opened,
               start_response: StartResponse) -> Iterable[bytes]:
        endpoint = ENDPOINTS.get(path)
        if path == MODELS_PATH:
            if request.method != "GET":
                raise MethodNotAllowed(f"{MODELS_PATH} accepts GET only")
            self.admission.identify(opened, request.headers)
            preq = self.admission.admit_model_list(request, fmt, opened)
            return only_allowed_models(
                opened.key, lambda start: serve_plain(self.relay, preq, opened.record, start),
                start_response)
        if endpoint is None:
            raise NotFound(f"no route for {loggable(request.method, 32)} {loggable(path, 200)}")
        if request.method != "POST":
            raise MethodNotAllowed(f"{path} accepts POST only")
        self.admission.identify(opened, request.headers)
        preq = self.admission.admit(request, endpoint, opened)
        if self._shutting_down():
            raise ShuttingDown("the proxy is shutting down; retry the request")
        if preq.estimate_locally:
            return serve_estimate(preq, opened.record, start_response)
        start_response = told_dedup(start_response, preq.dedup)
        served = self.dedup.serve(preq, opened.record, start_response)
        if served is not None:
            return served
        if preq.stream:
            return StreamRelay(self.relay, preq, opened.record).respond(start_response)
        return serve_plain(self.relay, preq, opened.record, start_response)

    @staticmethod
    def _refuse(fmt: Format, err: ProxyError, opened: Opened | None,
                start_response: StartResponse) -> Iterable[bytes]:
        if opened is None:  # the record itself could not be opened
            log.warning("refused a request without a usage row: %s %s", fmt.status_of(err),
                        loggable(err.message))
            return error_response(fmt, err, new_request_id(), start_response)
        opened.record.failed(fmt.status_of(err), err)
        opened.record.report()  # one left waiting for an answer that never went out
        return error_response(fmt, err, opened.request_id, start_response, opened.redactor)

    def refuse_unread(self, err: ProxyError, head: Head | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        """A request the server refuses before it reaches the application (bad framing, too
        slow, too large): its usage row, and the answer, in the endpoint's error shape, as
        (status, headers, body) for the server to send.

        `head` is what could be read of the request's head.  Bytes that never made a
        request line (a TLS hello, a port scan, a connection that trickles its first line)
        are not a request to account for: they get the answer and a log line only."""
        headers = {name.lower(): value for name, value in (head.headers if head else [])}
        endpoint = ENDPOINTS.get(head.path) if head else None
        fmt = format_for(head.path if head else None, headers)
        status = fmt.status_of(err)
        if head is None:
            request_id, redactor = new_request_id(), None
        else:
            opened = self.admission.open(headers, endpoint.name if endpoint else "other")
            opened.record.failed(status, err)
            request_id, redactor = opened.request_id, opened.redactor
        log.info("refused %s %s %s: %s %s", request_id, loggable(head.method if head else None, 32),
                 loggable(head.target if head else None), status, loggable(err.message))
        return error_parts(fmt, err, request_id, redactor)


def told_dedup(start_response: StartResponse, ticket: DedupTicket | None) -> StartResponse:
    """Every answer of a proxied endpoint says what dedup did: miss, replay, joined (or
    off: the request was not eligible, or opted out)."""
    def start(status, headers, exc_info=None):
        verdict = ticket.verdict if ticket is not None else "off"
        return start_response(status, list(headers) + [(DEDUP_HEADER, verdict)], exc_info)
    return start


class App:
    """The root WSGI callable: the admin endpoints mounted beside the proxy app, and the
    worker's lifecycle (`ServerHooks`: start, begin_shutdown, close, refuse_unread)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config = config or load_config()
        self.router = Router(config.routes, Breakers(config.breaker_policy))
        prices = PriceTable(config.prices)
        self.metrics = Metrics(lambda model: model_label(config, prices, model),
                               known_deployments(config), config.key_labels, config.collect)
        self._metrics_due = 0.0
        self._keepalives_seen = 0
        self.heartbeat = Heartbeat(config.heartbeat_interval, config.client_probe_interval,
                                   after_pass=self._after_heartbeat)
        self.budget = MemoryBudget(config.memory_budget)
        self.inflight = InFlight()
        self.stream_threads = ThreadPoolExecutor(max_workers=4096, thread_name_prefix="stream")
        self.shutting_down = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._tracker: Tracker | NullTracker | None = None
        self._tracker_pid: int | None = None
        self._tracker_lock = threading.Lock()
        self._key_secret: bytes | None = None
        bridges = Bridges({name: ProviderTranslation(
            p.format, p.max_tokens_field, p.reasoning_effort, p.default_max_tokens,
            p.reasoning_content) for name, p in config.providers.items()})
        keys_mode = config.auth_mode == "keys"
        requests = UpstreamRequests(config.providers, keep_client_keys=not keys_mode)
        self.key_store = open_key_store(config, checkpoints_apart=keys_mode)
        self.ledger = Ledger(self.key_store) if keys_mode else None
        tries = TryDeps(UpstreamClient(config.connect_timeout, config.idle_timeout), requests,
                        bridges, self.router, config.plain_timeout)
        live_calls = LiveCalls()
        self.answers = AnswerCache(config.cache_bytes)
        self.stored_answers = StoredAnswers(lambda: open_store(config.db_path,
                                                                READ_BUSY_TIMEOUT_MS))
        dedup = Dedup(DedupDeps(self.answers, self.stored_answers, live_calls,
                                keep=lambda answer: self.tracker.keep_answer(answer)))
        gate = Gate(GateDeps(
            keys_mode, KeyBook(self.key_store, lambda: self.key_secret) if keys_mode else None,
            self.ledger, prices, config.reserve_output_tokens, config.max_continuations))
        admission = Admission(AdmitDeps(
            config=config, router=self.router, bridges=bridges, continues=requests.continues,
            prices=prices,
            secrets=Redactor(p.api_key for p in config.providers.values()), budget=self.budget,
            inflight=self.inflight, rows=lambda: self.tracker, key_secret=lambda: self.key_secret,
            dedup=DedupTickets(config.dedup_policy, config.cache_bytes, config.anonymous),
            gate=gate, metrics=self.metrics))
        self.proxy = ProxyApp(admission, RelayDeps(
            tries, self.heartbeat, self.stream_threads, config.commit_delay,
            config.max_event_bytes, config.max_continuations, live_calls, self.budget), dedup,
            lambda: self.shutting_down)
        self.admin = AdminApp(AdminDeps(
            db_path=config.db_path, started_tracker=self._started_tracker,
            tracker=lambda: self.tracker, shutting_down=lambda: self.shutting_down,
            live_streams=self.heartbeat.live_count, breakers=self.router.breakers,
            budget=self.budget,
            dedup=lambda: {**self.answers.stats(), "live_shared_calls": len(live_calls)},
            admin_token=lambda: config.admin_token, client_key=gate.live_key,
            metrics_open=config.open_to_scrapers))

    def __call__(self, environ, start_response: StartResponse) -> Iterable[bytes]:
        # The path as werkzeug reads it (`//health` is `/health`), so both apps agree.
        if "/" + environ.get("PATH_INFO", "").lstrip("/") in ADMIN_PATHS:
            return self.admin(environ, start_response)
        return self.proxy(environ, start_response)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def tracker(self) -> Tracker | NullTracker:
        """Started on first use, in the process that uses it (gunicorn forks workers)."""
        pid = os.getpid()
        if self._tracker is None or self._tracker_pid != pid:
            with self._tracker_lock:
                if self._tracker is None or self._tracker_pid != pid:
                    self._tracker = self._make_tracker()
                    self._tracker_pid = pid
        return self._tracker

    def _after_heartbeat(self, live: int, keepalives: int) -> None:
        """After each heartbeat pass: the gauges that describe this worker now, written off
        the requests' path, at most every METRICS_INTERVAL (keepalives add up meanwhile)."""
        self._keepalives_seen += keepalives
        now = time.monotonic()
        if now < self._metrics_due:
            return
        self._metrics_due = now + METRICS_INTERVAL
        tracker = self._started_tracker()
        self.metrics.worker_state(live, self._keepalives_seen,
                                  tracker.queued() if tracker is not None else 0)
        self._keepalives_seen = 0
        self.metrics.breakers(self.router.breakers.snapshot())

    def _started_tracker(self) -> Tracker | NullTracker | None:
        return self._tracker if self._tracker_pid == os.getpid() else None

    def _make_tracker(self) -> Tracker | NullTracker:
        if not self.config.enabled:
            return NullTracker()
        tracker = Tracker(self.config.db_path, spill_dir=self.config.spill_path,
                          batch_size=self.config.batch_size,
                          flush_interval=self.config.flush_interval,
                          queue_max=self.config.queue_max, spill_after=self.config.spill_after,
                          retention_days=self.config.retention_days,
                          on_count=self.metrics.usage_rows)
        tracker.start()
        return tracker

    @property
    def key_secret(self) -> bytes:
        """The installation secret that keys client key ids (created on first start)."""
        if self._key_secret is None:
            try:
                self._key_secret = installation_secret(self.config.secret_path)
            except (OSError, ValueError) as exc:
                log.error("cannot use the installation secret %s (%s); client key ids of this "
                          "process will not match other processes'", self.config.secret_path,
                          loggable(exc))
                self._key_secret = secrets.token_hex(32).encode("ascii")
        return self._key_secret

    def start(self) -> None:
        """Worker start: the usage writer, the key secret and the metrics, before the first
        request."""
        self.tracker
        self.key_secret
        self.metrics.start()

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new requests, let live streams run `shutdown_grace`, then end them."""
        self.shutting_down = True
        self.heartbeat.begin_shutdown(
            self.config.shutdown_grace,
            lambda: ShuttingDown("the proxy is shutting down; retry the request"))

    # -- the embedding API (README: "Embedding") ---------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the row of every request answered so far is stored; True when all
        are, False after `timeout` (a database refusing rows).  Every answer queues its
        row before its last byte leaves, so a client that has its whole answer can flush
        and find its row; requests still running are not waited for."""
        tracker = self._started_tracker()
        return tracker is None or tracker.flush(timeout)

    def rows(self, request_id: str | None = None, limit: int | None = None) -> list[UsageRecord]:
        """Stored usage rows, oldest first, all of them unless `limit` says otherwise (call
        `flush` first to include the latest)."""
        store = open_store(self.config.db_path)
        try:
            return [UsageRecord.from_row(row) for row in store.rows(request_id, limit)]
        finally:
            store.close()

    def summary(self, since=None, until=None, top: int | None = None) -> dict:
        """The usage report as `/usage` and `llm-proxy usage --json` give it."""
        from .report import summarize
        return summarize(self.config.db_path, since=since, until=until, top=top)

    def close(self, timeout: float = 10.0) -> None:
        """Stop for good, within `timeout`: refuse new requests (503), end live streams with
        a terminal error, wait for the usage rows of requests still finishing (stream
        threads record theirs after the client got its last byte), record the stragglers,
        drain the usage queue and stop the writer and the threads.  A worker calls it at
        exit, after SIGTERM's grace (`begin_shutdown`); an embedding application when it
        is done with the proxy (`begin_shutdown` first gives live streams that grace)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.shutting_down = True
        ended = self.heartbeat.end_now(ShuttingDown("the proxy was closed; retry the request"))
        if ended:
            log.info("closed with %d live streams: each ended with a terminal error", ended)
        deadline = time.monotonic() + timeout
        if not self.inflight.wait_until_empty((deadline - time.monotonic()) / 2):
            count = self.inflight.finish_remaining(
                ShuttingDown("the proxy stopped before the request ended"))
            log.warning("recorded %d requests that were still running at exit", count)
        if self.ledger is not None:  # every request is finished: its spend is settled
            self.ledger.close()
        tracker = self._started_tracker()
        if tracker is not None:
            tracker.close(max(deadline - time.monotonic(), 0.1))
        self.heartbeat.stop()
        self.stored_answers.close()
        self.stream_threads.shutdown(wait=False)
        self.proxy.relay.tries.upstream.close()

    def refuse_unread(self, err: ProxyError, head: Head | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        return self.proxy.refuse_unread(err, head)


def model_label(config: Config, prices: PriceTable, model: str) -> str | None:
    """The metrics label of a model name: the config's name when a route or a deployment
    names it, else the price table's own name for it; None for a name neither knows."""
    for route in config.routes:
        if route.pattern == model or any(d.model == model for d in route.deployments):
            return model
    return prices.known_name(model)


def known_deployments(config: Config) -> set[str]:
    """Every deployment a row can name: the routes' and the providers' own (unrouted
    models go to the provider, named after it)."""
    names = {d.name for route in config.routes for d in route.deployments}
    return names | set(config.providers) | {ESTIMATE_DEPLOYMENT}


class Mounted:
    """Another WSGI application with the proxy mounted under `prefix` beside it: requests
    below the prefix go to the proxy (werkzeug's DispatcherMiddleware moves the prefix from
    PATH_INFO to SCRIPT_NAME), the rest to `app`.  It passes the proxy's server hooks on,
    so the proxy's own gunicorn worker serves the whole site as it serves the proxy alone:
    slow clients read in its event loop, streams drained on SIGTERM, the last rows stored
    at exit."""

    def __init__(self, app, prefix: str, llm: App) -> None:
        if not prefix.strip("/"):
            raise ValueError("mount the proxy below a prefix such as /llm, not at the root")
        self.llm = llm
        self.prefix = "/" + prefix.strip("/")
        self.config = llm.config
        self._dispatch = DispatcherMiddleware(app, {self.prefix: llm})

    def __call__(self, environ, start_response: StartResponse) -> Iterable[bytes]:
        return self._dispatch(environ, start_response)

    def start(self) -> None:
        self.llm.start()

    def begin_shutdown(self) -> None:
        self.llm.begin_shutdown()

    def close(self, timeout: float = 10.0) -> None:
        self.llm.close(timeout)

    def refuse_unread(self, err: ProxyError, head: Head | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        """A refused request below the prefix is the proxy's (its endpoint's error shape, a
        usage row); any other is the site's: a plain-text answer and no row."""
        if head is not None and head.path.startswith(self.prefix + "/"):
            return self.llm.refuse_unread(
                err, dataclasses.replace(head, target=head.target[len(self.prefix):]))
        body = f"{err.message}\n".encode("utf-8")
        return err.status, [("Content-Type", "text/plain; charset=utf-8")], body
