"""Logging set-up: one line per event on stderr, never a credential."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    root = logging.getLogger("proxy")
    if getattr(root, "_llm_proxy_configured", False):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    root._llm_proxy_configured = True  # type: ignore[attr-defined]
