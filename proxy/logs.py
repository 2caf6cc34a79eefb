"""Logging set-up: one line per event on stderr, never a credential, never a forged line."""

from __future__ import annotations

import logging
import sys

from .text import escape_line

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Escapes control characters in the message, whatever its fields held.

    Call sites escape what they log already (`text.loggable`); this is the backstop, so a
    newline that slips through still cannot start a line that looks like the proxy's own.
    Tracebacks are appended after the message and keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_line(record.message)
        return super().formatMessage(record)


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger("proxy")
    if getattr(root, "_llm_proxy_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    root._llm_proxy_configured = True  # type: ignore[attr-defined]
