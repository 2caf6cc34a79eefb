"""Prometheus metrics: what `/metrics` shows, for every worker of a host at once.

prometheus_client's multiprocess mode does the aggregation: each worker writes its values
to memory-mapped files in one directory, and `/metrics` (served by any worker) reads them
all.  The gunicorn master makes that directory before it forks (`prepare_directory`, from
gunicorn_conf.on_starting) and forgets a dead worker's live gauges (`forget_worker`, from
child_exit).  Without gunicorn (an embedding application, a test's WSGI server) the
environment variable is not set and the values live in this process, which is then the
whole service.

Names follow the OpenTelemetry GenAI semantic conventions where one exists
(`gen_ai.server.time_to_first_token` becomes `gen_ai_server_time_to_first_token_seconds`);
the proxy's own figures are `llm_proxy_*`.  Labels are bounded: endpoints, deployments and
end reasons come from the code and the config; a model is named only when the config or
the price table knows it (else "other"); key names only with `metrics.key_labels`.

Most values are observed once per request, from its finished usage row (`observe_request`),
so a stream's hot path pays almost nothing per event: a clock read and a count per content
event, two clock reads per upstream chunk (0.25 µs in all, bench_metrics.py).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from .host import process_alive
from .usage import DEDUP_REASONS, UsageRecord

log = logging.getLogger("proxy.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
# Values of the breaker-state gauge (the worst of the host's workers is shown).
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

SECONDS_TTFT = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)  # as the rollups' TTFT
SECONDS_CHUNK = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SECONDS_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
SECONDS_DURATION = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
SECONDS_RELAY = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01)
SECONDS_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)  # OTel's


# ---------------------------------------------------------------------------------------------
# The gunicorn master's part.


def prepare_directory() -> str:
    """Give the workers a fresh directory for their values (before any of them starts):
    the operator's `PROMETHEUS_MULTIPROC_DIR` emptied of old values, or a new private one."""
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for old in _value_files(path):  # a previous run's: stale
            os.unlink(old)
        return path
    path = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ[ENV] = path
    os.environ["LLM_PROXY_OWN_METRICS_DIR"] = path  # ours to remove at exit
    return path


def _value_files(path: str, pid: str = "*") -> list[str]:
    """prometheus_client's own files in `path` (counter_123.db, gauge_livesum_123.db, ...),
    and nothing else that may live there."""
    found = []
    for kind in ("counter", "gauge_*", "histogram", "summary"):
        found += glob.glob(os.path.join(path, f"{kind}_{pid}.db"))
    return found


def forget_worker(pid: int) -> None:
    """A worker exited: its live gauges (streams, queue depth, breakers) no longer count."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid)


def remove_own_directory() -> None:
    path = os.environ.get("LLM_PROXY_OWN_METRICS_DIR")
    if path and path == os.environ.get(ENV):
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Exposition.


def exposition() -> bytes:
    """The text format of every metric: the whole host's in multiprocess mode."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    if os.environ.get(ENV):
        _forget_dead_workers(os.environ[ENV])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(_metrics().registry)


def _forget_dead_workers(path: str) -> None:
    """Live gauges of workers that are gone, forgotten at scrape time too: a master whose
    configuration lacks the child_exit hook (an old copy of deploy/gunicorn.conf.py)
    would otherwise show a killed worker's streams for ever."""
    from prometheus_client import multiprocess

    files = glob.glob(os.path.join(path, "gauge_live*_*.db"))
    pids = {name.rsplit("_", 1)[-1][:-3] for name in files}
    for pid in pids:
        if pid.isdigit() and not process_alive(int(pid)):
            multiprocess.mark_process_dead(int(pid), path)


# ---------------------------------------------------------------------------------------------
# The metrics themselves, made once per process on first use (after the fork, so that they
# write to this worker's files).


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def histogram(name, doc, labels, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def gauge(name, doc, labels=(), mode="livesum"):
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)

        self.requests = counter("llm_proxy_requests", "Requests by endpoint, deployment and "
                                "end reason (complete is the only success).",
                                ("endpoint", "deployment", "end_reason", "key"))
        self.duration = histogram("gen_ai_server_request_duration_seconds",
                                  "Time from the request's arrival to its last byte.",
                                  ("endpoint", "deployment", "end_reason"), SECONDS_DURATION)
        self.ttft = histogram("gen_ai_server_time_to_first_token_seconds",
                              "Time from the request's arrival to the first content event "
                              "of a stream (not to the headers, not to a ping).",
                              ("endpoint", "deployment"), SECONDS_TTFT)
        self.per_chunk = histogram("llm_proxy_time_per_output_chunk_seconds",
                                   "Mean time between a stream's content events after the "
                                   "first, per request.", ("deployment",), SECONDS_CHUNK)
        self.per_token = histogram("gen_ai_server_time_per_output_token_seconds",
                                   "Mean time per output token after the first, per "
                                   "complete stream.", ("deployment",), SECONDS_TOKEN)
        self.overhead = histogram("llm_proxy_overhead_seconds",
                                  "The proxy's own time before a request's first upstream "
                                  "call, from its body's last byte: checking it, keys, "
                                  "routing, dedup.",
                                  ("endpoint",), SECONDS_OVERHEAD)
        self.relay = histogram("llm_proxy_relay_time_per_chunk_seconds",
                               "Mean time the proxy held a stream's upstream chunks (framing, "
                               "usage copy, translation, queueing for the client), per "
                               "request.", ("endpoint",), SECONDS_RELAY)
        self.tokens = histogram("gen_ai_client_token_usage",
                                "Tokens per request by type: input counts the whole prompt "
                                "(cached included, as the conventions define it), output "
                                "includes reasoning; cache_read, cache_write and reasoning "
                                "are the parts.",
                                ("gen_ai_token_type", "deployment", "gen_ai_request_model"),
                                TOKENS)
        self.cost = counter("llm_proxy_cost_usd", "Spend in US dollars of priced requests.",
                            ("deployment", "gen_ai_request_model", "key"))
        self.unpriced = counter("llm_proxy_unpriced_requests",
                                "Requests that used tokens but have no price (unknown model).",
                                ("deployment",))
        self.retries = counter("llm_proxy_retries", "Tries again on the same deployment.",
                               ("deployment",))
        self.fallbacks = counter("llm_proxy_fallbacks", "Moves from one deployment to the "
                                 "next.", ("from_deployment", "to_deployment"))
        self.continuations = counter("llm_proxy_continuations",
                                     "Answers continued after their stream broke mid-answer.",
                                     ("deployment",))
        self.dedup = counter("llm_proxy_dedup_hits", "Duplicates answered without an upstream "
                             "call: replayed, or joined to a live call.", ("kind",))
        self.breaker = gauge("llm_proxy_breaker_state", "Circuit breaker per deployment: 0 "
                             "closed, 1 half open, 2 open (the worst of the workers).",
                             ("deployment",), mode="livemax")
        self.keepalives = counter("llm_proxy_keepalives", "Keepalive comments sent.")
        self.live_streams = gauge("llm_proxy_live_streams", "Requests being relayed now.")
        self.queue_depth = gauge("llm_proxy_usage_queue_depth",
                                 "Usage rows waiting for the writer.")
        self.rows = counter("llm_proxy_usage_rows", "Usage rows by what became of them: "
                            "written, spilled (to the file beside the database), replayed "
                            "(from it), rejected or dropped (lost).", ("outcome",))
        self.batches = counter("llm_proxy_usage_batches", "Batches the writer committed.")
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, remembered: prometheus_client checks and locks on
        every call, and a request makes a dozen of them."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


_lock = threading.Lock()
_made: _Metrics | None = None
_made_in: int | None = None


def _metrics() -> _Metrics:
    global _made, _made_in
    if _made is None or _made_in != os.getpid():
        with _lock:
            if _made is None or _made_in != os.getpid():
                _made, _made_in = _Metrics(), os.getpid()
    return _made


# ---------------------------------------------------------------------------------------------
# What the stages report.


@dataclass
class StreamTiming:
    """What the relay measured of a stream: its content events (monotonic seconds), and
    the time it held the upstream's chunks (from a chunk's arrival to its frames queued
    for the client)."""

    first: float | None = None
    last: float | None = None
    count: int = 0
    held: float = 0.0
    chunks: int = 0

    def content_event(self, now: float) -> None:
        if self.first is None:
            self.first = now
        self.last = now
        self.count += 1

    def relayed(self, seconds: float) -> None:
        self.held += seconds
        self.chunks += 1


class Metrics:
    """The proxy's recorder: one per app, bounded by what the config names."""

    MAX_REMEMBERED = 1024  # names whose label is remembered (a client chooses names)

    def __init__(self, model_label: Callable[[str], str | None] = lambda name: None,
                 known_deployments: Iterable[str] = (), key_labels: bool = False,
                 enabled: bool = True) -> None:
        self._model_label = model_label
        self._models: dict[str, str] = {}
        self._failed: set[str] = set()
        self.known_deployments = frozenset(known_deployments)
        self.key_labels = key_labels
        self.enabled = enabled
        self._breakers: dict[str, int] = {}  # states written last (the heartbeat thread's)

    def _safely(self, what: str, action: Callable[[], None]) -> None:
        """Metrics must never cost a worker, a row or a heartbeat: a failure (a metrics
        directory gone, a disk full) is logged once per kind and the caller goes on."""
        if not self.enabled:
            return
        try:
            action()
        except Exception:  # noqa: BLE001
            if what not in self._failed:
                self._failed.add(what)
                log.exception("metrics: %s failed (logged once; the proxy goes on)", what)

    def start(self) -> None:
        """In the worker, before its first request: its series exist (at 0) from now on,
        so a scrape of a quiet host is not empty."""
        self._safely("start", lambda: _metrics().live_streams.set(0))

    def _deployment(self, name: str | None) -> str:
        if not name:
            return "none"
        if not self.known_deployments or name in self.known_deployments:
            return name
        return OTHER

    def _model(self, name: str | None) -> str:
        """The config's or the price table's own name for the model, else "other": a
        client chooses model names (any case, any snapshot suffix), and each would be a
        series of its own.  Only known names are remembered, so junk never crowds out a
        real model."""
        if not name:
            return "none"
        label = self._models.get(name)
        if label is None:
            label = self._model_label(name) or OTHER
            if label != OTHER and len(self._models) < self.MAX_REMEMBERED:
                self._models[name] = label
        return label

    def observe_request(self, row: UsageRecord, timing: StreamTiming | None = None,
                        overhead: float | None = None) -> None:
        """One finished request, from its row; never raises (metrics must not cost a row)."""
        self._safely("observing a request", lambda: self._observe(row, timing, overhead))

    def _observe(self, row: UsageRecord, timing: StreamTiming | None,
                 overhead: float | None) -> None:
        m = _metrics()
        deployment = self._deployment(row.deployment)
        reason = str(row.end_reason)
        key = (row.key_name or "none") if self.key_labels else ""
        m.child(m.requests, row.endpoint, deployment, reason, key).inc()
        m.child(m.duration, row.endpoint, deployment, reason).observe(
            max(row.ended_at - row.started_at, 0.0))
        if row.ttft_ms is not None and row.paid_by is None:
            m.child(m.ttft, row.endpoint, deployment).observe(row.ttft_ms / 1000.0)
        if overhead is not None:
            m.child(m.overhead, row.endpoint).observe(overhead)
        if reason in DEDUP_REASONS:
            m.child(m.dedup, reason).inc()
            return  # its tokens were paid for (and counted) by another request
        self._observe_stream(m, row, deployment, timing)
        self._observe_tokens(m, row, deployment, key)
        if row.attempts > 1 or row.fallbacks:
            self._observe_tries(m, row, deployment)
        if row.continuations:
            m.child(m.continuations, deployment).inc(row.continuations)

    @staticmethod
    def _observe_stream(m: _Metrics, row: UsageRecord, deployment: str,
                        timing: StreamTiming | None) -> None:
        if timing is None:
            return
        if timing.chunks:
            m.child(m.relay, row.endpoint).observe(timing.held / timing.chunks)
        if timing.count < 2:
            return
        span = timing.last - timing.first
        m.child(m.per_chunk, deployment).observe(span / (timing.count - 1))
        if row.end_reason == "complete" and (row.output_tokens or 0) > 1:
            m.child(m.per_token, deployment).observe(span / (row.output_tokens - 1))

    def _observe_tokens(self, m: _Metrics, row: UsageRecord, deployment: str, key: str) -> None:
        model = self._model(row.upstream_model or row.model_requested)
        parts = {"cache_read": row.cache_read_tokens, "cache_write": row.cache_write_tokens,
                 "output": row.output_tokens, "reasoning": row.reasoning_tokens}
        if row.input_tokens is not None or row.cache_read_tokens or row.cache_write_tokens:
            parts["input"] = ((row.input_tokens or 0) + (row.cache_read_tokens or 0)
                              + (row.cache_write_tokens or 0))
        for kind, count in parts.items():
            if count is not None:
                m.child(m.tokens, kind, deployment, model).observe(count)
        if row.priced and row.cost_usd:
            m.child(m.cost, deployment, model, key).inc(row.cost_usd)
        elif not row.priced and any((row.input_tokens, row.output_tokens,
                                     row.cache_read_tokens, row.cache_write_tokens)):
            m.child(m.unpriced, deployment).inc()

    def _observe_tries(self, m: _Metrics, row: UsageRecord, deployment: str) -> None:
        """Retries and fallbacks, from the failed tries the row logs (in order)."""
        try:
            failed = json.loads(row.attempt_log or "{}").get("failed", [])
        except ValueError:
            failed = []
        path = [self._deployment(entry.get("deployment")) for entry in failed
                if isinstance(entry, dict)] + [deployment]
        for before, after in zip(path, path[1:]):
            if before == after:
                m.child(m.retries, after).inc()
            else:
                m.child(m.fallbacks, before, after).inc()

    def breakers(self, snapshot: dict) -> None:
        """Breaker states as this worker sees them (only changes are written); from the
        heartbeat thread only."""
        self._safely("breaker states", lambda: self._breaker_states(snapshot))

    def _breaker_states(self, snapshot: dict) -> None:
        changed = {name: BREAKER_STATES.get(state.get("state"), 0)
                   for name, state in snapshot.items()}
        changed = {n: v for n, v in changed.items() if self._breakers.get(n) != v}
        self._breakers.update(changed)
        for name, value in changed.items():
            _metrics().child(_metrics().breaker, self._deployment(name)).set(value)

    def worker_state(self, live: int, keepalives: int, queued: int) -> None:
        """This worker's live gauges and keepalives (the heartbeat thread, now and then)."""
        def write() -> None:
            m = _metrics()
            m.live_streams.set(live)
            m.queue_depth.set(queued)
            if keepalives:
                m.keepalives.inc(keepalives)
        self._safely("worker state", write)

    def usage_rows(self, outcome: str, count: int) -> None:
        """The writer's counters: written, spilled, replayed, rejected, dropped; batches."""
        if count:
            self._safely("usage rows", lambda: self._usage_rows(outcome, count))

    @staticmethod
    def _usage_rows(outcome: str, count: int) -> None:
        if outcome == "batches":
            _metrics().batches.inc(count)
        elif outcome in ("written", "spilled", "replayed", "rejected", "dropped"):
            _metrics().child(_metrics().rows, outcome).inc(count)
