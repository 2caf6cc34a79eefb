"""What metrics cost on the hot path (issue: under 0.02 ms per event at p50).

1. Per event, in process: the only metrics work a stream's event does is the relay's
   `record.content_event()` (a timestamp and a count for the time per chunk); timed per call
   against an empty call, in batches, p50 and p99 of the per-call time.
2. Per request, in process, in prometheus_client's multiprocess mode (values in mmap files,
   as under gunicorn): `Metrics.observe_request` of a finished streaming row.
3. End to end, real gunicorn (2 workers), kept-alive connections, interleaved: a streaming
   request of 50 events and a JSON request with metrics on vs off (LLM_PROXY_METRICS).

    python tests/benchmarks/bench_metrics.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _common  # noqa: F401  (paths)
from _common import FakeUpstream, ProxyProcess, RawConnection, RawResponse

from support.builders import anthropic_stream
from support.steps import End, Send, Status, default_script


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def per_event(batches: int, size: int) -> tuple[float, float]:
    """(p50, p99) µs of the metrics' work for one event, in the worst case of one event per
    upstream chunk: the relay's content_event() and its timing of the chunk (two clock
    reads and relayed()), minus the same loop with metrics off."""
    from proxy.metrics import Metrics
    from proxy.pipeline.finalize import RequestRecord
    from proxy.pricing import PriceTable

    class Sink:
        def record(self, rec):
            pass

    def record(metrics):
        return RequestRecord(Sink(), PriceTable({}), request_id="r", endpoint="anthropic",
                             client_key_id=None, bytes_in=0, metrics=metrics)

    def loop(rec) -> int:
        timing = rec.timing
        t0 = time.perf_counter_ns()
        for _ in range(size):  # what relay._pump and relay._forward do per chunk and event
            began = time.perf_counter() if timing is not None else 0.0
            rec.content_event()
            if timing is not None:
                timing.relayed(time.perf_counter() - began)
        return time.perf_counter_ns() - t0

    on, off = record(Metrics()), record(Metrics(enabled=False))
    costs = [(loop(on) - loop(off)) / size / 1000.0 for _ in range(batches)]
    return percentile(costs, 0.5), percentile(costs, 0.99)


PER_REQUEST = r"""
import os, sys, time, json
from proxy.metrics import Metrics, StreamTiming
from proxy.usage import UsageRecord
m = Metrics(lambda name: True, ["primary"])
m.start()
row = UsageRecord(request_id="r", started_at=time.time() - 2, ended_at=time.time(),
                  endpoint="anthropic", deployment="primary", model_requested="claude-x",
                  status=200, end_reason="complete", input_tokens=100, output_tokens=50,
                  cache_read_tokens=10, cache_write_tokens=5, cost_usd=0.01, priced=True,
                  ttft_ms=300.0, stream=True)
timing = StreamTiming(first=1.0, last=2.0, count=50)
for _ in range(200):
    m.observe_request(row, timing, 0.0004)
costs = []
for _ in range(int(sys.argv[1])):
    t0 = time.perf_counter_ns()
    m.observe_request(row, timing, 0.0004)
    costs.append((time.perf_counter_ns() - t0) / 1000.0)
costs.sort()
print(json.dumps([costs[len(costs) // 2], costs[int(len(costs) * 0.99)]]))
"""


def per_request(count: int) -> tuple[float, float]:
    """(p50, p99) µs of observe_request in multiprocess mode (a fresh process)."""
    import json

    with tempfile.TemporaryDirectory() as directory:
        out = subprocess.run([sys.executable, "-c", PER_REQUEST, str(count)], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory})
    return tuple(json.loads(out.stdout))


def end_to_end(rounds: int) -> dict:
    """Request times (ms) with metrics on and off, interleaved on kept-alive connections."""
    fake = FakeUpstream()
    fake.start()
    events = anthropic_stream(text_pieces=["x"] * 48)
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "sk-bench"}
    results = {}
    tmp = tempfile.mkdtemp(prefix="bench-metrics-")
    from pathlib import Path
    servers = {"on": ProxyProcess(fake.url, Path(tmp), workers=2, LLM_PROXY_METRICS="true"),
               "off": ProxyProcess(fake.url, Path(tmp), workers=2, LLM_PROXY_METRICS="false")}
    try:
        for server in servers.values():
            server.start()
        conns = {name: RawConnection(s.url) for name, s in servers.items()}
        times = {(name, kind): [] for name in servers for kind in ("stream", "json")}
        script = [Status(200, headers={"Content-Type": "text/event-stream"}),
                  *[Send(e) for e in events], End()]
        for i in range(rounds):
            for name in (("on", "off") if i % 2 else ("off", "on")):
                for kind in ("stream", "json"):
                    fake.enqueue(script if kind == "stream" else
                                 (lambda request: default_script(request)))
                    t0 = time.perf_counter()
                    r = RawResponse(servers[name].url, "/v1/messages",
                                    dict(body, stream=kind == "stream"), conn=conns[name],
                                    headers=headers).read_head()
                    r.read_all()
                    times[(name, kind)].append((time.perf_counter() - t0) * 1000.0)
        for (name, kind), values in times.items():
            results[(name, kind)] = (statistics.median(values), percentile(values, 0.99))
    finally:
        for server in servers.values():
            server.stop()
        fake.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    batches, size = (50, 2000) if args.quick else (200, 5000)
    p50, p99 = per_event(batches, size)
    print(f"per event (content_event and the chunk's timing, metrics on - off): "
          f"p50 {p50:.3f} µs, p99 {p99:.3f} µs  (goal: p50 < 20 µs)")
    p50, p99 = per_request(2000 if args.quick else 20000)
    print(f"per request (observe_request, multiprocess mode): p50 {p50:.1f} µs, "
          f"p99 {p99:.1f} µs")
    found = end_to_end(40 if args.quick else 200)
    print("\nend to end, 2 workers, kept-alive, interleaved (ms):")
    print(f"{'request':<28}{'p50 on':>9}{'p50 off':>9}{'on-off':>9}{'p99 on':>9}{'p99 off':>9}")
    for kind, label in (("stream", "stream of 50 events"), ("json", "JSON answer")):
        on, off = found[("on", kind)], found[("off", kind)]
        print(f"{label:<28}{on[0]:9.3f}{off[0]:9.3f}{on[0] - off[0]:+9.3f}{on[1]:9.3f}"
              f"{off[1]:9.3f}")
    stream_on, stream_off = found[("on", "stream")][0], found[("off", "stream")][0]
    print(f"\nper event end to end: {(stream_on - stream_off) / 50 * 1000:+.1f} µs "
          "(the difference of the stream's p50 over its 50 events; noise included)")


if __name__ == "__main__":
    main()
