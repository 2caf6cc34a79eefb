"""Close to the wire: every figure of the performance issue in one run, so that the ratios
between direct access, the proxy, nginx as a proxy and gunicorn's own floor are measured
side by side on the same (shared, noisy) machine.

    python tests/benchmarks/bench_all.py [--quick] [--skip event,request,ttfb,throughput,streams]

1. Per event: added latency of an SSE event, proxy vs direct and nginx-as-proxy vs direct
   (bench_relay's timed deltas).
2. Per request: a non-streaming request on a kept-alive connection, direct, through the
   proxy and through nginx; p50 and p99.
3. Time to first byte of a stream, proxy vs direct (bench_relay).
4. Throughput: wrk (2 threads x 32 connections) against gunicorn's floor (a trivial WSGI
   app under the proxy's own settings), the smallest relay the design card allows (the same
   settings, one urllib3 call per request and nothing else), the default proxy (2 workers,
   rows, metrics and admission on) in front of a static upstream (nginx answering JSON), and
   nginx as a proxy to the same upstream.
5. Concurrent silent streams with the default settings: how many a host holds, RSS per
   stream, CPU while silent, the largest gap between keepalives (bench_relay); then the same
   streams through the smallest relay the design card allows (gthread + urllib3, nothing
   else), whose RSS per stream is the floor for the proxy's.

It ends with one table of the issue's goals and where the proxy stands.  wrk comes from
Debian (`apt-get install wrk`); nginx is the one the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_relay  # noqa: E402
from _common import (  # noqa: E402
    ANTHROPIC_BODY, FakeUpstream, ProxyProcess, RawConnection, RawResponse, free_port,
    machine_load, percentile, print_table, raise_nofile,
)

from support.nginx import NGINX, NginxProcess  # noqa: E402

from proxy import gunicorn_conf  # noqa: E402

# `llm-proxy serve`'s own defaults (LLM_PROXY_WORKERS / LLM_PROXY_THREADS change them)
DEFAULT_WORKERS, DEFAULT_THREADS = gunicorn_conf.workers, gunicorn_conf.threads

HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "sk-bench"}
ANSWER = {"id": "msg_static", "type": "message", "role": "assistant", "model": "claude-sonnet-5",
          "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn",
          "stop_sequence": None,
          "usage": {"input_tokens": 25, "output_tokens": 15, "cache_read_input_tokens": 10,
                    "cache_creation_input_tokens": 5}}

# A route whose clients speak OpenAI chat and whose deployment is Anthropic's API: each
# event is translated on its way.
TRANSLATED_MODEL = "gpt-on-claude"
TRANSLATED_ROUTE = f"""
[routes."{TRANSLATED_MODEL}"]
deployments = [{{ provider = "anthropic", model = "claude-bench" }}]
"""

FLOOR_APP = '''
def application(environ, start_response):
    """gunicorn's floor: the smallest answer a WSGI app can give."""
    body = b'{"ok":true}'
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''

# The smallest relay of a stream the design card allows: a gthread thread reads the upstream
# through urllib3 and writes each piece as it comes (no accounting, keepalives or checks).
# Its RSS per silent stream is the floor the proxy's is measured against.
FLOOR_RELAY_APP = '''
import http
import json
import os

import urllib3

UPSTREAM = os.environ["LLM_PROXY_ANTHROPIC_BASE_URL"]
POOL = urllib3.PoolManager(maxsize=4096)


def application(environ, start_response):
    if environ["PATH_INFO"] == "/health":
        body = json.dumps({"status": "ok"}).encode()
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    upstream = POOL.request(
        "POST", UPSTREAM + environ["PATH_INFO"], body=environ["wsgi.input"].read(),
        headers={"content-type": "application/json",
                 "x-fake-script": environ.get("HTTP_X_FAKE_SCRIPT", "")},
        preload_content=False, timeout=urllib3.Timeout(connect=5, read=None))
    start_response(f"{upstream.status} {http.HTTPStatus(upstream.status).phrase}",
                   [("Content-Type", upstream.headers.get("content-type", "text/event-stream"))])

    def relay():
        try:
            while piece := upstream.read1(65536):
                yield piece
        finally:
            upstream.release_conn()
    return relay()
'''

STATIC_UPSTREAM = """
worker_processes 1;
daemon off;
pid {dir}/static.pid;
error_log {dir}/static-error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/sb; proxy_temp_path {dir}/sp; fastcgi_temp_path {dir}/sf;
    uwsgi_temp_path {dir}/su; scgi_temp_path {dir}/ss;
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            default_type application/json;
            return 200 '{answer}';
        }}
    }}
}}
"""


# ---------------------------------------------------------------------------------------------
# Helpers


class StaticUpstream:
    """nginx answering every request with one JSON message: an upstream that costs nothing,
    so that throughput measures the proxy, not the fake."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (tmp / "static.conf").write_text(STATIC_UPSTREAM.format(
            dir=tmp, port=self.port, answer=json.dumps(ANSWER, separators=(",", ":"))))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "StaticUpstream":
        self.proc = subprocess.Popen([NGINX, "-p", f"{self.dir}/", "-c", str(self.dir / "static.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                RawResponse(self.url, "/", method="GET").read_head().read_all()
                return self
            except OSError:
                time.sleep(0.05)  # waiting for nginx to bind: no event to wait on
        raise RuntimeError("the static upstream did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def wrk(url: str, path: str, seconds: float, post: dict | None = None) -> dict:
    """Requests per second (and latency percentiles) of `wrk -t2 -c32`."""
    script = None
    args = ["wrk", "-t2", "-c32", f"-d{seconds:g}s", "--latency"]
    if post is not None:
        fd, script = tempfile.mkstemp(suffix=".lua")
        body = json.dumps(post).replace("\\", "\\\\").replace("'", "\\'")
        with os.fdopen(fd, "w") as f:
            f.write(f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
                    "wrk.headers['Content-Type'] = 'application/json'\n"
                    + "".join(f"wrk.headers['{k}'] = '{v}'\n" for k, v in HEADERS.items()))
        args += ["-s", script]
    try:
        out = subprocess.run(args + [url + path], capture_output=True, text=True, timeout=seconds + 30)
    finally:
        if script:
            os.unlink(script)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out.stdout)
    socket_errors = re.search(r"Socket errors: (.*)", out.stdout)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out.stdout)
    return {"rps": float(rate.group(1)) if rate else 0.0,
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else "",
            "p50_ms": _ms(p50) if p50 else float("nan"), "raw": out.stdout}


def _ms(match) -> float:
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


# ---------------------------------------------------------------------------------------------
# 2. Per request


def bench_requests(targets: dict[str, str], n: int) -> dict:
    """Sequential non-streaming requests on one kept-alive connection per target,
    interleaved; request sent -> whole answer, ms."""
    body = dict(ANTHROPIC_BODY, stream=False)
    conns = {name: RawConnection(url) for name, url in targets.items()}
    times: dict[str, list[float]] = {name: [] for name in targets}
    for i in range(n + 20):
        for name, url in targets.items():
            began = time.perf_counter()
            r = RawResponse(url, "/v1/messages", body, conn=conns[name], headers=HEADERS).read_head()
            r.read_all()
            if i >= 20:  # warm-up
                times[name].append((time.perf_counter() - began) * 1000)
    rows = []
    for name, values in times.items():
        rows.append([name, percentile(values, 50), percentile(values, 99),
                     percentile(values, 50) - percentile(times["direct"], 50)])
    print_table(f"2. A non-streaming request on a kept-alive connection, ms ({n} each, "
                "interleaved, after 20 warm-up)", ["path", "p50", "p99", "added p50"], rows)
    return {name: percentile(values, 50) - percentile(times["direct"], 50)
            for name, values in times.items()}


# ---------------------------------------------------------------------------------------------
# 4. Throughput


def bench_throughput(tmp: Path, seconds: float) -> dict:
    (tmp / "static").mkdir()
    static = StaticUpstream(tmp / "static").start()
    floor_dir = tmp / "floor"
    floor_dir.mkdir()
    (floor_dir / "floor_app.py").write_text(FLOOR_APP)
    (floor_dir / "floor_relay.py").write_text(FLOOR_RELAY_APP)
    servers = []
    try:
        floor = ProxyProcess(static.url, floor_dir, workers=DEFAULT_WORKERS, threads=DEFAULT_THREADS,
                             app="floor_app:application", pythonpath=(str(floor_dir),)).start()
        servers.append(floor)
        relay_dir = tmp / "floor-relay"
        relay_dir.mkdir()
        relay = ProxyProcess(static.url, relay_dir, workers=DEFAULT_WORKERS, threads=DEFAULT_THREADS,
                             app="floor_relay:application", pythonpath=(str(floor_dir),)).start()
        servers.append(relay)
        proxy_dir = tmp / "proxy"
        proxy_dir.mkdir()
        proxy = ProxyProcess(static.url, proxy_dir, workers=DEFAULT_WORKERS,
                             threads=DEFAULT_THREADS).start()
        servers.append(proxy)
        nginx_dir = tmp / "nginx-throughput"
        nginx_dir.mkdir()
        nginx = NginxProcess(nginx_dir, f"127.0.0.1:{static.port}", worker_connections=4096).start()
        body = dict(ANTHROPIC_BODY, stream=False)
        found = {"gunicorn floor (trivial WSGI app)": wrk(floor.url, "/", seconds),
                 "smallest relay (a urllib3 call, nothing else)":
                     wrk(relay.url, "/v1/messages", seconds, body),
                 "proxy, default serve (2 workers)": wrk(proxy.url, "/v1/messages", seconds, body),
                 "nginx as a proxy": wrk(nginx.url, "/v1/messages", seconds, body),
                 "static upstream, direct": wrk(static.url, "/v1/messages", seconds, body)}
        nginx.stop()
    finally:
        for server in servers:
            server.stop()
        static.stop()
    floor_rps = found["gunicorn floor (trivial WSGI app)"]["rps"]
    rows = [[name, r["rps"], r["p50_ms"], r["rps"] / floor_rps if floor_rps else float("nan"),
             f"{r['non2xx']} non-2xx {r['socket_errors']}".strip()] for name, r in found.items()]
    print_table(f"4. Throughput, wrk 2 threads x 32 connections, {seconds:g} s each",
                ["server", "req/s", "p50 ms", "/ gunicorn floor", "errors"], rows)
    relay_rps = found["smallest relay (a urllib3 call, nothing else)"]["rps"]
    return {"proxy_vs_floor": found["proxy, default serve (2 workers)"]["rps"] / floor_rps
            if floor_rps else float("nan"),
            "relay_vs_floor": relay_rps / floor_rps if floor_rps else float("nan"),
            "proxy_rps": found["proxy, default serve (2 workers)"]["rps"], "floor_rps": floor_rps}


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    ap.add_argument("--skip", default="", help="comma list: event,request,ttfb,throughput,streams")
    ap.add_argument("--streams", type=int, default=2000, help="silent streams (default settings)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if "throughput" not in skip and not shutil.which("wrk"):
        print("wrk is not installed (apt-get install wrk); skipping throughput")
        skip.add("throughput")
    events, streams, requests, ttfb, seconds, silent = (
        (60, 2, 100, 50, 3.0, 4.0) if args.quick else (200, 6, 300, 200, 10.0, 20.0))
    raise_nofile(8192)
    print(f"bench_all: python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {machine_load()}")
    t0 = time.monotonic()
    fake = FakeUpstream().start()
    tmp_dir = tempfile.TemporaryDirectory(prefix="bench-all-")
    tmp = Path(tmp_dir.name)
    summary: dict[str, object] = {}
    try:
        (tmp / "routes.toml").write_text(TRANSLATED_ROUTE)
        proxy = ProxyProcess(fake.url, tmp, workers=2, threads=32,
                             LLM_PROXY_CONFIG=str(tmp / "routes.toml"),
                             LLM_PROXY_HEARTBEAT_INTERVAL="15", LLM_PROXY_IDLE_TIMEOUT="60").start()
        (tmp / "nginx").mkdir()
        nginx = NginxProcess(tmp / "nginx", f"127.0.0.1:{fake.port}").start()
        try:
            if "event" not in skip:
                summary["event_proxy"] = bench_relay.bench_event_latency(
                    fake, proxy, events, 0.003, streams)
                summary["event_translated"] = bench_relay.bench_event_latency(
                    fake, proxy, events, 0.003, streams, translated_model=TRANSLATED_MODEL)
                summary["event_nginx"] = bench_relay.bench_event_latency(
                    fake, nginx, events, 0.003, streams, through="nginx (the reference)")
            if "request" not in skip:
                summary["request"] = bench_requests(
                    {"direct": fake.url, "proxy": proxy.url, "nginx": nginx.url}, requests)
            if "ttfb" not in skip:
                summary["ttfb"] = bench_relay.bench_ttfb(fake, proxy, ttfb)
        finally:
            proxy.stop()
            nginx.stop()
        if "throughput" not in skip:
            summary["throughput"] = bench_throughput(tmp, seconds)
        if "streams" not in skip:
            n = 200 if args.quick else args.streams
            (tmp / "streams").mkdir()
            heartbeat = 1.0 if args.quick else 15.0
            summary["streams"] = bench_relay.bench_silent_streams(
                fake, tmp / "streams", n, silent, heartbeat,
                DEFAULT_WORKERS, DEFAULT_THREADS)
            summary["streams"].update(n=n, heartbeat=heartbeat)
            (tmp / "streams-floor").mkdir()
            (tmp / "streams-floor" / "floor_relay.py").write_text(FLOOR_RELAY_APP)
            summary["streams_floor"] = bench_relay.bench_silent_streams(
                fake, tmp / "streams-floor", n, silent, heartbeat, DEFAULT_WORKERS,
                DEFAULT_THREADS, app="floor_relay:application",
                pythonpath=(str(tmp / "streams-floor"),))
    finally:
        fake.stop()
        tmp_dir.cleanup()
    print_goals(summary)
    print(f"\n{machine_load()} (at the end); total time {time.monotonic() - t0:.1f} s")
    return 0


def print_goals(summary: dict) -> None:
    rows = []
    if "event_proxy" in summary:
        proxy, nginx = summary["event_proxy"], summary["event_nginx"]
        rows.append(["per event, added p50 ms", "<= 0.12", proxy["added_p50"], nginx["added_p50"]])
        rows.append(["per event, added p99 ms", "<= 0.5", proxy["added_p99"], nginx["added_p99"]])
    if "event_translated" in summary:
        translated = summary["event_translated"]
        rows.append(["per event translated, added p50 ms", "<= 0.12", translated["added_p50"], ""])
        rows.append(["per event translated, added p99 ms", "<= 0.5", translated["added_p99"], ""])
    if "request" in summary:
        rows.append(["per request, added p50 ms (kept alive)", "<= 0.8",
                     summary["request"]["proxy"], summary["request"]["nginx"]])
    if "ttfb" in summary:
        rows.append(["stream TTFB, added p50 ms", "<= 1", summary["ttfb"]["added_ttfb_p50"], ""])
    if "throughput" in summary:
        t = summary["throughput"]
        rows.append(["throughput / gunicorn floor", ">= 0.60", t["proxy_vs_floor"],
                     f"{t['proxy_rps']:.0f} vs {t['floor_rps']:.0f} req/s; the smallest "
                     f"relay {t['relay_vs_floor']:.2f}"])
    if "streams" in summary:
        s = summary["streams"]
        rows.append([f"silent streams held at once, of {s['n']} (default settings)", "all",
                     s["established"], f"{s['clean']} ended cleanly in the end"])
        floor = summary.get("streams_floor")
        rows.append(["RSS per stream KiB", "<= 48", s["rss_kib_per_stream"],
                     f"floor: the smallest relay {floor['rss_kib_per_stream']:.1f}" if floor else ""])
        rows.append(["CPU while silent, % of one core", "< 5", s["cpu_pct_silent"], ""])
        rows.append([f"largest keepalive gap s (heartbeat {s['heartbeat']:g} s)",
                     f"<= {2 * s['heartbeat']:g}", s["max_keepalive_gap"], ""])
    print_table("Goals of the performance issue, measured in this run",
                ["measure", "goal", "proxy", "reference"], rows)


if __name__ == "__main__":
    sys.exit(main())
