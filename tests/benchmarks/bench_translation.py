"""Translation benchmark: what translating a stream adds per event, against passing the same
upstream stream through, and against direct access, in one run.

    python tests/benchmarks/bench_translation.py [--quick]

For each upstream format the fake upstream sends N text deltas a few ms apart, each carrying
its own send time in its text (time.perf_counter_ns; one machine, one clock).  Three paths
read the same script, interleaved stream by stream so drift hits them alike:

- direct: the client reads the fake upstream itself;
- pass-through: the proxy relays it to a client of the same format;
- translated: the proxy relays it to a client of the other format (a Chat stream becomes
  Anthropic events, an Anthropic stream becomes Chat chunks).

A raw-socket client stamps the recv that completes each event.  Reported: p50/p90/p99 of
(arrival - sent) per path, the proxy's added latency, and translation's own cost
(translated - pass-through).  Target: translation adds <= 0.1 ms per event at p50.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    BLOCK_START, BLOCK_STOP, MESSAGE_DELTA, MESSAGE_START, MESSAGE_STOP, SSE_HEADERS, End,
    FakeUpstream, ProxyProcess, RawClient, Sleep, Status, machine_load, mean, percentile,
    print_table, Send,
)

NS_PER_MS = 1e6
STAMP = re.compile(rb"seq=(\d+) t=(\d+)")
TARGET_MS = 0.1
CHAT_START = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
              b'"model":"bench-upstream","choices":[{"index":0,"delta":{"role":"assistant",'
              b'"content":""},"finish_reason":null}]}\n\n')
CHAT_END = (b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
            b'"model":"bench-upstream","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
            b'"model":"bench-upstream","choices":[],"usage":{"prompt_tokens":10,'
            b'"completion_tokens":20,"total_tokens":30}}\n\n'
            b'data: [DONE]\n\n')
MESSAGES = [{"role": "user", "content": "hi"}]


class TimedChatChunk:
    """A Chat content chunk whose text carries the send time."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def run(self, ex) -> None:
        ex.ensure_status()
        ex.send_body(b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,'
                     b'"model":"bench-upstream","choices":[{"index":0,"delta":{"content":'
                     b'"tok seq=%d t=%d"},"finish_reason":null}]}\n\n' % (self.seq, time.perf_counter_ns()))


class TimedAnthropicDelta:
    """An Anthropic text delta whose text carries the send time."""

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def run(self, ex) -> None:
        ex.ensure_status()
        ex.send_body(b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                     b'"delta":{"type":"text_delta","text":"tok seq=%d t=%d"}}\n\n'
                     % (self.seq, time.perf_counter_ns()))


def scripts(events: int, gap: float) -> dict[str, list]:
    chat = [Status(200, headers=SSE_HEADERS), Send(CHAT_START)]
    anthropic = [Status(200, headers=SSE_HEADERS), Send(MESSAGE_START), Send(BLOCK_START)]
    for i in range(events):
        chat += [Sleep(gap), TimedChatChunk(i)]
        anthropic += [Sleep(gap), TimedAnthropicDelta(i)]
    chat += [Send(CHAT_END), End()]
    anthropic += [Send(BLOCK_STOP), Send(MESSAGE_DELTA), Send(MESSAGE_STOP), End()]
    return {"timed-chat": chat, "timed-anthropic": anthropic}


def write_config(path: Path, fake: FakeUpstream) -> None:
    path.write_text("\n".join([
        "[providers.local]", f'base_url = "{fake.url}"', 'format = "openai"', "",
        "[providers.claude]", f'base_url = "{fake.url}"', 'format = "anthropic"', "",
        '[routes."bench-on-chat"]', 'deployments = [{ provider = "local", model = "bench-upstream" }]', "",
        '[routes."bench-on-anthropic"]',
        'deployments = [{ provider = "claude", model = "bench-upstream" }]', ""]))


# (path label, client, endpoint, request body) for each upstream format
def paths(fake: FakeUpstream, proxy: ProxyProcess) -> dict[str, list[tuple]]:
    chat_body = {"model": "bench-direct", "stream": True, "messages": MESSAGES}
    anthropic_body = {"model": "bench-direct", "stream": True, "max_tokens": 64, "messages": MESSAGES}
    return {
        "timed-chat": [
            ("direct", fake.port, "/v1/chat/completions", chat_body),
            ("pass-through", proxy.port, "/v1/chat/completions", chat_body),
            ("translated", proxy.port, "/v1/messages", dict(anthropic_body, model="bench-on-chat")),
        ],
        "timed-anthropic": [
            ("direct", fake.port, "/v1/messages", anthropic_body),
            ("pass-through", proxy.port, "/v1/messages", anthropic_body),
            ("translated", proxy.port, "/v1/chat/completions", dict(chat_body, model="bench-on-anthropic")),
        ],
    }


def measure(script: str, routes: list[tuple], events: int, streams: int) -> tuple[dict, list[str]]:
    clients = {label: RawClient(port) for label, port, _, _ in routes}
    samples: dict[str, list[float]] = {label: [] for label, *_ in routes}
    problems = []
    for _ in range(streams):
        for label, _, endpoint, body in routes:
            ex = clients[label].post(endpoint, body, {"x-fake-script": script})
            got = 0
            for t_arr, block in ex.blocks:
                m = STAMP.search(block)
                if m:
                    samples[label].append((t_arr - int(m.group(2))) / NS_PER_MS)
                    got += 1
            ended = any(b"message_stop" in b or b"[DONE]" in b for _, b in ex.blocks)
            if ex.status != 200 or got != events or not ended:
                problems.append(f"{script} {label}: status {ex.status}, {got}/{events} timed events, "
                                f"ended {ended}")
    for client in clients.values():
        client.close()
    return samples, problems


def report(script: str, samples: dict[str, list[float]]) -> float:
    direct, passed, translated = samples["direct"], samples["pass-through"], samples["translated"]
    rows = []
    for label, fn in (("p50", lambda v: percentile(v, 50)), ("p90", lambda v: percentile(v, 90)),
                      ("p99", lambda v: percentile(v, 99)), ("mean", mean)):
        rows.append([label, fn(direct), fn(passed), fn(translated), fn(passed) - fn(direct),
                     fn(translated) - fn(direct), fn(translated) - fn(passed)])
    cost = percentile(translated, 50) - percentile(passed, 50)
    upstream = "Chat" if script == "timed-chat" else "Anthropic"
    client = "Anthropic" if script == "timed-chat" else "Chat"
    print_table(f"{upstream} upstream: ms from the upstream's write to the client's recv, per event "
                f"({len(direct)} events per path)",
                ["", "direct", "pass-through", f"translated ({client} client)", "pass-through added",
                 "translated added", "translation's own"], rows,
                note=f"translation's own cost at p50: {cost:.3f} ms "
                     f"({'ok' if cost <= TARGET_MS else 'FAIL'}: target <= {TARGET_MS} ms)")
    return cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller numbers, for a smoke run")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=3.0)
    ap.add_argument("--streams", type=int, default=6, help="streams per path")
    args = ap.parse_args()
    if args.quick:
        args.events, args.streams = 50, 2
    t0 = time.monotonic()
    print(f"bench_translation: python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(machine_load())
    fake = FakeUpstream().start()
    fake.named.update(scripts(args.events, args.gap_ms / 1000))
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-translation-") as tmp_name:
        tmp = Path(tmp_name)
        write_config(tmp / "proxy.toml", fake)
        proxy = ProxyProcess(fake.url, tmp, workers=2, threads=32, LLM_PROXY_CONFIG=str(tmp / "proxy.toml"),
                             LLM_PROXY_HEARTBEAT_INTERVAL="15", LLM_PROXY_IDLE_TIMEOUT="60").start()
        try:
            for script, routes in paths(fake, proxy).items():
                samples, found = measure(script, routes, args.events, args.streams)
                problems += found
                report(script, samples)
        finally:
            proxy.stop()
            fake.stop()
    if fake.errors:
        problems.append(f"fake upstream errors ({len(fake.errors)}): {fake.errors[:3]}")
    print(f"\n{machine_load()} (at the end)")
    print(f"total time {time.monotonic() - t0:.1f} s")
    for problem in problems[:10]:
        print("problem:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
