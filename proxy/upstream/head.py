"""An upstream response's header block, parsed without the email package.

http.client parses a response's headers with `email.parser`, a general MIME parser:
~35 µs of a proxied request's ~0.9 ms here, for the five or ten plain lines an LLM API
sends.  A block whose every line is a plain `Name: value` of visible ASCII is parsed
here into the same `HTTPMessage` with the same names and values; any other block (folded
lines, control or non-ASCII bytes, a line without a colon, a multipart or message content
type, which the email parser reads further) goes to `email.parser` as before, so every odd
case keeps the standard library's reading, defects included.
"""

from __future__ import annotations

import email.parser
import http.client
import re

# A header name as email's parser accepts one (printable ASCII but the colon), then the
# value: leading blanks dropped, trailing ones kept, as the parser does.
_PLAIN_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):[ \t]*([\x20-\x7e\t]*?)\r?\n")
MAX_LINE = 65536  # http.client's limits, which its own reading enforces
MAX_HEADERS = 100


def read_header_lines(fp) -> list[bytes]:
    """The lines of a header block, its blank last line included, within the limits
    http.client sets (which count that blank line too)."""
    lines = []
    while True:
        line = fp.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def parse_header_lines(lines: list[bytes]) -> http.client.HTTPMessage:
    """The header block (as `read_header_lines` returns it) as http.client's
    `parse_headers` would return it."""
    message = http.client.HTTPMessage()
    for line in lines:
        plain = _PLAIN_LINE.fullmatch(line)
        if plain is None:
            if line in (b"\r\n", b"\n", b""):
                break
            return _parsed_by_email(lines)
        message[plain[1].decode("ascii")] = plain[2].decode("ascii")
    if message.get_content_maintype() in ("multipart", "message"):
        return _parsed_by_email(lines)  # the email parser reads these types further
    message.set_payload("")  # what the email parser leaves after a header block
    return message


def _parsed_by_email(lines: list[bytes]) -> http.client.HTTPMessage:
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(text)
