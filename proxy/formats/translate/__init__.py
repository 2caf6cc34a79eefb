"""Translation between API formats: I/O-free functions and event transducers.

A client speaks its own protocol whatever its upstream speaks (issue "Any client, any
provider"): requests are rewritten for the upstream's format, its answers (JSON bodies
and event streams) for the client's.  Everything here takes decoded JSON and returns
JSON or SSE event bytes; no sockets, threads or clocks.

`anthropic_chat`: Anthropic Messages clients on OpenAI Chat Completions upstreams;
`chat_anthropic`: the other way; `common`: the stop-reason table and tool-call ids;
`bridge`: both, per (client format, provider), as the pipeline uses them for each try.
"""
