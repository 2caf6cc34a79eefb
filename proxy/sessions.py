"""Which client session a request belongs to, for the report's `session` view.

Pure: headers and the parsed body in, an id (or None) out.  The first source that names a
session wins:

1. ``X-LLM-Proxy-Session``: any client can set it (an agent, a batch job, a notebook);
2. ``X-Claude-Code-Session-Id``: what Claude Code sends since 2.1.86;
3. ``metadata.user_id`` in an Anthropic body: older Claude Code put its session there, as
   ``user_<hash>_account_<id>_session_<uuid>`` (before 2.1.78) or as a JSON text with a
   ``session_id`` (since).

An id is a label in a report, never a credential: it is kept only when it is short and
printable, so a client cannot fill a column with a megabyte or with control characters.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

SESSION_HEADER = "x-llm-proxy-session"
CLAUDE_CODE_HEADER = "x-claude-code-session-id"
MAX_LENGTH = 128
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,%d}" % MAX_LENGTH)  # no spaces, no controls
_LEGACY_USER_ID = re.compile(r"_session_([0-9A-Za-z-]{1,%d})$" % MAX_LENGTH)


def session_of(headers: Mapping[str, str], payload: Any) -> str | None:
    """The request's session id, or None when it names none (or only an unusable one)."""
    for name in (SESSION_HEADER, CLAUDE_CODE_HEADER):
        value = headers.get(name)
        if value is not None:
            return usable(value)
    return usable(_from_metadata(payload))


def usable(value: Any) -> str | None:
    """`value` if it can label a report's row: a printable text without spaces."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _PRINTABLE.fullmatch(value) else None


def _from_metadata(payload: Any) -> str | None:
    metadata = payload.get("metadata") if isinstance(payload, dict) else None
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user_id, str) or len(user_id) > 4096:
        return None
    if user_id.startswith("{"):
        try:
            found = json.loads(user_id)
        except ValueError:
            return None
        return found.get("session_id") if isinstance(found, dict) else None
    match = _LEGACY_USER_ID.search(user_id)
    return match.group(1) if match else None
