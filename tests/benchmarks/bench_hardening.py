"""What the hostile inputs of the hardening issue cost the proxy, measured.

Each part runs a real proxy (gunicorn, the proxy's worker, 1 worker) against the fake
upstream and prints numbers with the same machine's reference beside them:

1. slow clients: 1,000 connections trickling a byte a second (half their head, half their
   body) against a worker of 8 threads; 20 normal requests meanwhile, direct and through
   nginx; their latency next to the same requests without the tricklers;
2. a 1 MiB gzip bomb (1 GiB of zeros), as a JSON answer and as an event stream: status and
   the worker's peak RSS growth;
3. an SSE line that never ends (64 MiB sent): time to the terminal error, RSS growth;
4. four 31 MiB bodies of `{}` at once: status, time, RSS growth;
5. GET /usage over 400,000 distinct client keys: time and bytes, next to the same report
   over 400 keys.

    python tests/benchmarks/bench_hardening.py            # about a minute
    python tests/benchmarks/bench_hardening.py --skip nginx,usage
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sqlite3
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import ProxyProcess, percentile  # noqa: E402
from support.builders import anthropic_stream  # noqa: E402
from support.steps import End, Send, Stall, Status  # noqa: E402
from support.fake import FakeUpstream  # noqa: E402
from support.load import Tricklers  # noqa: E402

import requests  # noqa: E402

MiB = 1024 * 1024
BODY = {"model": "claude-sonnet-4-5", "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]}


def peak_rss(server: ProxyProcess) -> int:
    pid = requests.get(server.url + "/health", timeout=5).json()["pid"]
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_requests(url: str, count: int = 20) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        r = requests.post(url + "/v1/messages", json=BODY, timeout=30)
        times.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200, r.status_code
    return times


def slow_clients(fake: FakeUpstream, tmp: Path, through_nginx: bool) -> None:
    server = ProxyProcess(fake.url, tmp / ("n" if through_nginx else "d"), workers=1, threads=8)
    (tmp / ("n" if through_nginx else "d")).mkdir()
    server.start()
    nginx = None
    try:
        url, port = server.url, server.port
        if through_nginx:
            from support.nginx import NginxProcess
            (tmp / "nginx").mkdir()
            nginx = NginxProcess(tmp / "nginx", f"127.0.0.1:{server.port}", worker_connections=4096).start()
            url, port = nginx.url, nginx.port
        quiet = timed_requests(url)
        tricklers = Tricklers(port, 1000)
        time.sleep(1.5)
        loaded = timed_requests(url)
        tricklers.close()
        where = "through nginx" if through_nginx else "direct"
        print(f"  {where:14s} without tricklers p50 {percentile(quiet, 50):6.1f} ms max "
              f"{max(quiet):6.1f} ms | with 1,000 tricklers p50 {percentile(loaded, 50):6.1f} ms "
              f"max {max(loaded):6.1f} ms")
    finally:
        if nginx is not None:
            nginx.stop()
        server.stop()


def gzip_bomb() -> bytes:
    comp = zlib.compressobj(9, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
    return b"".join(comp.compress(b"\0" * MiB) for _ in range(1024)) + comp.flush()


def bombs(fake: FakeUpstream, tmp: Path) -> None:
    bomb = gzip_bomb()
    server = ProxyProcess(fake.url, tmp, LLM_PROXY_COMMIT_AFTER="5").start()
    try:
        for kind in ("application/json", "text/event-stream"):
            before = peak_rss(server)
            fake.enqueue([Status(200, headers={"Content-Type": kind, "Content-Encoding": "gzip"}),
                          Send(bomb), End()])
            started = time.perf_counter()
            r = requests.post(server.url + "/v1/messages", json=dict(BODY, stream=kind != "application/json"),
                              timeout=60)
            took = time.perf_counter() - started
            print(f"  gzip bomb ({len(bomb) / MiB:.1f} MiB -> 1 GiB) as {kind:18s} status {r.status_code}, "
                  f"{took:.2f} s, worker peak RSS +{(peak_rss(server) - before) / MiB:.0f} MiB")
        before = peak_rss(server)
        fake.enqueue([Status(200, headers={"Content-Type": "text/event-stream"})]
                     + [Send(e) for e in anthropic_stream()[:4]] + [Send(b"data: ")]
                     + [Send(b"x" * MiB)] * 64 + [Stall()])
        started = time.perf_counter()
        r = requests.post(server.url + "/v1/messages", json=dict(BODY, stream=True), timeout=60)
        took = time.perf_counter() - started
        print(f"  endless SSE line (64 MiB sent, 16 MiB limit): terminal error after {took:.2f} s "
              f"({'error' in r.text and 'larger than' in r.text}), worker peak RSS "
              f"+{(peak_rss(server) - before) / MiB:.0f} MiB")
        body = b'{"model": "claude", "pad": [' + b",".join([b"{}"] * 11_000_000) + b"]}"
        before = peak_rss(server)
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: requests.post(
                server.url + "/v1/messages", data=body, timeout=120,
                headers={"content-type": "application/json"}).status_code, range(4)))
        took = time.perf_counter() - started
        print(f"  4 x {len(body) / MiB:.1f} MiB bodies of {{}} at once: statuses {statuses}, "
              f"{took:.2f} s, worker peak RSS +{(peak_rss(server) - before) / MiB:.0f} MiB")
    finally:
        server.stop()


def usage_report(fake: FakeUpstream, tmp: Path) -> None:
    server = ProxyProcess(fake.url, tmp).start()
    try:
        requests.post(server.url + "/v1/messages", json=BODY, timeout=10)
        requests.get(server.url + "/health", params={"flush": "1"}, timeout=10)
        now = time.time()
        conn = sqlite3.connect(server.db_path)
        for keys in (400, 400_000):
            conn.execute("DELETE FROM usage_records")
            conn.executemany(
                "INSERT INTO usage_records (request_id, started_at, client_key_id, endpoint, end_reason,"
                " input_tokens, output_tokens, cost_usd, priced) VALUES (?, ?, ?, 'anthropic', 'complete',"
                " 10, 5, 0.001, 1)", ((f"req_{i}", now - i % 600, f"key_{i}") for i in range(keys)))
            conn.commit()
            started = time.perf_counter()
            r = requests.get(server.url + "/usage", timeout=120)
            took = time.perf_counter() - started
            summary = r.json()
            print(f"  /usage over {keys:>7,} keys: {took:6.2f} s, {len(r.content):>8,} bytes, "
                  f"{len(summary['by_client_key'])} keys listed of {summary['groups']['by_client_key']:,}")
        conn.close()
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", default="", help="comma-separated: slow,nginx,bombs,usage")
    skip = set(filter(None, parser.parse_args().skip.split(",")))
    with FakeUpstream() as fake, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "slow" not in skip:
            print("1. slow clients (1 worker, 8 threads)")
            slow_clients(fake, tmp, through_nginx=False)
            if "nginx" not in skip:
                slow_clients(fake, tmp, through_nginx=True)
        if "bombs" not in skip:
            print("2-4. bombs, endless lines, bodies of {}")
            (tmp / "b").mkdir()
            bombs(fake, tmp / "b")
        if "usage" not in skip:
            print("5. the usage report")
            (tmp / "u").mkdir()
            usage_report(fake, tmp / "u")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
