"""Dedup benchmark: what dedup costs a request on the hot path, for 200 KB request bodies.

    python tests/benchmarks/bench_dedup.py [--quick]

1. In process, the hot path itself: the key a request gets at admission (its shape) and the
   two lookups a miss makes (this worker's kept answers, then the usage store that the other
   workers write theirs to, here holding --kept answers of other requests), for distinct
   200 KB bodies, in µs per request.  Also shown, for scale: the full canonical digest that
   only a shape match pays, and a replay hit.  Target: the miss path <= 200 µs at p50.
2. End to end, one run: non-streaming 200 KB requests (each body distinct: every one a miss)
   on a kept-alive connection, direct to the fake upstream, and through two proxies that
   differ only in dedup (replay window 10 s vs 0, which turns dedup off), interleaved
   request by request.  Reported: p50/p90 of each, dedup's added time (on - off) and the
   ratios.  A loaded machine blurs differences of tenths of a millisecond: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    FakeUpstream, ProxyProcess, RawClient, machine_load, percentile, print_table,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy.dedup.answers import AnswerCache, StoredAnswer, StoredAnswers  # noqa: E402
from proxy.dedup.key import DedupKey, request_key  # noqa: E402
from proxy.store import open_store  # noqa: E402
from support.builders import anthropic_message  # noqa: E402
from support.steps import json_reply  # noqa: E402

TARGET_US = 200.0
BODY_BYTES = 200 * 1024


def body_of(n: int) -> dict:
    """A 200 KB Messages request: a long conversation whose last turn is `n`'s own."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 1000 + f" turn {i}"}
             for i in range(199)]
    turns.append({"role": "user", "content": f"question number {n} " + "y" * 900})
    return {"model": "claude-bench", "max_tokens": 256, "messages": turns}


def answer_for(key: DedupKey, n: int) -> StoredAnswer:
    now = time.time()
    return StoredAnswer(key, True, "anthropic", "text/event-stream", 200, b"event: x\ndata: {}\n\n" * 200,
                        f"req_{n}", usage={"cost_usd": 0.01, "priced": True},
                        ended_at=now, expires_at=now + 600)


def bench_hot_path(n: int, kept: int) -> tuple[list[list], float]:
    """(table rows, the miss path's p50 in µs)."""
    tmp = tempfile.mkdtemp(prefix="bench-dedup-")
    db = os.path.join(tmp, "usage.db")
    writer = open_store(db)
    writer.put_answers([answer_for(DedupKey.known(f"{i:032x}", f"{i:064x}", True, ""), i).to_row()
                        for i in range(kept)], time.time())
    writer.close()
    cache = AnswerCache(64 << 20)
    for i in range(200):  # this worker's own kept answers, none of them the ones asked for
        cache.put(answer_for(DedupKey.known(f"{i:031x}f", f"{i:064x}", True, ""), i))
    stored = StoredAnswers(lambda: open_store(db))
    bodies = [(json.dumps(body_of(i)).encode(), body_of(i)) for i in range(n)]
    assert all(len(raw) >= BODY_BYTES * 0.95 for raw, _ in bodies)
    shape_us, miss_us, digest_us, hit_us = [], [], [], []
    for raw, payload in bodies:
        t0 = time.perf_counter_ns()
        key = request_key("key_bench", "anthropic", payload, raw, False, False, None)
        t1 = time.perf_counter_ns()
        now = time.time()
        found = cache.find(key, now) or stored.find(key, now)
        t2 = time.perf_counter_ns()
        assert found is None
        shape_us.append((t1 - t0) / 1e3)
        miss_us.append((t2 - t0) / 1e3)
        t3 = time.perf_counter_ns()
        key.digest()
        digest_us.append((time.perf_counter_ns() - t3) / 1e3)
    # A hit: the kept answer of the same request (digests on both sides, then the match).
    for raw, payload in bodies[: max(5, n // 10)]:
        kept_key = request_key("key_bench", "anthropic", payload, raw, False, False, None)
        hits = AnswerCache(64 << 20)
        hits.put(answer_for(kept_key, 0))
        kept_key.digest()
        t0 = time.perf_counter_ns()
        key = request_key("key_bench", "anthropic", payload, raw, False, False, None)
        assert hits.find(key, time.time()) is not None
        hit_us.append((time.perf_counter_ns() - t0) / 1e3)
    stored.close()
    rows = []
    for label, values in (("key (shape) at admission", shape_us),
                          ("miss: key + local LRU + store lookup", miss_us),
                          ("digest of the body (only on a shape match)", digest_us),
                          ("replay hit: key + digest + match", hit_us)):
        rows.append([label, len(values), percentile(values, 50), percentile(values, 90),
                     percentile(values, 99)])
    return rows, percentile(miss_us, 50)


def bench_end_to_end(n: int) -> tuple[list[list], list[str]]:
    fake = FakeUpstream().start()
    reply = anthropic_message("ok", model="claude-bench")
    fake.named["plain"] = json_reply(reply)
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-e2e-"))
    common = dict(workers=1, threads=32, LLM_PROXY_LOG_LEVEL="WARNING")
    on = ProxyProcess(fake.url, tmp, LLM_PROXY_REPLAY_WINDOW="10", **common).start()
    off = ProxyProcess(fake.url, tmp, LLM_PROXY_REPLAY_WINDOW="0", **common).start()
    problems: list[str] = []
    times: dict[str, list[float]] = {"direct": [], "dedup on": [], "dedup off": []}
    clients = {"direct": RawClient(fake.url), "dedup on": RawClient(on.port),
               "dedup off": RawClient(off.port)}
    try:
        for i in range(n + 20):
            payload = body_of(10_000 + i)
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                ex = clients[name].post("/v1/messages", payload, {"x-fake-script": "plain"},
                                        keep_blocks=False)
                if ex.status != 200:
                    problems.append(f"{name}: HTTP {ex.status}")
                if i >= 20:  # warm-up first
                    times[name].append((ex.t_end - ex.t_sent) / 1e6)
        duplicate = clients["dedup on"].post("/v1/messages", body_of(10_000 + n + 19),
                                             {"x-fake-script": "plain"}, keep_blocks=False)
        if duplicate.status != 200:
            problems.append(f"the duplicate got HTTP {duplicate.status}")
        if len(fake.requests) != 3 * (n + 20):
            problems.append(f"the upstream got {len(fake.requests)} requests, expected {3 * (n + 20)} "
                            "(the last one, a duplicate, must have been replayed)")
    finally:
        for c in clients.values():
            c.close()
        on.stop()
        off.stop()
        fake.stop()
    p50 = {k: percentile(v, 50) for k, v in times.items()}
    rows = [[name, len(v), percentile(v, 50), percentile(v, 90), p50[name] / p50["direct"]]
            for name, v in times.items()]
    rows.append(["dedup's own cost (on - off)", "", p50["dedup on"] - p50["dedup off"],
                 percentile(times["dedup on"], 90) - percentile(times["dedup off"], 90),
                 p50["dedup on"] / p50["dedup off"]])
    return rows, problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    ap.add_argument("--requests", type=int, default=400, help="requests per path (end to end)")
    ap.add_argument("--keys", type=int, default=400, help="distinct bodies (hot path)")
    ap.add_argument("--kept", type=int, default=20_000, help="answers in the store (hot path)")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.keys, args.kept = 60, 100, 2_000
    print(f"machine: {machine_load()}")
    rows, miss_p50 = bench_hot_path(args.keys, args.kept)
    verdict = "ok" if miss_p50 <= TARGET_US else "FAIL"
    print_table(f"Dedup on the hot path, 200 KB bodies, {args.kept} answers in the store (µs)",
                ["path", "n", "p50 µs", "p90 µs", "p99 µs"], rows,
                note=f"target: the miss path <= {TARGET_US:.0f} µs at p50: {verdict} ({miss_p50:.1f} µs)")
    rows, problems = bench_end_to_end(args.requests)
    print_table("End to end, non-streaming 200 KB requests, kept-alive connection (ms)",
                ["path", "n", "p50 ms", "p90 ms", "ratio to direct (p50)"], rows,
                note="the last row's ratio is dedup on / dedup off")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
