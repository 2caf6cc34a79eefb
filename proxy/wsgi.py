"""`proxy.wsgi:application`: the proxy as a module-level WSGI callable for any WSGI server.

Configuration comes from `LLM_PROXY_CONFIG` and the `LLM_PROXY_*` environment; with
neither, the proxy passes traffic through to Anthropic and OpenAI.
"""

from __future__ import annotations

import atexit

from . import create_app
from .logs import setup_logging

application = create_app()
setup_logging(application.config.level)
atexit.register(application.close)
