"""The missed heartbeat, as a regression benchmark: repeated runs of many silent streams
with a short heartbeat, each of which must keep every keepalive gap within twice the
heartbeat and never let gunicorn kill a worker for a missed heartbeat of its own.

    python tests/benchmarks/bench_heartbeat.py [--runs 5] [--streams 1000] [--seconds 20]

Why it exists: under 1,000 silent streams a worker once missed gunicorn's heartbeat
(`WORKER TIMEOUT`, about 490 streams cut) and keepalive gaps reached 24.6 s with a 2 s
heartbeat.  The cause was gunicorn 27's `close_graceful`, which lingered up to 2 s per closing
connection inside the worker's event loop (the loop that also tells the master it is alive);
`proxy/worker.py` lingers without blocking since.  Each run here uses `llm-proxy serve`'s
default workers and threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_relay  # noqa: E402
from _common import FakeUpstream, machine_load, print_table, raise_nofile  # noqa: E402

from proxy import gunicorn_conf  # noqa: E402

HEARTBEAT = 1.0


def one_run(streams: int, seconds: float) -> dict:
    fake = FakeUpstream().start()
    with tempfile.TemporaryDirectory(prefix="bench-heartbeat-") as tmp:
        try:
            found = bench_relay.bench_silent_streams(
                fake, Path(tmp), streams, seconds, HEARTBEAT, gunicorn_conf.workers,
                gunicorn_conf.threads)
        finally:
            fake.stop()
    found["worker_timeouts"] = found["log"].count("WORKER TIMEOUT")
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20.0, help="silence per run")
    args = ap.parse_args()
    raise_nofile(8192)
    print(f"bench_heartbeat: {args.runs} runs of {args.streams} silent streams, heartbeat "
          f"{HEARTBEAT:g} s, {gunicorn_conf.workers} workers x {gunicorn_conf.threads} threads; "
          f"{machine_load()}")
    rows, failed = [], 0
    for run in range(1, args.runs + 1):
        began = time.monotonic()
        r = one_run(args.streams, args.seconds)
        ok = (r["clean"] == args.streams and r["worker_timeouts"] == 0
              and r["max_keepalive_gap"] <= 2 * HEARTBEAT)
        failed += not ok
        rows.append([run, f"{r['clean']}/{args.streams}", r["max_keepalive_gap"],
                     r["worker_timeouts"], r["cpu_pct_silent"], r["rss_kib_per_stream"],
                     f"{time.monotonic() - began:.0f}", "ok" if ok else "FAILED"])
    print_table(f"Missed-heartbeat regression: every gap <= {2 * HEARTBEAT:g} s, no worker killed",
                ["run", "ended cleanly", "largest gap s", "WORKER TIMEOUT", "CPU % silent",
                 "RSS KiB/stream", "run s", "verdict"], rows)
    print(f"\n{machine_load()} (at the end)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
