"""Text that is safe to store and to log, whatever a client or an upstream sent.

Strings reach the usage row and the log from untrusted places: the model name a client
asked for, an upstream's error message, a request path.  JSON lets a client send a lone
surrogate (`"\\ud800"`, or the raw bytes `\\xed\\xa0\\x80`, which `json.loads` accepts), a
NUL or a newline, and any of them can be megabytes long.  A lone surrogate cannot be
encoded as UTF-8, so one such string used to fail a whole SQLite batch (other clients'
rows included) and then its spill-file replay at every start; a newline in a log field
forges a log line.  So text is made safe once, at the boundary where it is stored or
logged, and never trusted before.

Pure functions: no I/O.
"""

from __future__ import annotations

import re

# Code points that cannot be encoded as UTF-8 (lone surrogates) and NUL, which PostgreSQL
# refuses in text and many tools treat as the end of a string.
_UNSTORABLE = re.compile("[\ud800-\udfff\x00]")
# Anything that could break a log line or hide text in a terminal: C0/C1 controls, DEL, the
# Unicode line and paragraph separators, and lone surrogates (which no log file can encode).
_UNLOGGABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def cap(text: str, limit: int) -> str:
    """At most `limit` characters, with a marker that says how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def storable(text: str, limit: int) -> str:
    """Valid UTF-8 without NUL, capped at `limit` characters (cut first: a 30 MB value costs
    one slice, not a scan of 30 MB)."""
    text = cap(text, limit)
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub(REPLACEMENT, text)


def loggable(value: object, limit: int = 512) -> str:
    """One log field: control characters escaped, so no input can start a line of its own."""
    text = cap(value if isinstance(value, str) else str(value), limit)
    if text.isascii() and text.isprintable():
        return text
    return _UNLOGGABLE.sub(_escape, text)


def _escape(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char == "\n":
        return "\\n"
    if char == "\r":
        return "\\r"
    if char == "\t":
        return "\\t"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_line(message: str) -> str:
    """A whole log message on one line (the logging formatter's backstop)."""
    if message.isascii() and message.isprintable():
        return message
    return _UNLOGGABLE.sub(_escape, message)
