"""SIGTERM under load, run many times: does shutdown keep its promise with the defaults?

Each run: one `TickingUpstream` (tests/support/load.py) serving endless Anthropic streams,
one event (a ~2 KB text delta) per stream every 100 ms; the proxy as deployed (2 workers x
256 threads, the default `stream.shutdown_grace` of 20 s and the graceful_timeout that
follows from it) carrying 200 of them, read by one thread that decodes every event as an
SDK would; one core kept busy by another process.  Once every stream has content, SIGTERM
goes to the master.  A run passes when every stream ends with exactly one terminal
`overloaded_error` and a clean chunked end, the master exits 0 without killing a worker,
and the database holds one `shutdown` row per stream with nothing left in the spill
directory.

    python tests/benchmarks/bench_shutdown.py                 # 10 runs, defaults (~4 min)
    python tests/benchmarks/bench_shutdown.py --runs 3 --grace 1 --no-busy
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _common  # noqa: E402,F401  (puts tests/ and the repository on sys.path)
from support import load  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--grace", type=float, default=None,
                        help="stream.shutdown_grace (default: the proxy's default, 20 s)")
    parser.add_argument("--no-busy", action="store_true", help="do not keep a core busy")
    args = parser.parse_args()
    print(f"{args.runs} runs: {args.streams} streams at 10 events/s, grace "
          f"{'default' if args.grace is None else args.grace}, "
          f"{'no busy core' if args.no_busy else 'one core kept busy'}")
    print(f"{'run':>3}  {'ok':>3}  {'exit':>4}  {'rows':>4}  {'spill':>5}  {'ends after SIGTERM (s)':>26}  "
          f"{'exited (s)':>10}  problems")
    failures = 0
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as tmp:
            r = load.sigterm_under_load(Path(tmp), streams=args.streams, grace=args.grace,
                                             busy=not args.no_busy)
        ended = r["ended_after"]
        ok = (not r["problems"] and r["exit_code"] == 0 and not r["killed"]
              and r["shutdown_rows"] == args.streams and r["spilled"] == 0)
        failures += not ok
        spread = f"{ended[0]:.2f} / {ended[len(ended) // 2]:.2f} / {ended[-1]:.2f}" if ended else "-"
        print(f"{run:>3}  {'yes' if ok else 'NO':>3}  {r['exit_code']:>4}  {r['shutdown_rows']:>4}  "
              f"{r['spilled']:>5}  {spread:>26}  {r['exited_after']:>10.2f}  "
              f"{len(r['problems'])} {r['problems'][:2]}")
    print(f"{args.runs - failures} of {args.runs} runs kept the promise "
          "(ends: min / median / max seconds after SIGTERM)")
    return 1 if failures else 0


if __name__ == "__main__":
    started = time.monotonic()
    status = main()
    print(f"took {time.monotonic() - started:.0f} s")
    raise SystemExit(status)
