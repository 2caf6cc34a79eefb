"""`llm-proxy`: serve the proxy under gunicorn, report usage, manage client keys."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from .config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=f"llm-proxy {version()}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the proxy under gunicorn (gthread workers)")
    serve.add_argument("--config", help="TOML config file (default: $LLM_PROXY_CONFIG or none)")
    serve.add_argument("--bind", help="address to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--workers", type=int, help="worker processes (default 2)")
    serve.add_argument("--threads", type=int, help="threads per worker = concurrent streams (default 1100)")
    usage = sub.add_parser("usage", help="usage and cost report from the usage database")
    usage.add_argument("--config", help="TOML config file (for the database path)")
    from . import report
    report.add_usage_arguments(usage)
    keys = sub.add_parser("keys", help="client keys: create, list, show, update, rotate, revoke")
    keys.add_argument("--config", help="TOML config file (for the keys database path)")
    from .keys.cli import add_keys_arguments
    add_keys_arguments(keys)
    return parser


def version() -> str:
    """The installed package's version: the one pip and bug reports speak of."""
    try:
        return importlib.metadata.version("llm-stream-proxy")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout never installed
        return "(version unknown: not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a newcomer's first try: show what there is, not an error
        parser.print_help()
        return 0
    if args.config:
        os.environ["LLM_PROXY_CONFIG"] = os.path.abspath(args.config)
    try:
        config = load_config()
    except ConfigError as err:
        sys.stderr.write(f"llm-proxy: configuration error: {err.message}\n")
        return 2
    if args.command == "usage":
        from . import report
        return report.run_usage(args, config.db_path)
    if args.command == "keys":
        from .keys.cli import run_keys
        return run_keys(args, config)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from . import gunicorn_conf

    settings = {name: getattr(gunicorn_conf, name) for name in (
        "bind", "worker_class", "workers", "threads", "worker_connections", "timeout",
        "graceful_timeout", "keepalive", "max_requests", "errorlog", "loglevel", "control_socket_disable",
        "on_starting", "worker_exit", "child_exit", "on_exit")}
    if args.bind:
        settings["bind"] = args.bind
    if args.workers:
        settings["workers"] = args.workers
    if args.threads:
        settings["threads"] = args.threads
        settings["worker_connections"] = args.threads + 8

    class ProxyServer(BaseApplication):
        def load_config(self):
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self):
            from .wsgi import application
            return application

    ProxyServer().run()
    return 0
