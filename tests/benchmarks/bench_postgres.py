"""PostgreSQL vs SQLite as the usage database, in one run.

    python tests/benchmarks/bench_postgres.py [--quick]

1. Writer throughput: a Tracker on each database, N rows enqueued from 8 threads, then
   flush(); rows/s with the default batch size (200), and with batches of 1 (the writer's
   floor: one transaction a row).
2. Request latency: two gunicorn instances (2 workers) in front of the same fake upstream,
   that differ only in `tracker.db` (a SQLite file, a PostgreSQL URL), short non-streaming
   requests interleaved between them on one kept-alive connection each.  p50/p99 and the
   PostgreSQL/SQLite ratio.  Target: a request no more than 5 % slower at p50 (the rows are
   written off the request's path, so the database should not show).

The PostgreSQL server is the tests' own (tests/support/postgres.py: a cluster in a temporary
directory, fsync off like the SQLite file's synchronous=NORMAL, loopback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import FakeUpstream, ProxyProcess, RawClient, machine_load, percentile, print_table  # noqa: E402
from bench_tracker import make_record  # noqa: E402

from proxy.store import open_store  # noqa: E402
from proxy.tracker import Tracker  # noqa: E402
from support.builders import anthropic_message  # noqa: E402
from support.postgres import PostgresServer  # noqa: E402
from support.steps import json_reply  # noqa: E402

PRODUCERS = 8
TARGET_RATIO = 1.05


def writer_rows_per_s(db: str, rows: int, batch_size: int) -> float:
    tracker = Tracker(db, batch_size=batch_size, queue_max=rows + 10)
    tracker.start()
    started = time.perf_counter()

    def produce(offset: int) -> None:
        for i in range(offset, rows, PRODUCERS):
            tracker.record(make_record(i))

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(PRODUCERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tracker.flush(120), tracker.stats()
    elapsed = time.perf_counter() - started
    tracker.close()
    stored = len(open_store(db).rows())
    assert stored == rows, f"{stored} of {rows} rows stored in {db}"
    return rows / elapsed


def bench_writer(server: PostgresServer, tmp: Path, rows: int, rows_batch1: int) -> None:
    table = []
    for label, batch, n in (("batches of 200", 200, rows), ("batches of 1", 1, rows_batch1)):
        sqlite = writer_rows_per_s(str(tmp / f"w{batch}.db"), n, batch)
        postgres = writer_rows_per_s(server.database(), n, batch)
        table.append([label, n, sqlite, postgres, postgres / sqlite])
    print_table("1. Writer throughput (rows/s), 8 producer threads, then flush()",
                ["batches", "rows", "SQLite", "PostgreSQL", "PostgreSQL / SQLite"], table)


def bench_latency(server: PostgresServer, tmp: Path, n: int) -> bool:
    fake = FakeUpstream()
    fake.start()
    fake.named["plain"] = json_reply(anthropic_message())
    (tmp / "sqlite").mkdir()
    (tmp / "pg").mkdir()
    proxies = {"SQLite": ProxyProcess(fake.url, tmp / "sqlite", workers=2, threads=16).start(),
               "PostgreSQL": ProxyProcess(fake.url, tmp / "pg", workers=2, threads=16,
                                          LLM_PROXY_DB=server.database()).start()}
    clients = {name: RawClient(p.port) for name, p in proxies.items()}
    times: dict[str, list] = {name: [] for name in clients}
    body = {"model": "claude-sonnet-5", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]}
    try:
        for i in range(n + 30):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                ex = clients[name].post("/v1/messages", body, {"x-fake-script": "plain"},
                                        keep_blocks=False)
                assert ex.status == 200, (name, ex.status)
                if i >= 30:
                    times[name].append((ex.t_end - ex.t_sent) / 1e6)
    finally:
        for client in clients.values():
            client.close()
        for proxy in proxies.values():
            proxy.stop()
        fake.stop()
    p = {name: (percentile(v, 50), percentile(v, 99)) for name, v in times.items()}
    ratio = p["PostgreSQL"][0] / p["SQLite"][0]
    ok = ratio <= TARGET_RATIO
    print_table("2. Request latency, non-streaming, kept-alive, interleaved (2 workers each)",
                ["usage database", "requests", "p50 ms", "p99 ms"],
                [[name, len(times[name]), p50, p99] for name, (p50, p99) in p.items()],
                note=f"PostgreSQL / SQLite at p50: {ratio:.3f} (target <= {TARGET_RATIO}) -> "
                     f"{'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows and requests")
    args = parser.parse_args()
    print(f"machine: {machine_load()}")
    directory = tempfile.mkdtemp(prefix="llm-proxy-pg-")
    os.chmod(directory, 0o755)
    server = PostgresServer(Path(directory) / "cluster").start()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    try:
        bench_writer(server, tmp, 5_000 if args.quick else 50_000, 500 if args.quick else 3_000)
        ok = bench_latency(server, tmp, 100 if args.quick else 600)
    finally:
        server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
