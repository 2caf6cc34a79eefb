# Gunicorn configuration for llm-stream-proxy:
#   gunicorn -c deploy/gunicorn.conf.py proxy.wsgi:application
# The settings and hooks live in the package (proxy/gunicorn_conf.py) so `llm-proxy serve`
# uses exactly the same ones; override any of them below or with LLM_PROXY_BIND,
# LLM_PROXY_WORKERS, LLM_PROXY_THREADS, LLM_PROXY_GRACEFUL_TIMEOUT.
from proxy.gunicorn_conf import *  # noqa: F401,F403
from proxy.gunicorn_conf import child_exit, on_exit, on_starting, worker_exit  # noqa: F401
