"""Configuration: every setting declared once, loaded as defaults < file < environment < CLI.

The proxy must run with no file at all (pass-through to Anthropic and OpenAI, usage in a
local SQLite file), so every setting has a working default.  A bad file stops start-up
with a message that names the key and what is wrong with it.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


ANTHROPIC_FORMAT = "anthropic"
OPENAI_FORMAT = "openai"
PROVIDER_FORMATS = (ANTHROPIC_FORMAT, OPENAI_FORMAT)


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range: the operator's mistake,
    reported when the proxy starts (never a client-facing error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def default_db_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "llm-proxy", "usage.db")


@dataclass(frozen=True)
class Setting:
    """One scalar setting: where it lives in the file, its env name, type, default, help."""

    key: str  # "section.name" in the TOML file
    kind: type
    default: Any
    env: str | None
    help: str
    check: Callable[[Any], str | None] = lambda value: None

    @property
    def attr(self) -> str:
        return self.key.split(".")[-1]


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be 0 or more"


SETTINGS: tuple[Setting, ...] = (
    Setting("stream.heartbeat_interval", float, 15.0, "LLM_PROXY_HEARTBEAT_INTERVAL",
            "Seconds without a write before a `: keepalive` comment is sent on an event stream.",
            _positive),
    Setting("stream.idle_timeout", float, 120.0, "LLM_PROXY_IDLE_TIMEOUT",
            "Seconds the upstream may stay silent on one read (headers included); no total cap.",
            _positive),
    Setting("stream.connect_timeout", float, 10.0, "LLM_PROXY_CONNECT_TIMEOUT",
            "Seconds to open a TCP/TLS connection to the upstream.", _positive),
    Setting("stream.commit_after", float, 0.0, "LLM_PROXY_COMMIT_AFTER",
            "Seconds to wait for upstream headers before a stream commits to 200 so keepalives "
            "can flow; 0 means one heartbeat interval.", _non_negative),
    Setting("stream.client_probe_interval", float, 0.05, "LLM_PROXY_CLIENT_PROBE_INTERVAL",
            "How often the heartbeat thread checks whether silent clients have hung up.",
            _positive),
    Setting("stream.shutdown_grace", float, 20.0, "LLM_PROXY_SHUTDOWN_GRACE",
            "On SIGTERM, live streams may run this long before they end with a terminal error; "
            "keep it below gunicorn's graceful_timeout.", _non_negative),
    Setting("stream.keepalive", bool, True, "LLM_PROXY_KEEPALIVE",
            "Send keepalive comments on event streams (per provider too).", lambda v: None),
    Setting("stream.max_event_bytes", int, 16 * 1024 * 1024, "LLM_PROXY_MAX_EVENT_BYTES",
            "Largest upstream SSE event; a larger one (or a line that never ends) ends the "
            "stream with an upstream error.", _positive),
    Setting("server.plain_timeout", float, 600.0, "LLM_PROXY_PLAIN_TIMEOUT",
            "Seconds a non-streaming request waits for its answer (it is silent until done); "
            "the official SDKs wait 600 s.", _positive),
    Setting("server.max_body_bytes", int, 32 * 1024 * 1024, "LLM_PROXY_MAX_BODY_BYTES",
            "Largest request body accepted; larger ones get 413.", _positive),
    Setting("server.client_timeout", float, 30.0, "LLM_PROXY_CLIENT_TIMEOUT",
            "Seconds a client has to send a whole request (headers and body); slower ones get "
            "408 and never hold a worker thread while they trickle.", _positive),
    Setting("server.memory_budget", int, 1024 * 1024 * 1024, "LLM_PROXY_MEMORY_BUDGET",
            "Bytes of request bodies (and their parsed JSON) one worker holds at once; a "
            "request that would exceed it is refused with 503/529 instead of swelling the "
            "worker.", _positive),
    Setting("server.max_decompressed_bytes", int, 256 * 1024 * 1024,
            "LLM_PROXY_MAX_DECOMPRESSED_BYTES",
            "Largest upstream body after decompression (a gzip bomb stops here).", _positive),
    Setting("server.max_compression_ratio", int, 100, None,
            "Largest decompressed/compressed size ratio of an upstream body past its first "
            "MiB.", _positive),
    Setting("tracker.enabled", bool, True, "LLM_PROXY_TRACKER",
            "Record one usage row per request.", lambda v: None),
    Setting("tracker.db", str, "", "LLM_PROXY_DB",
            "Usage database: a SQLite file (default: ~/.local/share/llm-proxy/usage.db), or a "
            "postgresql:// URL that several proxy hosts share.", lambda v: None),
    Setting("tracker.spill_dir", str, "", "LLM_PROXY_SPILL_DIR",
            "Directory for rows the database cannot take yet (default: <db>.spill); put it on "
            "another filesystem to keep rows through a full disk.", lambda v: None),
    Setting("tracker.spill_after", float, 5.0, "LLM_PROXY_SPILL_AFTER",
            "Seconds a database fault may last before queued rows move from memory to the "
            "spill directory.", _non_negative),
    Setting("tracker.secret_file", str, "", "LLM_PROXY_SECRET_FILE",
            "Per-installation secret that keys the client key ids in usage rows; created on "
            "first start (default: beside the database).", lambda v: None),
    Setting("tracker.retention_days", float, 0.0, "LLM_PROXY_RETENTION_DAYS",
            "Days raw usage rows are kept in PostgreSQL (reports read hourly rollups, which "
            "stay); older rows are deleted in small batches. 0 keeps everything.",
            _non_negative),
    Setting("tracker.batch_size", int, 200, None, "Rows per write transaction.", _positive),
    Setting("tracker.flush_interval", float, 0.05, None,
            "Longest wait (s) before a partial batch is written.", _positive),
    Setting("tracker.queue_max", int, 10000, None,
            "Rows held in memory before they spill to the spill directory.", _positive),
    Setting("retry.max_attempts", int, 2, None,
            "Tries per deployment of a route (first included) for transient failures.", _positive),
    Setting("retry.backoff_base", float, 0.5, None,
            "First backoff (s); doubles per retry, with up to 25 % jitter.", _non_negative),
    Setting("retry.backoff_max", float, 8.0, None, "Longest backoff (s).", _non_negative),
    Setting("retry.retry_after_max", float, 30.0, None,
            "Honour Retry-After / retry-after-ms up to this (s); a longer wait moves to the "
            "next deployment instead.", _non_negative),
    Setting("retry.max_continuations", int, 2, "LLM_PROXY_MAX_CONTINUATIONS",
            "Continuations per request after a stream broke mid-answer (0: never; the client "
            "gets the terminal error).", _non_negative),
    Setting("dedup.replay_window", float, 10.0, "LLM_PROXY_REPLAY_WINDOW",
            "Seconds after a complete answer ended during which an identical request (same "
            "client key) gets it replayed instead of paying again; 0 turns replay off.",
            _non_negative),
    Setting("dedup.join_live", bool, False, "LLM_PROXY_JOIN_LIVE",
            "An identical request that arrives while the first is still streaming shares its "
            "upstream call (off: identical concurrent requests may be deliberate sampling).",
            lambda v: None),
    Setting("dedup.orphan_grace", float, 0.0, "LLM_PROXY_ORPHAN_GRACE",
            "Seconds an upstream call goes on after all its clients hung up, so that a retry "
            "can join it; 0 shuts it down at once.", _non_negative),
    Setting("dedup.cache_bytes", int, 64 * 1024 * 1024, "LLM_PROXY_DEDUP_CACHE_BYTES",
            "Bytes of finished answers one worker keeps for replay (least recently used go "
            "first); an answer larger than a quarter of it is never kept.", _positive),
    Setting("dedup.anonymous", bool, False, "LLM_PROXY_DEDUP_ANONYMOUS",
            "Dedup requests that carry no client key too (they all share one scope).",
            lambda v: None),
    Setting("auth.mode", str, "", "LLM_PROXY_AUTH_MODE",
            "`keys`: clients need a proxy key (`llm-proxy keys create`) and the configured "
            "provider keys are used upstream; `open`: the client's own provider key passes "
            "through.  Default: `keys` when a provider has `api_key_env`, else `open`.",
            lambda v: None if v in ("", "open", "keys") else "must be open or keys"),
    Setting("auth.open_on_network", bool, False, "LLM_PROXY_OPEN_ON_NETWORK",
            "Allow `open` mode with a configured provider key on a non-loopback bind (anyone "
            "who reaches the port spends that key).", lambda v: None),
    Setting("auth.admin_token_env", str, "LLM_PROXY_ADMIN_TOKEN", None,
            "Environment variable holding the admin token that guards /usage and "
            "/health?flush=1; with no token set they answer on loopback only.",
            lambda v: None),
    Setting("auth.keys_db", str, "", "LLM_PROXY_KEYS_DB",
            "SQLite file of client keys, their budgets and counters (default: keys.db "
            "beside the usage database).", lambda v: None),
    Setting("auth.reserve_output_tokens", int, 65536, None,
            "Output tokens a budget reservation assumes when a request sets no max_tokens "
            "(and the most it assumes when one does).", _positive),
    Setting("stream.cost_comment", bool, False, "LLM_PROXY_COST_COMMENT",
            "End every stream with an SSE comment that gives its cost and tokens (SDKs ignore "
            "comments); a client can ask for it per request with `X-LLM-Proxy-Cost-Comment: 1`.",
            lambda v: None),
    Setting("metrics.collect", bool, True, "LLM_PROXY_METRICS",
            "Collect Prometheus metrics (GET /metrics, every worker of the host at once).",
            lambda v: None),
    Setting("metrics.open_to_scrapers", bool, False, "LLM_PROXY_METRICS_OPEN",
            "Serve /metrics to anyone who reaches the port (a scraper without the admin "
            "token); else it is guarded like /usage.", lambda v: None),
    Setting("metrics.key_labels", bool, False, "LLM_PROXY_METRICS_KEY_LABELS",
            "Label request and cost metrics with the proxy key's name (one series per key: "
            "keep it off with many keys).", lambda v: None),
    Setting("breaker.failure_threshold", int, 5, None,
            "Failures within the window that open a deployment's circuit.", _positive),
    Setting("breaker.failure_ratio", float, 0.5, None,
            "...or this share of failed tries (with at least min_requests tries).",
            lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
    Setting("breaker.min_requests", int, 10, None,
            "Tries in the window before failure_ratio applies.", _positive),
    Setting("breaker.window", float, 60.0, None, "Seconds of history the breaker counts.", _positive),
    Setting("breaker.cooldown", float, 30.0, None,
            "Seconds an open circuit skips its deployment before one probe is let through.",
            _non_negative),
    Setting("log.level", str, "INFO", "LLM_PROXY_LOG_LEVEL", "Python logging level.",
            lambda v: None if v.upper() in ("DEBUG", "INFO", "WARNING", "ERROR") else
            "must be DEBUG, INFO, WARNING or ERROR"),
)

SCALAR_SECTIONS = ("stream", "server", "tracker", "retry", "dedup", "auth", "metrics", "breaker",
                   "log")
SECTIONS = set(SCALAR_SECTIONS) | {"providers", "prices", "routes"}


@dataclass
class Provider:
    """An upstream API: where it is, which wire format it speaks, whose key it uses."""

    name: str
    base_url: str
    format: str
    api_key_env: str | None = None
    keepalive: bool = True
    # For clients of the other format (translation): see the README's "Any client, any provider".
    max_tokens_field: str = "max_tokens"  # a Chat upstream's name for it ("max_completion_tokens")
    reasoning_effort: bool = False  # a Chat upstream takes `reasoning_effort` (from `thinking`)
    default_max_tokens: int = 4096  # an Anthropic upstream needs max_tokens; Chat clients may omit it
    reasoning_content: bool = False  # Chat clients get an Anthropic upstream's thinking as `reasoning_content`
    # Continuing a broken stream with an assistant prefill (see the README's "continuation").
    continuation: bool | None = None  # None: on, except for api.openai.com (it ignores prefills)
    prefill_params: dict = field(default_factory=dict)  # extra body params of a continuation

    @property
    def continues(self) -> bool:
        """Does this provider continue a trailing assistant message?"""
        if self.continuation is not None:
            return self.continuation
        return urlsplit(self.base_url).hostname != "api.openai.com"

    @property
    def api_key(self) -> str | None:
        """The proxy's own key for this provider, if one is configured (never logged)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def default_providers() -> dict[str, Provider]:
    return {
        "anthropic": Provider("anthropic", "https://api.anthropic.com", ANTHROPIC_FORMAT),
        "openai": Provider("openai", "https://api.openai.com", OPENAI_FORMAT),
    }


@dataclass
class Config:
    heartbeat_interval: float = 15.0
    idle_timeout: float = 120.0
    connect_timeout: float = 10.0
    commit_after: float = 0.0
    client_probe_interval: float = 0.05
    shutdown_grace: float = 20.0
    keepalive: bool = True
    max_event_bytes: int = 16 * 1024 * 1024
    max_body_bytes: int = 32 * 1024 * 1024
    client_timeout: float = 30.0
    memory_budget: int = 1024 * 1024 * 1024
    max_decompressed_bytes: int = 256 * 1024 * 1024
    max_compression_ratio: int = 100
    plain_timeout: float = 600.0
    enabled: bool = True
    db: str = ""
    spill_dir: str = ""
    spill_after: float = 5.0
    secret_file: str = ""
    retention_days: float = 0.0
    batch_size: int = 200
    flush_interval: float = 0.05
    queue_max: int = 10000
    max_attempts: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    retry_after_max: float = 30.0
    max_continuations: int = 2
    replay_window: float = 10.0
    join_live: bool = False
    orphan_grace: float = 0.0
    cache_bytes: int = 64 * 1024 * 1024
    anonymous: bool = False
    mode: str = ""
    open_on_network: bool = False
    admin_token_env: str = "LLM_PROXY_ADMIN_TOKEN"
    keys_db: str = ""
    reserve_output_tokens: int = 65536
    cost_comment: bool = False
    collect: bool = True
    open_to_scrapers: bool = False
    key_labels: bool = False
    failure_threshold: int = 5
    failure_ratio: float = 0.5
    min_requests: int = 10
    window: float = 60.0
    cooldown: float = 30.0
    level: str = "INFO"
    routes: list = field(default_factory=list)
    providers: dict[str, Provider] = field(default_factory=default_providers)
    prices: dict[str, dict] = field(default_factory=dict)
    source: str | None = None

    @property
    def commit_delay(self) -> float:
        return self.commit_after or self.heartbeat_interval

    @property
    def retry_policy(self):
        from .routing import RetryPolicy
        return RetryPolicy(self.max_attempts, self.backoff_base, self.backoff_max, self.retry_after_max)

    @property
    def dedup_policy(self):
        from .routing import DedupPolicy
        return DedupPolicy(self.replay_window, self.join_live, self.orphan_grace)

    @property
    def breaker_policy(self):
        from .routing import BreakerPolicy
        return BreakerPolicy(self.failure_threshold, self.failure_ratio, self.min_requests,
                             self.window, self.cooldown)

    @property
    def db_path(self) -> str:
        """The usage database: a SQLite file, or a PostgreSQL URL (never logged as it is:
        it may hold a password; see `db_label`)."""
        return self.db or default_db_path()

    @property
    def db_is_url(self) -> bool:
        return self.db_path.startswith(("postgresql://", "postgres://"))

    @property
    def db_label(self) -> str:
        """The usage database as a log line may name it."""
        if not self.db_is_url:
            return self.db_path
        from .store.postgres import redacted_url
        return redacted_url(self.db_path)

    @property
    def data_dir(self) -> str:
        """Where the proxy's local files go by default: beside the SQLite file, or the
        default data directory when the database is a server."""
        if self.db_is_url:
            return os.path.dirname(default_db_path())
        return os.path.dirname(os.path.abspath(self.db_path))

    @property
    def spill_path(self) -> str:
        from .store import default_spill_dir
        return self.spill_dir or default_spill_dir(self.db_path, self.data_dir)

    @property
    def secret_path(self) -> str:
        return self.secret_file or os.path.join(self.data_dir, "installation-secret")

    @property
    def keys_db_path(self) -> str:
        return self.keys_db or os.path.join(self.data_dir, "keys.db")

    @property
    def auth_mode(self) -> str:
        """`keys` or `open`: as set, else `keys` as soon as the proxy holds a provider key
        of its own (any client could otherwise spend it)."""
        if self.mode:
            return self.mode
        return "keys" if any(p.api_key_env for p in self.providers.values()) else "open"

    @property
    def admin_token(self) -> str | None:
        """The admin token, read from its environment variable (never from the file)."""
        token = os.environ.get(self.admin_token_env, "").strip() if self.admin_token_env else ""
        return token or None

    def provider_for(self, fmt: str) -> Provider | None:
        """The provider serving an API format: the one named after it, else the first
        (None when the configuration has none of that format)."""
        named = self.providers.get(fmt)
        if named is not None and named.format == fmt:
            return named
        return next((p for p in self.providers.values() if p.format == fmt), None)


def load_config(path: str | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Build the Config: defaults < TOML file < LLM_PROXY_* environment < overrides (CLI)."""
    env = os.environ if env is None else env
    path = path or env.get("LLM_PROXY_CONFIG") or None
    return config_from_data(_read_file(path) if path else {}, env, overrides, source=path)


def resolve_config(source: "Config | Mapping[str, Any] | str | os.PathLike | None" = None,
                   overrides: Mapping[str, Any] | None = None) -> Config:
    """A Config from what an embedding application has: a Config (copied), a dict shaped
    like the TOML file, the path of a TOML file, or None for the environment (as the
    server reads it).  A dict or a file stands alone: LLM_PROXY_* variables do not change
    it, so an application (or a test) gets the same proxy wherever it runs.  `overrides`
    name settings by key (`"stream.heartbeat_interval"`) or by name (`"heartbeat_interval"`,
    `"db"`)."""
    if source is None:
        return load_config(overrides=overrides)
    if isinstance(source, Config):
        return _checked_copy(source, overrides or {})
    if isinstance(source, Mapping):
        return config_from_data(copy.deepcopy(dict(source)), {}, overrides, source="<dict>")
    if isinstance(source, (str, os.PathLike)):
        return load_config(os.fspath(source), {}, overrides)
    raise TypeError(f"a config is a Config, a dict, a TOML path or None, not {type(source).__name__}")


def _checked_copy(source: Config, overrides: Mapping[str, Any]) -> Config:
    """A copy of a Config built in code, checked as a file would be, with `overrides`; the
    routes' retry policies follow the overridden global one (a route's own max_attempts
    stays)."""
    config = copy.deepcopy(source)
    before = config.retry_policy
    for setting in SETTINGS:
        _assign(config, setting, getattr(config, setting.attr), setting.key)
    for key, value in overrides.items():
        _assign(config, _setting(key), value, f"override {key}")
    for provider in config.providers.values():
        provider.base_url = check_url(provider.base_url, f"providers.{provider.name}.base_url")
    policy = config.retry_policy
    if policy != before:
        config.routes = [
            dataclasses.replace(route, retry=policy if route.retry.max_attempts == before.max_attempts
                                else dataclasses.replace(policy, max_attempts=route.retry.max_attempts))
            for route in config.routes]
    return config


def config_from_data(data: dict, env: Mapping[str, str], overrides: Mapping[str, Any] | None,
                     source: str | None) -> Config:
    """The Config of a parsed TOML document (or a dict shaped like one), then `env`'s
    LLM_PROXY_* variables, then `overrides`."""
    _reject_unknown_sections(data)
    config = Config(source=source)
    for setting in SETTINGS:
        value = _lookup(data, setting.key)
        if value is not None:
            _assign(config, setting, value, f"{setting.key} in {source}")
        if setting.env and env.get(setting.env, "") != "":
            _assign(config, setting, _from_text(setting, env[setting.env]), setting.env)
    for key, value in (overrides or {}).items():
        _assign(config, _setting(key), value, f"--{key.split('.')[-1].replace('_', '-')}")
    config.providers = _load_providers(data.get("providers", {}), env)
    config.prices = _load_prices(data.get("prices", {}))
    config.routes = _load_routes(data.get("routes", {}), config)
    return config


def _read_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _reject_unknown_sections(data: dict) -> None:
    for key, value in data.items():
        if key not in SECTIONS:
            raise ConfigError(f"unknown section or key {key!r} (known: {', '.join(sorted(SECTIONS))})")
        if key in SCALAR_SECTIONS:
            known = {s.attr for s in SETTINGS if s.key.startswith(key + ".")}
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            for name in value:
                if name not in known:
                    raise ConfigError(f"unknown key {key}.{name} (known: {', '.join(sorted(known))})")


def _lookup(data: dict, key: str) -> Any:
    section, _, name = key.partition(".")
    return data.get(section, {}).get(name)


def _setting(key: str) -> Setting:
    for setting in SETTINGS:
        if setting.key == key or setting.attr == key:
            return setting
    raise ConfigError(f"unknown setting {key!r}")


def _from_text(setting: Setting, text: str) -> Any:
    if setting.kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{setting.env}={text!r}: expected true or false")
    try:
        return setting.kind(text)
    except ValueError:
        raise ConfigError(f"{setting.env}={text!r}: expected {setting.kind.__name__}") from None


def _assign(config: Config, setting: Setting, value: Any, where: str) -> None:
    if setting.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, setting.kind) or (setting.kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {setting.kind.__name__}, got {value!r}")
    problem = setting.check(value)
    if problem:
        raise ConfigError(f"{where}: {problem} (got {value!r})")
    setattr(config, setting.attr, value)


def _load_providers(section: Any, env: Mapping[str, str]) -> dict[str, Provider]:
    if not isinstance(section, dict):
        raise ConfigError("[providers] must be a table of provider tables")
    providers = default_providers()
    for name, table in section.items():
        providers[name] = _provider_from_table(name, table, providers.get(name))
    for name, var in (("anthropic", "LLM_PROXY_ANTHROPIC_BASE_URL"), ("openai", "LLM_PROXY_OPENAI_BASE_URL")):
        if env.get(var):
            providers[name].base_url = check_url(env[var], var)
    return providers


_PROVIDER_KEYS = {"base_url", "format", "api_key_env", "keepalive", "max_tokens_field",
                  "reasoning_effort", "default_max_tokens", "reasoning_content", "continuation",
                  "prefill_params"}


def _provider_from_table(name: str, table: Any, base: Provider | None) -> Provider:
    where = f"providers.{name}"
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    unknown = set(table) - _PROVIDER_KEYS
    if unknown:
        raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]} "
                          f"(known: {', '.join(sorted(_PROVIDER_KEYS))})")
    fmt = table.get("format", base.format if base else None)
    if fmt not in PROVIDER_FORMATS:
        raise ConfigError(f"{where}.format must be one of {', '.join(PROVIDER_FORMATS)} (got {fmt!r})")
    url = table.get("base_url", base.base_url if base else None)
    if url is None:
        raise ConfigError(f"{where}.base_url is required")
    key_env = table.get("api_key_env")
    if key_env is not None and not isinstance(key_env, str):
        raise ConfigError(f"{where}.api_key_env must be the name of an environment variable")
    for flag in ("keepalive", "reasoning_effort", "reasoning_content"):
        if not isinstance(table.get(flag, False), bool):
            raise ConfigError(f"{where}.{flag} must be true or false")
    field_name = table.get("max_tokens_field", "max_tokens")
    if field_name not in ("max_tokens", "max_completion_tokens"):
        raise ConfigError(f"{where}.max_tokens_field must be max_tokens or max_completion_tokens")
    default_max = table.get("default_max_tokens", 4096)
    if isinstance(default_max, bool) or not isinstance(default_max, int) or default_max < 1:
        raise ConfigError(f"{where}.default_max_tokens must be a whole number of tokens above 0")
    continuation, prefill = _continuation_settings(where, table)
    return Provider(name, check_url(url, f"{where}.base_url"), fmt, key_env,
                    table.get("keepalive", True), field_name, table.get("reasoning_effort", False),
                    default_max, table.get("reasoning_content", False), continuation, prefill or {})


def _continuation_settings(where: str, table: dict) -> tuple[bool | None, dict | None]:
    continuation = table.get("continuation")
    if continuation is not None and not isinstance(continuation, bool):
        raise ConfigError(f"{where}.continuation must be true or false")
    prefill = table.get("prefill_params")
    if prefill is not None and not isinstance(prefill, dict):
        raise ConfigError(f"{where}.prefill_params must be a table of body parameters, e.g. "
                          "{ continue_final_message = true, add_generation_prompt = false }")
    return continuation, prefill


def check_url(url: Any, where: str) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"{where} must be a URL string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where} must be an http(s) URL (got {url!r})")
    return url.rstrip("/")


def _load_prices(section: Any) -> dict[str, dict]:
    if not isinstance(section, dict):
        raise ConfigError("[prices] must be a table of model tables")
    for model, table in section.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[prices.{model!r}] must be a table")
        for key, value in table.items():
            if key not in ("input", "output", "cache_read", "cache_write"):
                raise ConfigError(f"unknown key prices.{model}.{key}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"prices.{model}.{key} must be a number >= 0 (got {value!r})")
        for key in ("input", "output"):
            if key not in table:
                raise ConfigError(f"prices.{model}.{key} is required (USD per million tokens)")
    return section


_ROUTE_KEYS = {"deployments", "first_token_timeout", "max_attempts", "replay_window", "join_live",
               "orphan_grace"}
_DEPLOYMENT_KEYS = {"provider", "model", "name", "params", "drop", "larger_context", "continuation",
                    "prefill_params"}


def _load_routes(section: Any, config: Config) -> list:
    """[routes."model-or-glob"]: ordered deployments, tried in the order written."""
    from dataclasses import replace

    from .routing import Route

    if not isinstance(section, dict):
        raise ConfigError("[routes] must be a table of route tables")
    routes = []
    for pattern, table in section.items():
        where = f"routes.{pattern!r}"
        if not isinstance(table, dict):
            raise ConfigError(f"[{where}] must be a table")
        unknown = set(table) - _ROUTE_KEYS
        if unknown:
            raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]} "
                              f"(known: {', '.join(sorted(_ROUTE_KEYS))})")
        items = table.get("deployments")
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}.deployments must be a non-empty list of tables")
        deployments = tuple(_deployment(f"{where}.deployments[{i}]", item, config)
                            for i, item in enumerate(items))
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: deployment names must be unique (give each a `name`)")
        timeout = table.get("first_token_timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise ConfigError(f"{where}.first_token_timeout must be a number of seconds > 0")
        retry = config.retry_policy
        if "max_attempts" in table:
            attempts = table["max_attempts"]
            if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
                raise ConfigError(f"{where}.max_attempts must be an integer >= 1")
            retry = replace(retry, max_attempts=attempts)
        routes.append(Route(pattern, deployments, float(timeout) if timeout else None, retry,
                            dedup=_route_dedup(where, table, config)))
    return routes


def _route_dedup(where: str, table: dict, config: Config):
    """A route's own dedup settings over the global ones (None: it has none of its own)."""
    if not any(k in table for k in ("replay_window", "join_live", "orphan_grace")):
        return None
    policy = config.dedup_policy
    for name in ("replay_window", "orphan_grace"):
        value = table.get(name, getattr(policy, name))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"{where}.{name} must be a number of seconds >= 0")
        policy = dataclasses.replace(policy, **{name: float(value)})
    join = table.get("join_live", policy.join_live)
    if not isinstance(join, bool):
        raise ConfigError(f"{where}.join_live must be true or false")
    return dataclasses.replace(policy, join_live=join)


def _deployment(where: str, item: Any, config: Config):
    from .routing import Deployment

    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a table like {{provider = \"anthropic\", model = \"...\"}}")
    unknown = set(item) - _DEPLOYMENT_KEYS
    if unknown:
        raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]} "
                          f"(known: {', '.join(sorted(_DEPLOYMENT_KEYS))})")
    provider = item.get("provider")
    if provider not in config.providers:
        raise ConfigError(f"{where}.provider must name a configured provider "
                          f"({', '.join(sorted(config.providers))}), got {provider!r}")
    model = item.get("model")
    if model is not None and not isinstance(model, str):
        raise ConfigError(f"{where}.model must be a string")
    params = item.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params must be a table of parameters to pin")
    drop = item.get("drop", [])
    if not isinstance(drop, list) or not all(isinstance(k, str) for k in drop):
        raise ConfigError(f"{where}.drop must be a list of parameter names")
    if "model" in params or "model" in drop:
        raise ConfigError(f"{where}: set the upstream model with `model`, not params/drop")
    name = item.get("name") or (f"{provider}/{model}" if model else provider)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name must be a string")
    larger = item.get("larger_context", False)
    if not isinstance(larger, bool):
        raise ConfigError(f"{where}.larger_context must be true or false")
    continuation, prefill = _continuation_settings(where, item)
    return Deployment(name, provider, model, dict(params), tuple(drop), larger, continuation, prefill)
