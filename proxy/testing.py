"""The proxy inside a test suite: served in-process on a loopback port, rows one call away.

`llm_proxy` and `llm_canned_upstream` (the pytest fixtures in `proxy.pytest_plugin`) are
built from these; they work without pytest too:

    with ServedProxy(create_app({"providers": {...}})) as proxy:
        ...  # point an SDK at proxy.url
        rows = proxy.rows()  # flushes the usage queue first

`CannedUpstream` answers Anthropic Messages and OpenAI Chat Completions requests with one
fixed answer and fixed usage, streamed or not, exactly as those APIs frame them, so a test
can check what the proxy records without a real provider.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from .app import App
from .usage import UsageRecord


class _Served:
    """A WSGI app on 127.0.0.1 (a free port), served by werkzeug's threaded server in a
    background thread: real HTTP, sockets and all, so keepalives and hang-ups work."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        self.wsgi_app = app
        self.server = make_server(host, port, app, threaded=True)
        self.url = f"http://{host}:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                        name=f"serve-{self.server.server_port}")
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServedProxy(_Served):
    """A proxy app served in-process; `rows` and `row` flush the usage queue first.
    `wsgi_app` serves something that contains the proxy instead (the proxy mounted under
    a prefix of another application, say)."""

    def __init__(self, app: App, wsgi_app=None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(wsgi_app or app, host, port)
        self.app = app

    def flush(self, timeout: float = 5.0) -> bool:
        return self.app.flush(timeout)

    def rows(self, request_id: str | None = None, *, timeout: float = 5.0) -> list[UsageRecord]:
        """Every stored row (or `request_id`'s), once the requests so far are recorded."""
        if not self.flush(timeout):
            raise AssertionError(f"the usage rows were not all stored within {timeout:g} s "
                                 f"(a request still running, or the database refusing rows)")
        return self.app.rows(request_id)

    def wait_for_rows(self, count: int, timeout: float = 5.0) -> list[UsageRecord]:
        """The stored rows once there are at least `count`: for requests that end after
        their client does (a hang-up is recorded when the stream thread notices it)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.rows(timeout=max(deadline - time.monotonic(), 0.1))
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} usage rows after {timeout:g} s, not {count}")
            time.sleep(0.01)  # the row comes from another thread, which signals nothing

    def row(self, request_id: str, *, timeout: float = 5.0) -> UsageRecord:
        found = self.rows(request_id, timeout=timeout)
        if len(found) != 1:
            raise AssertionError(f"{len(found)} usage rows for {request_id}")
        return found[0]

    def stop(self, timeout: float = 5.0) -> None:
        super().stop()
        self.app.close(timeout)


class CannedUpstream(_Served):
    """A stand-in provider: every Messages or Chat Completions request gets `text` as the
    answer with `input_tokens` and `output_tokens` as its usage, as JSON or as the API's
    event stream.  `requests` holds the JSON bodies it received."""

    def __init__(self, text: str = "Hello from the canned upstream.", input_tokens: int = 10,
                 output_tokens: int = 5, model: str | None = None) -> None:
        self.text, self.input_tokens, self.output_tokens = text, input_tokens, output_tokens
        self.model = model
        self.requests: list[dict] = []
        super().__init__(self._wsgi)

    def _wsgi(self, environ, start_response) -> Iterable[bytes]:
        request = Request(environ)
        body = request.get_json(silent=True) or {}
        self.requests.append(body)
        model = self.model or body.get("model") or "canned-model"
        if request.path == "/v1/messages":
            response = self._anthropic(model, bool(body.get("stream")))
        elif request.path == "/v1/chat/completions":
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            response = self._chat(model, bool(body.get("stream")), usage)
        else:
            response = Response(json.dumps({"error": {"message": f"no {request.path} here",
                                                      "type": "not_found_error"}}), 404,
                                content_type="application/json")
        return response(environ, start_response)

    # -- Anthropic Messages (protocols.md §2) ------------------------------------------
    def _anthropic(self, model: str, stream: bool) -> Response:
        message = {"id": "msg_canned", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": self.text}], "stop_reason": "end_turn",
                   "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}}
        if not stream:
            return Response(json.dumps(message), content_type="application/json")
        start = dict(message, content=[], stop_reason=None,
                     usage={"input_tokens": self.input_tokens, "output_tokens": 1})
        events = [
            ("message_start", {"type": "message_start", "message": start}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": self.text}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": self.output_tokens}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        return _event_stream(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)

    # -- OpenAI Chat Completions (protocols.md §3) ---------------------------------------
    def _chat(self, model: str, stream: bool, include_usage: bool) -> Response:
        created = int(time.time())
        usage = {"prompt_tokens": self.input_tokens, "completion_tokens": self.output_tokens,
                 "total_tokens": self.input_tokens + self.output_tokens}
        if not stream:
            return Response(json.dumps({
                "id": "chatcmpl-canned", "object": "chat.completion", "created": created,
                "model": model, "usage": usage,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": self.text}}]}),
                content_type="application/json")

        def chunk(delta: dict, finish: str | None) -> dict:
            return {"id": "chatcmpl-canned", "object": "chat.completion.chunk",
                    "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        chunks: list[Any] = [chunk({"role": "assistant", "content": ""}, None),
                             chunk({"content": self.text}, None), chunk({}, "stop")]
        if include_usage:
            chunks.append({"id": "chatcmpl-canned", "object": "chat.completion.chunk",
                           "created": created, "model": model, "choices": [], "usage": usage})
        return _event_stream([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"])


def _event_stream(events: Iterable[str]) -> Response:
    return Response((event.encode("utf-8") for event in events),
                    content_type="text/event-stream; charset=utf-8")
