"""llm-stream-proxy: a WSGI reverse proxy for LLM APIs."""
