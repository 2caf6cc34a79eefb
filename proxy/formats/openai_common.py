"""The `{"error": {...}}` shape shared by the OpenAI endpoints."""

from __future__ import annotations

from ..errors import ProxyError


def openai_error_object(err: ProxyError) -> dict:
    return {"message": err.message, "type": err.openai_type, "param": None, "code": err.openai_code}
