"""Usage-tracker benchmarks, in one run.

    python tests/benchmarks/bench_tracker.py [--quick]

1. Rows per second the writer sustains: a Tracker on a temporary SQLite file, N UsageRecords
   enqueued from 8 threads, then flush(); rows/s for batch_size 1 and 200, with the queue
   large enough to hold everything, and the writer alone (queue filled before start()). One
   more run with the default queue_max (10000) shows what an enqueue burst does: rows that do
   not fit spill to the JSON-lines file beside the database.
2. Request latency with the tracker on vs off: two gunicorn instances (LLM_PROXY_TRACKER=true
   / false) in front of the same fake upstream; short non-streaming and streaming Anthropic
   requests, interleaved between the instances, sequential on one keep-alive connection each,
   then the same with 8 concurrent client threads. mean/p50/p99 and the on/off ratio.

Loopback only, bounded loops, well under 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ANTHROPIC_BODY, FakeUpstream, ProxyProcess, RawClient, cpu_seconds, machine_load, mean, percentile,
    print_table, process_tree, ratio,
)

from proxy.tracker import Tracker  # noqa: E402
from proxy.usage import UsageRecord  # noqa: E402

PRODUCERS = 8


# ---------------------------------------------------------------------------------------------
# 1. Writer throughput


def make_record(i: int) -> UsageRecord:
    now = time.time()
    return UsageRecord(
        request_id=f"req_{i:012x}", started_at=now - 1.5, ended_at=now, ttfb_ms=120.5,
        ttft_ms=180.25, endpoint="anthropic", model_requested="claude-sonnet-4-5",
        deployment="anthropic", upstream_model="claude-sonnet-4-5-20250929", attempts=1,
        fallbacks=0, status=200, end_reason="complete", stop_reason="end_turn",
        input_tokens=1200, output_tokens=350, cache_read_tokens=800, cache_write_tokens=100,
        reasoning_tokens=0, cost_usd=0.0123, priced=True, usage_complete=True,
        client_key_id="key_0123456789abcdef", bytes_in=2048, bytes_out=8192, error=None,
        stream=True)


def run_writer(db: str, rows: int, batch_size: int, queue_max: int, prefill: bool) -> dict:
    tracker = Tracker(db, batch_size=batch_size, queue_max=queue_max)
    per_thread = rows // PRODUCERS
    total = per_thread * PRODUCERS
    barrier = threading.Barrier(PRODUCERS + 1)

    def produce(k: int) -> None:
        barrier.wait()
        base = k * per_thread
        for i in range(base, base + per_thread):
            tracker.record(make_record(i))

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(PRODUCERS)]
    for t in threads:
        t.start()
    if not prefill:
        tracker.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    t_enq = time.perf_counter() - t0
    if prefill:  # the queue is full of rows before the writer exists: the writer alone
        t0 = time.perf_counter()
        tracker.start()
    ok = tracker.flush(300)
    t_all = time.perf_counter() - t0
    stats = tracker.stats()
    tracker.close()
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]
    conn.close()
    spill = db + ".spill.jsonl"
    spilled_lines = sum(1 for _ in open(spill)) if os.path.exists(spill) else 0
    return {"total": total, "t_enq": t_enq, "t_all": t_all, "ok": ok, "stats": stats,
            "stored": stored, "spilled_lines": spilled_lines}


def bench_writer(tmp: Path, rows: int, rows_batch1: int) -> list[str]:
    configs = [
        ("batch 1, 8 producers", rows_batch1, 1, rows_batch1 + 1, False),
        ("batch 200, 8 producers", rows, 200, rows + 1, False),
        ("batch 1, writer alone", rows_batch1, 1, rows_batch1 + 1, True),
        ("batch 200, writer alone", rows, 200, rows + 1, True),
        ("batch 200, 8 producers, queue_max 10000 (default)", rows, 200, 10000, False),
    ]
    out, problems = [], []
    for i, (label, n, bs, qmax, prefill) in enumerate(configs):
        r = run_writer(str(tmp / f"writer-{i}.db"), n, bs, qmax, prefill)
        s = r["stats"]
        written = s["written"]
        avg_batch = written / s["batches"] if s["batches"] else float("nan")
        enq = "" if prefill else f"{r['total'] / r['t_enq']:.0f}"
        out.append([label, r["total"], enq, f"{written / r['t_all']:.0f}", f"{r['t_all']:.2f}",
                    f"{avg_batch:.1f}", r["stored"], s["spilled"]])
        if r["stored"] + s["spilled"] != r["total"] or not (r["ok"] or s["spilled"]):
            problems.append(f"{label}: stored {r['stored']} + spilled {s['spilled']} != {r['total']}"
                            f" (flush ok={r['ok']})")
        if s["spilled"] != r["spilled_lines"]:
            problems.append(f"{label}: spilled counter {s['spilled']} but {r['spilled_lines']} lines on disk")
    by = {row[0]: float(row[3]) for row in out}
    note = (f"batch 200 vs batch 1 rows/s: x{ratio(by['batch 200, 8 producers'], by['batch 1, 8 producers']):.1f}"
            f" with producers, x{ratio(by['batch 200, writer alone'], by['batch 1, writer alone']):.1f}"
            " writer alone.\nrows/s = rows committed / (first enqueue -> flush() returned); "
            "writer alone: start() -> flush().\nSQLite WAL, synchronous=NORMAL, temp dir "
            f"{tmp}; record() never blocks: a full queue spills to <db>.spill.jsonl.")
    if problems:
        note += "\nproblems: " + "; ".join(problems)
    print_table("1. Tracker writer throughput (one Tracker, one writer thread, SQLite file)",
                ["config", "rows", "enqueue/s", "committed rows/s", "seconds", "avg batch",
                 "rows in db", "spilled"], out, note=note)
    return problems


# ---------------------------------------------------------------------------------------------
# 2. Request latency, tracker on vs off


def _request(client: RawClient, body: dict) -> float:
    ex = client.post("/v1/messages", body, keep_blocks=False)
    if ex.status != 200:
        raise RuntimeError(f"status {ex.status}")
    return (ex.t_end - ex.t_sent) / 1e6


def bench_on_off(fake: FakeUpstream, tmp: Path, n: int, conc_threads: int, conc_n: int,
                 warmup: int = 50) -> list[str]:
    common = dict(LLM_PROXY_HEARTBEAT_INTERVAL="15", LLM_PROXY_IDLE_TIMEOUT="60")
    on = ProxyProcess(fake.url, tmp, workers=1, threads=32, LLM_PROXY_TRACKER="true", **common).start()
    off = ProxyProcess(fake.url, tmp, workers=1, threads=32, LLM_PROXY_TRACKER="false", **common).start()
    kinds = {"non-streaming": dict(ANTHROPIC_BODY), "streaming": dict(ANTHROPIC_BODY, stream=True)}
    problems = []
    try:
        procs = {"on": on, "off": off}

        def cpu_now() -> dict:
            return {m: cpu_seconds(process_tree(p.proc.pid)) for m, p in procs.items()}

        # -- sequential, interleaved: on/off alternate (order flipped every round) ------------
        clients = {"on": RawClient(on.port), "off": RawClient(off.port)}
        cpu0 = cpu_now()
        seq = {(k, m): [] for k in kinds for m in clients}
        sent = {"on": 0, "off": 0}
        half = n // 2
        for i in range(warmup + half):
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            for kind, body in kinds.items():
                for mode in order:
                    ms = _request(clients[mode], body)
                    sent[mode] += 1
                    if i >= warmup:
                        seq[(kind, mode)].append(ms)
        for c in clients.values():
            c.close()
        cpu1 = cpu_now()
        seq_sent = dict(sent)

        # -- concurrent: conc_threads clients, each alternating on/off ----------------------
        conc = {(k, m): [] for k in kinds for m in ("on", "off")}
        lock = threading.Lock()
        errors = []

        def worker(k: int) -> None:
            cl = {"on": RawClient(on.port), "off": RawClient(off.port)}
            local = {key: [] for key in conc}
            count = {"on": 0, "off": 0}
            try:
                for i in range(conc_n // 2):
                    order = ("on", "off") if (i + k) % 2 == 0 else ("off", "on")
                    for kind, body in kinds.items():
                        for mode in order:
                            local[(kind, mode)].append(_request(cl[mode], body))
                            count[mode] += 1
            except Exception as exc:  # report, don't hang
                errors.append(repr(exc))
            finally:
                for c in cl.values():
                    c.close()
                with lock:
                    for key, v in local.items():
                        conc[key] += v
                    sent["on"] += count["on"]
                    sent["off"] += count["off"]

        t0 = time.perf_counter()
        ths = [threading.Thread(target=worker, args=(k,)) for k in range(conc_threads)]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        conc_wall = time.perf_counter() - t0
        cpu2 = cpu_now()
        conc_sent = {m: sent[m] - seq_sent[m] for m in sent}
        problems += [f"concurrent client: {e}" for e in errors[:3]]

        # -- usage rows really written by "on", none by "off" -------------------------------
        on.flush()
        rows_on = len(on.rows())
        rows_off = len(off.rows()) if os.path.exists(off.db_path) else 0
        if rows_on != sent["on"]:
            problems.append(f"tracker on: {rows_on} rows for {sent['on']} requests")
        if rows_off:
            problems.append(f"tracker off wrote {rows_off} rows")
    finally:
        on.stop()
        off.stop()

    def rows_for(data):
        out, worst = [], 0.0
        for kind in kinds:
            a, b = data[(kind, "on")], data[(kind, "off")]
            for stat, fn in (("mean", mean), ("p50", lambda v: percentile(v, 50)),
                             ("p99", lambda v: percentile(v, 99))):
                r = ratio(fn(a), fn(b))
                if stat != "p99":
                    worst = max(worst, abs(r - 1))
                out.append([f"{kind} {stat}", fn(b), fn(a), fn(a) - fn(b), r])
        return out, worst

    def cpu_note(a: dict, b: dict, count: dict) -> str:
        us = {m: 1e6 * (b[m] - a[m]) / max(count[m], 1) for m in a}
        return (f"gunicorn CPU per request (user+sys, all threads): off {us['off']:.0f} us, "
                f"on {us['on']:.0f} us (on/off {ratio(us['on'], us['off']):.3f})")

    rows, worst = rows_for(seq)
    print_table(f"2a. Request latency, tracker on vs off, sequential interleaved "
                f"({len(seq[('streaming', 'on')])} + {len(seq[('non-streaming', 'on')])} requests "
                f"per instance after {warmup * 2} warm-up; 1 worker each; send -> last body byte), ms",
                ["request", "off ms", "on ms", "on - off ms", "on/off"], rows,
                note=f"target: on/off within 5 % (mean and p50) -> {'PASS' if worst <= 0.05 else 'FAIL'}"
                     f" (worst {worst * 100:.1f} %)\n" + cpu_note(cpu0, cpu1, seq_sent))
    rows, worst = rows_for(conc)
    total = sum(len(v) for v in conc.values())
    print_table(f"2b. Same, {conc_threads} concurrent client threads each alternating on/off "
                f"({total} requests in {conc_wall:.1f} s, {total / conc_wall:.0f} req/s overall), ms",
                ["request", "off ms", "on ms", "on - off ms", "on/off"], rows,
                note=f"on/off within 5 % (mean and p50) -> {'PASS' if worst <= 0.05 else 'FAIL'} "
                     f"(worst {worst * 100:.1f} %)\n" + cpu_note(cpu1, cpu2, conc_sent)
                     + f"\nusage rows: tracker on {rows_on} for "
                     f"{sent['on']} requests; tracker off {rows_off}"
                     + ("\nproblems: " + "; ".join(problems) if problems else ""))
    return problems


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rows-batch1", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per instance")
    ap.add_argument("--conc-threads", type=int, default=8)
    ap.add_argument("--conc-requests", type=int, default=250, help="per client thread and instance")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: writer,latency")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.rows_batch1, args.requests, args.conc_requests = 20_000, 5_000, 400, 50
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.monotonic()
    print(f"bench_tracker: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"sqlite {sqlite3.sqlite_version}")
    print(machine_load())
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-tracker-") as d:
        tmp = Path(d)
        if "writer" not in skip:
            problems += bench_writer(tmp, args.rows, args.rows_batch1)
        if "latency" not in skip:
            fake = FakeUpstream().start()
            try:
                problems += bench_on_off(fake, tmp, args.requests, args.conc_threads, args.conc_requests)
            finally:
                fake.stop()
            if fake.errors:
                problems.append(f"fake upstream errors: {fake.errors[:3]}")
    print(f"\n{machine_load()} (at the end)")
    print(f"\ntotal time {time.monotonic() - t0:.1f} s")
    for p in problems[:10]:
        print("problem:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
