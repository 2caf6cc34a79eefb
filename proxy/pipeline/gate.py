"""Gate (part of admit): who is asking, may they use this model, can their key take one
more request.  In `open` mode every request passes (the client's own provider key pays);
in `keys` mode:

1. `identify`, before the body is read: a proxy key in `x-api-key` or `Authorization:
   Bearer` (where each SDK already sends its key), known (401) and live (403).
2. `check_model`: the key's allowlist, on the model name the client sent (403).
3. `reserve`, once the route is known: for a key with limits, one transaction that checks
   its parallel requests, RPM, TPM (429 with Retry-After) and budget (402) and reserves
   the request's worst-case cost.  The hold is settled to the real cost when the request's
   row is finished (`RequestRecord` calls it), before its last byte reaches the client.

A refusal is a ProxyError: the app records the row (end reason `rejected`, no cost) and
answers in the endpoint's own error shape; nothing goes upstream.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ..errors import Forbidden, LimitsUnavailable, Unauthenticated
from ..keys.ledger import KeyBook, Ledger
from ..keys.policy import KEY_PREFIX, ClientKey, input_estimate, worst_case_cost
from ..pricing import PriceTable
from ..redact import request_credentials
from ..store import StoreFault
from ..usage import UsageRecord
from .request import ProxyRequest

log = logging.getLogger("proxy.keys")

# Where the APIs put the most output a request may produce (Messages, Chat, Responses).
MAX_OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
TOKEN_KINDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@dataclass(frozen=True)
class GateDeps:
    keys_mode: bool
    book: KeyBook | None
    ledger: Ledger | None
    prices: PriceTable
    reserve_output_tokens: int
    max_continuations: int


class Hold:
    """A request's reservation, settled once when its row is finished.  `prompt_usd` and
    `prompt_tokens` are the reservation's input side (one call's worth)."""

    def __init__(self, ledger: Ledger, request_id: str, amount: float, prompt_usd: float = 0.0,
                 prompt_tokens: int = 0) -> None:
        self.ledger = ledger
        self.request_id = request_id
        self.amount = amount
        self.prompt_usd = prompt_usd
        self.prompt_tokens = prompt_tokens

    def settle(self, row: UsageRecord) -> None:
        """What the request cost, as far as anyone can know; never raises.

        - the real cost and every token the provider counts, for a complete answer;
        - an answer cut short (a client that hung up, a timeout, a broken stream) that had
          begun: what its row knows (at least the output that reached the client) plus, if
          the provider had not reported the input yet (OpenAI reports usage last), the
          prompt's estimate: the provider bills a prompt it has begun to answer;
        - tokens used at no known price: the whole reservation;
        - a replayed or joined answer (`paid_by`): nothing (another request paid).
        """
        if row.paid_by:
            self.ledger.settle(self.request_id, 0.0, 0)
            return
        tokens = sum(getattr(row, kind) or 0 for kind in TOKEN_KINDS)
        cost = row.cost_usd if row.priced and row.cost_usd is not None else (
            self.amount if tokens else 0.0)
        if row.ttft_ms is not None and row.input_tokens is None:
            cost, tokens = cost + self.prompt_usd, tokens + self.prompt_tokens
        self.ledger.settle(self.request_id, cost, tokens)


class Gate:
    def __init__(self, deps: GateDeps) -> None:
        self.deps = deps

    def identify(self, headers: Mapping[str, str]) -> ClientKey | None:
        """The proxy key a request carries (None in open mode), or the refusal (401); a
        known key may still be revoked or expired (`check_live`)."""
        if not self.deps.keys_mode:
            return None
        presented = [c for c in request_credentials(headers) if c.startswith(KEY_PREFIX)]
        if not presented:
            raise Unauthenticated("this proxy needs a proxy key (sk-llmp-...) in x-api-key or "
                                  "Authorization: Bearer; ask its operator for one")
        try:
            key = self.deps.book.lookup(presented[0])
        except StoreFault as fault:
            raise LimitsUnavailable(f"the proxy cannot read its keys right now ({fault.kind}); "
                                    "retry shortly") from None
        if key is None:
            raise Unauthenticated("unknown proxy key")
        return key

    def live_key(self, headers: Mapping[str, str]) -> ClientKey | None:
        """The live proxy key a request carries, or None (never raises): who may read what
        of the proxy's own endpoints."""
        try:
            key = self.identify(headers)
            if key is not None:
                self.check_live(key, time.time())
        except (Unauthenticated, Forbidden):
            return None
        return key

    @staticmethod
    def check_live(key: ClientKey, now: float) -> None:
        state = key.state(now)
        if state != "active":
            raise Forbidden(f"key {key.name!r} is {state}")

    @staticmethod
    def check_model(key: ClientKey | None, model: str | None) -> None:
        if key is not None and not key.allows(model):
            raise Forbidden(f"key {key.name!r} may not use model {model!r} (allowed: "
                            f"{', '.join(key.models)})")

    def reserve(self, key: ClientKey | None, preq: ProxyRequest, payload: Mapping | None,
                billed: bool) -> Hold | None:
        """Admit `preq` against its key's limits, reserving its worst-case cost when the key
        has a budget and the endpoint bills; None for a key without limits."""
        if key is None or not key.limited:
            return None
        amount, prompt_usd, prompt_tokens = (
            self._worst_case(key, preq, payload) if billed and key.budget_usd is not None
            else (0.0, 0.0, 0))
        try:
            current, refused = self.deps.ledger.admit(key, preq.request_id, amount)
        except StoreFault as fault:
            log.error("key %r: its limits cannot be checked (%s): %s", key.name, fault.kind,
                      fault.detail)
            raise LimitsUnavailable("the proxy cannot check this key's limits right now; "
                                    "retry shortly") from None
        if current is None:
            raise Unauthenticated("unknown proxy key")
        if refused is not None:
            raise refused
        return Hold(self.deps.ledger, preq.request_id, amount, prompt_usd, prompt_tokens)

    def _worst_case(self, key: ClientKey, preq: ProxyRequest, payload: Mapping | None
                    ) -> tuple[float, float, int]:
        """(USD, and its prompt side: USD and tokens of one call's input): the input
        estimate plus the output cap, at the dearest deployment of the route, for every
        call the answer may take (a stream that may be continued makes up to
        1 + max_continuations calls, each with the prompt and up to max_tokens)."""
        cap = self.deps.reserve_output_tokens
        asked = [v for v in (payload.get(f) for f in MAX_OUTPUT_FIELDS) if isinstance(v, int)
                 and not isinstance(v, bool) and v > 0] if payload else []
        output = min(max(asked), cap) if asked else cap
        models = [d.model or preq.model for d in preq.route.deployments]
        prices = [self.deps.prices.price_for(m) for m in models]
        calls = 1 + self.deps.max_continuations if preq.stitch is not None else 1
        prompt = input_estimate(len(preq.body))
        cost = worst_case_cost(prompt, output, prices, calls)
        if cost is None:
            unpriced = [m for m, p in zip(models, prices) if p is None]
            raise Forbidden(f"key {key.name!r} has a budget, and model {unpriced[0]!r} has no "
                            "price, so its cost cannot be bounded; the operator can add it "
                            "under [prices]")
        return cost, worst_case_cost(prompt, 0, prices), prompt


# -- model lists ---------------------------------------------------------------------------------

def only_allowed_models(key: ClientKey | None, respond: Callable[[Callable], Iterable[bytes]],
                        start_response: Callable) -> Iterable[bytes]:
    """`GET /v1/models` for a key with an allowlist: the upstream's list, read whole (it is
    small), with only the models the key may use."""
    if key is None or not key.models:
        return respond(start_response)
    captured: list = []
    answer = respond(lambda status, headers, exc_info=None: captured.extend((status, headers)))
    try:
        body = b"".join(answer)
    finally:
        close = getattr(answer, "close", None)
        if close is not None:
            close()
    status, headers = captured
    if status.startswith("200"):
        body = allowed_models_body(body, key)
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    start_response(status, headers + [("Content-Length", str(len(body)))])
    return [body]


def allowed_models_body(body: bytes, key: ClientKey) -> bytes:
    """A model list (Anthropic's or OpenAI's: `data`, a list of objects with an `id`) with
    the key's models only; Anthropic's `first_id`/`last_id` follow.  A body of another shape
    lists nothing the key could be refused, so it becomes an empty list."""
    try:
        listing = json.loads(body)
    except ValueError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        return b'{"data": []}'
    kept = [m for m in listing["data"] if isinstance(m, dict) and key.allows(m.get("id"))]
    listing["data"] = kept
    for field, index in (("first_id", 0), ("last_id", -1)):
        if field in listing:
            listing[field] = kept[index]["id"] if kept else None
    return json.dumps(listing).encode("utf-8")
