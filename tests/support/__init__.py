"""What the tests share, one home per concern (tests/ is on sys.path: `from support.x import y`).

  sse        the SSE parser: events as an SDK sees them, bytes cut at blank lines
  rawhttp    the raw HTTP/1.1 client: request bytes, response parser, RawResponse, exchange
  checks     PROTOS and what an answer must look like per protocol (terminal errors, error shapes)
  builders   protocol builders: events, streams, bodies, errors, the protocols.md transcripts
  steps      the fake upstream's step language (Status, Send, ... End), scripts, default replies
  fake       the fake upstream server (FakeUpstream, RecordedRequest)
  processes  the proxy under gunicorn (ProxyProcess), ports, process groups, proxy variables
  nginx      nginx in front of the proxy, as deploy/nginx.conf configures it
  load       many streams, slow clients and a busy core, for load and shutdown tests
"""
