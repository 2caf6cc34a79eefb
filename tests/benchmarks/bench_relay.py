"""Relay benchmarks: the proxy vs direct access to the same fake upstream, in one run.

    python tests/benchmarks/bench_relay.py [--quick]

1. Added latency per event: the upstream sends N deltas a few ms apart, each carrying its own
   send time (time.perf_counter_ns, same machine so same clock); a raw-socket client stamps
   the recv that completes each event. p50/p99 of (arrival - sent), direct vs proxied.
2. Added time to first byte: sequential streaming requests on one keep-alive connection,
   upstream answers at once; request sent -> first body byte (and -> response head, -> end).
3. Concurrent silent streams: one gunicorn (2 workers x 300 threads, heartbeat 1 s) holding
   500 streams whose upstream sends one event and goes silent for ~10 s; keepalives per
   stream, interval stats, RSS and CPU of the gunicorn processes; then the upstream is
   released and every stream must end cleanly (message_stop + chunked terminator, one
   `complete` usage row each).

Everything is on loopback; loops are bounded; the whole run takes well under 3 minutes.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    ANTHROPIC_BODY, BLOCK_START, BLOCK_STOP, FIRST_DELTA, MESSAGE_DELTA, MESSAGE_START,
    MESSAGE_STOP, SSE_HEADERS, STAMP_RE, BENCH_HEADERS, End, FakeUpstream, ProxyProcess, RawClient,
    ResponseParser, Send, Sleep, Splitter, Status, TEXT_STAMP_RE, TimedDelta,
    WaitForPipe, build_request,
    cpu_seconds, machine_load, is_comment, mean, percentile, print_table, process_tree, raise_nofile, ratio,
    rss_kb, thread_count,
)

NS_PER_MS = 1e6


# ---------------------------------------------------------------------------------------------
# 1. Added latency per event


def bench_event_latency(fake: FakeUpstream, proxy: ProxyProcess, events: int, gap: float,
                        streams: int, translated_model: str | None = None,
                        through: str = "the proxy") -> dict:
    """Pass-through: the same Anthropic request to the fake and through the proxy.
    With `translated_model` (a route of the proxy to an Anthropic deployment), the proxied
    client speaks OpenAI chat instead: each event is translated on the way."""
    stamp = TEXT_STAMP_RE if translated_model else STAMP_RE
    script = [Status(200, headers=SSE_HEADERS), Send(MESSAGE_START), Send(BLOCK_START)]
    for i in range(events):
        script += [Sleep(gap), TimedDelta(i, in_text=translated_model is not None)]
    script += [Send(BLOCK_STOP), Send(MESSAGE_DELTA), Send(MESSAGE_STOP), End()]
    fake.named["timed"] = script
    body = dict(ANTHROPIC_BODY, stream=True)
    hdr = {"x-fake-script": "timed"}
    requests_by_path = {"direct": ("/v1/messages", body), "proxy": ("/v1/messages", body)}
    if translated_model:
        requests_by_path["proxy"] = ("/v1/chat/completions", {
            "model": translated_model, "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": "hi"}]})
    clients = {"direct": RawClient(fake.port), "proxy": RawClient(proxy.port)}
    samples: dict[str, list[float]] = {"direct": [], "proxy": []}
    problems: list[str] = []
    for _ in range(streams):  # interleaved, so drift hits both paths alike
        for name, client in clients.items():
            path, payload = requests_by_path[name]
            ex = client.post(path, payload, hdr)
            got = 0
            for t_arr, block in ex.blocks:
                m = stamp.search(block)
                if m:
                    samples[name].append((t_arr - int(m.group(2))) / NS_PER_MS)
                    got += 1
            ended = any(b"message_stop" in b or b"[DONE]" in b for _, b in ex.blocks)
            if ex.status != 200 or got != events or not ended:
                problems.append(f"{name}: status {ex.status}, {got}/{events} timed events")
    for c in clients.values():
        c.close()
    d, p = samples["direct"], samples["proxy"]
    rows = []
    for label, fn in (("p50", lambda v: percentile(v, 50)), ("p90", lambda v: percentile(v, 90)),
                      ("p99", lambda v: percentile(v, 99)), ("mean", mean),
                      ("max", lambda v: max(v) if v else float("nan"))):
        rows.append([label, fn(d), fn(p), fn(p) - fn(d), ratio(fn(p), fn(d))])
    kind = "translated (OpenAI chat client, Anthropic upstream)" if translated_model else "pass-through"
    print_table(
        f"1. Per-event latency through {through}, {kind}, upstream send -> client recv, ms "
        f"({len(d)} direct / {len(p)} proxied samples; {streams} streams x {events} events "
        f"each, {gap * 1000:.0f} ms apart; heartbeat 15 s)",
        ["stat", "direct ms", "proxy ms", "added ms", "proxy/direct"], rows,
        note="problems: " + "; ".join(problems[:5]) if problems else None)
    return {"added_p50": percentile(p, 50) - percentile(d, 50),
            "added_p99": percentile(p, 99) - percentile(d, 99), "problems": problems}


# ---------------------------------------------------------------------------------------------
# 2. Added time to first byte


def bench_ttfb(fake: FakeUpstream, proxy: ProxyProcess, n: int, warmup: int = 20) -> dict:
    body = dict(ANTHROPIC_BODY, stream=True)  # no script: the fake's default Anthropic stream
    clients = {"direct": RawClient(fake.port), "proxy": RawClient(proxy.port)}
    res = {k: {"head": [], "first": [], "total": []} for k in clients}
    problems = []
    for i in range(warmup + n):
        for name, client in clients.items():
            ex = client.post("/v1/messages", body, keep_blocks=True)
            if ex.status != 200 or not any(b"message_stop" in b for _, b in ex.blocks):
                problems.append(f"{name}: status {ex.status}")
            if i < warmup:
                continue
            r = res[name]
            r["head"].append((ex.t_head - ex.t_sent) / NS_PER_MS)
            r["first"].append((ex.t_first_body - ex.t_sent) / NS_PER_MS)
            r["total"].append((ex.t_end - ex.t_sent) / NS_PER_MS)
    floor = [clients["proxy"].get_ms("/health") for _ in range(warmup + n)][warmup:]
    for c in clients.values():
        c.close()
    rows = []
    for metric, label in (("head", "to response head"), ("first", "to first body byte"),
                          ("total", "to end of stream")):
        for stat, q in (("p50", 50), ("p99", 99)):
            d, p = percentile(res["direct"][metric], q), percentile(res["proxy"][metric], q)
            rows.append([f"{label} {stat}", d, p, p - d, ratio(p, d)])
    rows.append(["gunicorn floor: GET /health p50 (no upstream)", float("nan"), percentile(floor, 50),
                 float("nan"), float("nan")])
    added = percentile(res["proxy"]["first"], 50) - percentile(res["direct"]["first"], 50)
    print_table(
        f"2. Time to first byte, sequential streaming requests on one keep-alive connection, ms "
        f"({n} each, after {warmup} warm-up; upstream answers at once)",
        ["stat", "direct ms", "proxy ms", "added ms", "proxy/direct"], rows,
        note=f"target (the performance issue): added TTFB p50 <= 1 ms -> {'PASS' if added <= 1 else 'FAIL'}"
             + ("\nproblems: " + "; ".join(problems[:5]) if problems else ""))
    return {"added_ttfb_p50": added, "problems": problems}


# ---------------------------------------------------------------------------------------------
# 3. Concurrent silent streams


class Stream:
    __slots__ = ("i", "sock", "parser", "sse", "status", "t_conn", "t_first", "keepalives",
                 "events", "message_stop", "error_event", "done", "closed_early", "sent", "err",
                 "t_done")

    def __init__(self, i: int) -> None:
        self.i = i
        self.sock: socket.socket | None = None
        self.parser = ResponseParser()
        self.sse = Splitter()
        self.status = None
        self.t_conn = 0.0
        self.t_first = None  # first event (the upstream's one-shot burst) received
        self.keepalives: list[float] = []
        self.events = 0
        self.message_stop = False
        self.error_event = False
        self.done = False
        self.t_done = None
        self.closed_early = False
        self.sent = False
        self.err = None


def bench_silent_streams(fake: FakeUpstream, tmp: Path, n_streams: int, silent: float,
                         heartbeat: float, workers: int, threads: int,
                         app: str | None = None, pythonpath: tuple[str, ...] = ()) -> dict:
    """`app` (a module:callable on `pythonpath`) serves the streams instead of the proxy,
    under the same gunicorn settings: a floor to compare the proxy with."""
    r_fd, w_fd = os.pipe()
    fake.named["silent"] = [
        Status(200, headers=SSE_HEADERS),
        Send(MESSAGE_START + BLOCK_START + FIRST_DELTA),  # one write, then silence
        WaitForPipe(r_fd, timeout=silent + 60),
        Send(BLOCK_STOP), Send(MESSAGE_DELTA), Send(MESSAGE_STOP), End(),
    ]
    served_by = {"app": app, "pythonpath": pythonpath} if app else {}
    proxy = ProxyProcess(fake.url, tmp, workers=workers, threads=threads, **served_by,
                         LLM_PROXY_HEARTBEAT_INTERVAL=str(heartbeat),
                         LLM_PROXY_IDLE_TIMEOUT=str(silent + 60)).start()
    master = proxy.proc.pid
    time.sleep(0.5)
    pids0 = process_tree(master)
    rss_idle = rss_kb(pids0)
    threads_idle = thread_count(pids0)
    me = [os.getpid()]

    sel = selectors.DefaultSelector()
    streams = [Stream(i) for i in range(n_streams)]
    req = build_request("POST", "/v1/messages", f"127.0.0.1:{proxy.port}", dict(ANTHROPIC_BODY, stream=True),
                        {**BENCH_HEADERS, "x-fake-script": "silent"})
    clock = time.monotonic

    def open_stream(s: Stream) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        s.sock = sock
        s.t_conn = clock()
        rc = sock.connect_ex(("127.0.0.1", proxy.port))
        if rc not in (0, errno.EINPROGRESS):
            s.err = f"connect: {os.strerror(rc)}"
            sock.close()
            return
        sel.register(sock, selectors.EVENT_WRITE, s)

    def on_ready(s: Stream, mask: int) -> None:
        if not s.sent:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                s.err = f"connect: {os.strerror(err)}"
                sel.unregister(s.sock)
                s.sock.close()
                return
            s.sock.sendall(req)  # a few hundred bytes into an empty send buffer
            s.sent = True
            sel.modify(s.sock, selectors.EVENT_READ, s)
            return
        try:
            data = s.sock.recv(65536)
        except OSError as exc:
            data, s.err = b"", f"recv: {exc}"
        now = clock()
        if not data:
            s.closed_early = not s.parser.done
            sel.unregister(s.sock)
            s.sock.close()
            return
        blocks = [block for piece in s.parser.feed(data) for block in s.sse.feed(piece)]
        s.status = s.parser.status
        for block in blocks:
            if is_comment(block):
                s.keepalives.append(now)
                continue
            s.events += 1
            if s.t_first is None:
                s.t_first = now
            if block.startswith(b"event: message_stop"):
                s.message_stop = True
            elif block.startswith(b"event: error"):
                s.error_event = True
        if s.parser.done and not s.done:
            s.done = True
            s.t_done = now
            sel.unregister(s.sock)
            s.sock.close()

    def pump(until: float, stop_when=None) -> None:
        while clock() < until:
            for key, mask in sel.select(timeout=min(0.05, max(0.0, until - clock()))):
                on_ready(key.data, mask)
            if stop_when is not None and stop_when():
                return

    # ramp up: 10 new streams every 20 ms
    t_ramp = clock()
    cpu0 = cpu_seconds(process_tree(master))
    for start in range(0, n_streams, 10):
        for s in streams[start:start + 10]:
            open_stream(s)
        pump(clock() + 0.02)
    pump(clock() + 30, stop_when=lambda: all(s.t_first is not None or s.err or s.closed_early
                                             for s in streams))
    t_est = clock()
    ramp_s = t_est - t_ramp
    cpu_ramp = cpu_seconds(process_tree(master)) - cpu0
    established = sum(1 for s in streams if s.t_first is not None)

    # the silent window
    pids = process_tree(master)
    cpu_a, me_a, t_a = cpu_seconds(pids), cpu_seconds(me), clock()
    rss_samples = []
    window_end = t_est + silent
    while clock() < window_end:
        pump(min(window_end, clock() + 1.0))
        rss_samples.append(rss_kb(process_tree(master)))
    pids = process_tree(master)
    cpu_b, me_b, t_b = cpu_seconds(pids), cpu_seconds(me), clock()
    rss_peak = max(rss_samples) if rss_samples else rss_kb(pids)
    threads_busy = thread_count(pids)
    fake_threads = threading.active_count()
    workers_fds = {p: len(os.listdir(f"/proc/{p}/fd")) for p in pids if p != master}

    # release the upstream: every silent connection sends the rest of the answer
    t_release = clock()
    os.write(w_fd, b"go")
    # streams gunicorn queued without a thread only start now: wait for them too (bounded)
    pump(t_release + 30, stop_when=lambda: all(s.done or s.err or s.closed_early for s in streams))
    t_finish = clock()
    for s in streams:
        if s.sock is not None and not s.done and s.sock.fileno() != -1:
            try:
                sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            s.sock.close()
    sel.close()

    # stop the proxy (drains the usage queues), then read the rows
    proxy.stop()
    os.close(r_fd)
    os.close(w_fd)
    end_reasons: dict[str, int] = {}
    try:
        if app:
            raise sqlite3.Error(f"none: {app} keeps no accounts")
        conn = sqlite3.connect(proxy.db_path)
        for reason, count in conn.execute("SELECT end_reason, COUNT(*) FROM usage_records GROUP BY 1"):
            end_reasons[reason] = count
        conn.close()
    except sqlite3.Error as exc:
        end_reasons["<db error>"] = str(exc)

    # keepalive statistics, over each stream's silent phase (first event .. release)
    need = max(1, int(silent / heartbeat) - 1)
    held = [s for s in streams if s.t_first is not None and s.t_first < t_release]
    late = sum(1 for s in streams if s.t_first is not None and s.t_first >= t_release)
    per_stream = [sum(1 for t in s.keepalives if t <= t_release) for s in held]
    intervals, first_gaps = [], []
    for s in held:
        ka = [t for t in s.keepalives if t <= t_release]
        if ka:
            first_gaps.append(ka[0] - s.t_first)
        intervals += [b - a for a, b in zip(ka, ka[1:])]
    enough = sum(1 for c in per_stream if c >= need)
    clean = sum(1 for s in streams if s.done and s.status == 200 and s.message_stop
                and not s.error_event and s.events == 6)
    finish_times = [s.t_done - t_release for s in streams if s.t_done is not None]
    errors = [f"#{s.i}: {s.err}" for s in streams if s.err]
    early = sum(1 for s in streams if s.closed_early)
    non200 = {}
    for s in streams:
        if s.status not in (200, None):
            non200[s.status] = non200.get(s.status, 0) + 1
    window = t_b - t_a

    rows = [
        ["streams opened", n_streams, ""],
        ["established (HTTP 200 + first event)", established,
         f"all within {ramp_s:.2f} s of the first connect" if established == n_streams else
         f"gave up waiting after {ramp_s:.2f} s; {late} more only got their first byte after the "
         "release (queued in gunicorn without a thread)"],
        [f"received >= {need} keepalives while silent", enough, f"silence >= {silent:.0f} s per stream"],
        ["keepalives per stream min / p50 / max",
         f"{min(per_stream, default=0)} / {percentile(per_stream, 50):.0f} / {max(per_stream, default=0)}", ""],
        ["first keepalive after event p50 / max s",
         f"{percentile(first_gaps, 50):.3f} / {max(first_gaps, default=float('nan')):.3f}",
         f"heartbeat {heartbeat:g} s"],
        ["keepalive interval p50 / p99 / max s",
         f"{percentile(intervals, 50):.3f} / {percentile(intervals, 99):.3f} / "
         f"{max(intervals, default=float('nan')):.3f}", f"min {min(intervals, default=float('nan')):.3f}"],
        ["ended cleanly after release", clean, "200, message_stop, chunked end, no error event"],
        ["release -> all ended s",
         f"{max(finish_times, default=float('nan')):.3f}", f"p50 {percentile(finish_times, 50):.3f}"],
        ["closed early / connect errors / non-200", f"{early} / {len(errors)} / {non200 or 0}",
         "; ".join(errors[:3])],
        ["usage rows by end_reason", str(end_reasons), "read after SIGTERM drained the workers"],
        [f"gunicorn RSS idle -> {established} streams MiB",
         f"{rss_idle / 1024:.1f} -> {rss_peak / 1024:.1f}",
         f"{(rss_peak - rss_idle) / max(established, 1):.0f} KiB per stream; {len(pids)} processes"],
        ["gunicorn threads idle -> busy", f"{threads_idle} -> {threads_busy}",
         f"fds per worker {sorted(workers_fds.values())}"],
        ["gunicorn CPU while silent, % of 1 core", f"{100 * (cpu_b - cpu_a) / window:.1f}",
         f"{cpu_b - cpu_a:.2f} s CPU in {window:.1f} s (keepalives + client probes)"],
        ["gunicorn CPU during ramp-up s", f"{cpu_ramp:.2f}", f"{n_streams} requests in {ramp_s:.2f} s"],
        ["bench process CPU while silent, % of 1 core", f"{100 * (me_b - me_a) / window:.1f}",
         f"clients + fake upstream ({fake_threads} threads)"],
    ]
    print_table(
        f"3. {n_streams} concurrent silent streams through {app or 'the proxy'} under one gunicorn "
        f"({workers} workers x {threads} threads, heartbeat {heartbeat:g} s, ~{silent:.0f} s silence)",
        ["measure", "value", "notes"], rows)
    return {"established": established, "enough": enough, "clean": clean, "end_reasons": end_reasons,
            "log": proxy.log(),
            "rss_kib_per_stream": (rss_peak - rss_idle) / max(established, 1),
            "cpu_pct_silent": 100 * (cpu_b - cpu_a) / window,
            # the longest silence a client saw: after the event, or between two keepalives
            "max_keepalive_gap": max(intervals + first_gaps, default=float("nan"))}


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=3.0)
    ap.add_argument("--streams", type=int, default=6, help="latency streams per path")
    ap.add_argument("--ttfb", type=int, default=200)
    ap.add_argument("--silent-streams", type=int, default=500)
    ap.add_argument("--silent-seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=300)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency,ttfb,silent")
    args = ap.parse_args()
    if args.quick:
        args.streams, args.ttfb, args.silent_streams, args.silent_seconds = 2, 50, 50, 4.0
    skip = set(filter(None, args.skip.split(",")))

    nofile = raise_nofile(8192)
    t0 = time.monotonic()
    print(f"bench_relay: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"RLIMIT_NOFILE {nofile[0]}")
    print(machine_load())
    fake = FakeUpstream().start()
    tmp_dir = tempfile.TemporaryDirectory(prefix="bench-relay-")
    tmp = Path(tmp_dir.name)
    failures = []
    try:
        if not {"latency", "ttfb"} <= skip:
            proxy = ProxyProcess(fake.url, tmp, workers=2, threads=32,
                                 LLM_PROXY_HEARTBEAT_INTERVAL="15",
                                 LLM_PROXY_IDLE_TIMEOUT="60").start()
            try:
                if "latency" not in skip:
                    r = bench_event_latency(fake, proxy, args.events, args.gap_ms / 1000, args.streams)
                    failures += r["problems"]
                if "ttfb" not in skip:
                    r = bench_ttfb(fake, proxy, args.ttfb)
                    failures += r["problems"]
            finally:
                proxy.stop()
        if "silent" not in skip:
            r = bench_silent_streams(fake, tmp, args.silent_streams, args.silent_seconds, 1.0,
                                     args.workers, args.threads)
            if r["clean"] != args.silent_streams:
                failures.append(f"silent streams: {r['clean']}/{args.silent_streams} ended cleanly")
            bad = [ln for ln in r["log"].splitlines() if "Traceback" in ln or " ERROR " in ln
                   or "CRITICAL" in ln or "WORKER TIMEOUT" in ln]
            if bad:
                print("\ngunicorn log, errors seen during the silent-streams run:")
                for ln in bad[:20]:
                    print("  " + ln)
    finally:
        fake.stop()
        tmp_dir.cleanup()
    if fake.errors:
        print(f"\nfake upstream errors ({len(fake.errors)}): {fake.errors[:3]}")
    print(f"\n{machine_load()} (at the end)")
    print(f"\ntotal time {time.monotonic() - t0:.1f} s")
    for f in failures[:10]:
        print("problem:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
