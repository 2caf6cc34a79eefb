"""`llm-proxy keys`: create, list, show, update, rotate and revoke client keys.

A new (or rotated) key is printed once, alone on stdout, so `KEY=$(llm-proxy keys create
--name ci)` works; everything else goes to stderr.  Nothing here ever prints a stored
digest: `list` and `show` identify a key by name, id and the hint of its last characters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace

from ..redact import installation_secret
from ..store import StoreFault
from .policy import (PERIODS, ClientKey, hint_of, key_digest, new_key_id, new_secret,
                     parse_models, period_end, period_start)
from .pgstore import open_key_store
from .store import KeyStore

CLEAR = "none"  # `--rpm none`: take the limit away


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    create = sub.add_parser("create", help="make a key; it is printed once")
    create.add_argument("--name", required=True, help="who or what the key is for (unique)")
    _limit_arguments(create)
    listing = sub.add_parser("list", help="every key, without secrets")
    listing.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one key: limits, spend, reservations, budget left")
    show.add_argument("key", help="name or id")
    show.add_argument("--json", action="store_true")
    for name, text in (("revoke", "refuse the key from now on (every worker, within 1 s)"),
                       ("rotate", "a new secret for the key (limits and spend stay); the old "
                        "one stops working")):
        sub.add_parser(name, help=text).add_argument("key", help="name or id")
    update = sub.add_parser("update", help="change a key's name, models or limits "
                            f"(`{CLEAR}` removes a limit)")
    update.add_argument("key", help="name or id")
    update.add_argument("--name", help="a new name")
    _limit_arguments(update)


def _limit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="allowed models, comma-separated globs "
                        "('claude-*,gpt-5*'); default any")
    parser.add_argument("--budget", help="USD the key may spend per period")
    parser.add_argument("--period", choices=PERIODS, help="budget period (default month; "
                        "UTC days, ISO weeks, calendar months, or total)")
    parser.add_argument("--rpm", help="requests per minute")
    parser.add_argument("--tpm", help="tokens per minute (input, output and cache, as billed)")
    parser.add_argument("--max-parallel", help="requests running at once")
    parser.add_argument("--expires", help="when the key stops working: YYYY-MM-DD (its start, "
                        "UTC) or an ISO datetime")


def run_keys(args: argparse.Namespace, config) -> int:
    store = open_key_store(config)
    try:
        command = {"create": _create, "list": _list, "show": _show, "revoke": _revoke,
                   "rotate": _rotate, "update": _update}[args.keys_command]
        return command(args, store, config)
    except ValueError as err:
        return _complain(str(err), 2)
    except (StoreFault, OSError) as err:
        return _complain(f"cannot use the keys database: {err}", 1)
    finally:
        store.close()


def _create(args, store: KeyStore, config) -> int:
    secret = new_secret()
    limits = _limits(args, partial=False)
    key = ClientKey(id=new_key_id(), name=_name(args.name), hint=hint_of(secret),
                    digest=key_digest(secret, installation_secret(config.secret_path)),
                    created_at=time.time(), **limits)
    store.add(key)
    _note(f"created key {key.name} ({key.id}): {describe(key)}")
    _note("the key is shown only this once; hand it over now:")
    print(secret)
    return 0


def _list(args, store: KeyStore, config) -> int:
    keys, now = store.all_keys(), time.time()
    if args.json:
        print(json.dumps([public(k, now) for k in keys], indent=2))
        return 0
    rows = [("name", "id", "key", "state", "models", "budget", "rpm", "tpm", "parallel",
             "expires")]
    rows += [(k.name, k.id, k.hint, k.state(now), ",".join(k.models) or "any",
              _budget_text(k), _num(k.rpm), _num(k.tpm), _num(k.max_parallel),
              _when(k.expires_at)) for k in keys]
    print(_table(rows) if keys else "no keys yet: llm-proxy keys create --name NAME")
    return 0


def _show(args, store: KeyStore, config) -> int:
    key, now = _find(store, args.key), time.time()
    standing = store.standing(key, now)
    facts = {**public(key, now), "period_start": _when(period_start(key.period, now)),
             "period_end": _when(period_end(key.period, now)),
             "spent_usd": round(standing.spent_usd, 6),
             "reserved_usd": round(standing.held_usd, 6), "running": standing.holds,
             "remaining_usd": None if key.budget_usd is None else
             round(key.budget_usd - standing.spent_usd - standing.held_usd, 6),
             "requests_last_minute": standing.requests_in_window(),
             "tokens_last_minute": standing.tokens_in_window()}
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        print("\n".join(f"{k:<{width}}  {'-' if v is None else v}" for k, v in facts.items()))
    return 0


def _revoke(args, store: KeyStore, config) -> int:
    key = _find(store, args.key)
    store.revoke(key.id, time.time())
    _note(f"revoked key {key.name} ({key.id}); every worker refuses it within a second")
    return 0


def _rotate(args, store: KeyStore, config) -> int:
    key = _find(store, args.key)
    if key.revoked_at is not None:
        raise ValueError(f"key {key.name} is revoked; create a new one")
    secret = new_secret()
    store.rotate(key.id, key_digest(secret, installation_secret(config.secret_path)),
                 hint_of(secret))
    _note(f"rotated key {key.name} ({key.id}): the old secret no longer works; the new one "
          "is shown only this once:")
    print(secret)
    return 0


def _update(args, store: KeyStore, config) -> int:
    key = _find(store, args.key)
    changes = _limits(args, partial=True)
    if args.name:
        changes["name"] = _name(args.name)
    if not changes:
        raise ValueError("nothing to change (see llm-proxy keys update --help)")
    if "name" in changes and changes["name"] != key.name and store.find(changes["name"]):
        other = store.find(changes["name"])
        if other.revoked_at is None:
            raise ValueError(f"a key named {changes['name']!r} exists already")
    store.update(key.id, **changes)
    _note(f"updated key {key.name} ({key.id}): {describe(replace(key, **changes))}")
    return 0


# -- values ---------------------------------------------------------------------------------------

def _limits(args, partial: bool) -> dict:
    """The limits given on the command line (all of them, defaults filled, for `create`;
    only those given for `update`)."""
    given = {}
    if args.models is not None:  # `none` (like `*`) removes the list: any model
        given["models"] = () if args.models.strip().lower() == CLEAR else parse_models(args.models)
    for attr, field, kind in (("budget", "budget_usd", float), ("rpm", "rpm", int),
                              ("tpm", "tpm", int), ("max_parallel", "max_parallel", int)):
        value = getattr(args, attr)
        if value is not None:
            given[field] = _number(value, kind, f"--{attr.replace('_', '-')}")
    if args.period is not None:
        given["period"] = args.period
    if args.expires is not None:
        given["expires_at"] = None if args.expires == CLEAR else _moment(args.expires)
    if partial:
        return given
    return {"models": (), "budget_usd": None, "period": "month", "rpm": None, "tpm": None,
            "max_parallel": None, "expires_at": None, **given}


def _number(text: str, kind: type, option: str):
    if text.strip().lower() == CLEAR:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{option} must be a number (or {CLEAR}), not {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{option} must be greater than 0")
    return value


def _moment(text: str) -> float:
    from ..report import parse_when
    try:
        return parse_when(text)
    except ValueError as err:
        raise ValueError(f"--expires: {err}") from None


def _name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > 128 or not name.isprintable():
        raise ValueError("a key's name is 1 to 128 printable characters")
    return name


def _find(store: KeyStore, id_or_name: str) -> ClientKey:
    key = store.find(id_or_name)
    if key is None:
        raise ValueError(f"no key named {id_or_name!r}")
    return key


def public(key: ClientKey, now: float) -> dict:
    """What may be shown of a key: everything but its digest."""
    facts = {k: v for k, v in asdict(key).items() if k != "digest"}
    facts["models"] = list(key.models)
    facts["state"] = key.state(now)
    for field in ("expires_at", "revoked_at", "created_at"):
        facts[field] = _when(facts[field]) if facts[field] is not None else None
    return facts


def describe(key: ClientKey) -> str:
    parts = [f"models {', '.join(key.models) or 'any'}", f"budget {_budget_text(key)}"]
    parts += [f"{label} {value}" for label, value in (("rpm", key.rpm), ("tpm", key.tpm),
                                                     ("parallel", key.max_parallel))
              if value is not None]
    if key.expires_at is not None:
        parts.append(f"expires {_when(key.expires_at)}")
    return "; ".join(parts)


def _budget_text(key: ClientKey) -> str:
    if key.budget_usd is None:
        return "none"
    return f"${key.budget_usd:g}" + ("" if key.period == "total" else f"/{key.period}")


def _num(value) -> str:
    return "-" if value is None else str(value)


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in rows)


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _complain(message: str, code: int) -> int:
    print(f"llm-proxy keys: {message}", file=sys.stderr)
    return code
