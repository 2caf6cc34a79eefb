"""nginx as the tests run it: in the foreground, with deploy/nginx.conf as its site.

The main config's `http {}` block is deliberately hostile (gzip on for event streams and
JSON, as many distribution configs have it) and includes the site with only its listen port
and upstream address rewritten.  nginx is required: without it the nginx tests fail, naming
the package to install (README.md's test command installs it, and so does CI).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from support.processes import ROOT, free_port, kill_group

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
INSTALL_NGINX = "apt-get install -y nginx-light"  # as README.md's test command says
SITE = ROOT / "deploy" / "nginx.conf"
MAIN_CONF = """\
{user}daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    # Hostile globals, as in many nginx.conf files: the site must switch them off itself.
    gzip on;
    gzip_proxied any;
    gzip_min_length 1;
    gzip_types text/event-stream application/json;
    include {dir}/site.conf;
}}
"""


def render_site(listen_port: int, upstream: str | list[str]) -> str:
    """deploy/nginx.conf with the listen port and the upstream server address(es) rewritten
    (several: one `server` line each, as for several proxy hosts)."""
    text = SITE.read_text()
    servers = [upstream] if isinstance(upstream, str) else upstream
    lines = "\n".join(f"\\g<1>server {address};" for address in servers)
    text, n = re.subn(r"^(\s*)server\s+127\.0\.0\.1:8080\s*;", lines, text, flags=re.M)
    assert n == 1, "deploy/nginx.conf: expected one `server 127.0.0.1:8080;` line in the upstream block"
    text, n = re.subn(r"^(\s*)listen\s+80\s*;", rf"\g<1>listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert n == 1, "deploy/nginx.conf: expected one `listen 80;` line"
    return text


class NginxProcess:
    """nginx in the foreground with its config, pid, logs and temp files in `tmp`."""

    def __init__(self, tmp: Path, upstream: str | list[str], worker_connections: int = 256) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = tmp
        (tmp / "site.conf").write_text(render_site(self.port, upstream))
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers would drop to `nobody`
        (tmp / "nginx.conf").write_text(MAIN_CONF.format(user=user, dir=tmp,
                                                         worker_connections=worker_connections))
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> "NginxProcess":
        if not os.path.exists(NGINX):
            pytest.fail(f"nginx not found (looked for {NGINX}); install it: {INSTALL_NGINX}")
        self._out = open(self.dir / "stdout.log", "wb")
        self.proc = subprocess.Popen(  # its own process group: a failed start ends the workers too
            [NGINX, "-p", f"{self.dir}/", "-c", str(self.dir / "nginx.conf"), "-e", str(self.dir / "error.log")],
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_until_listening(timeout)
        except BaseException:
            kill_group(self.proc)
            self._out.close()
            raise
        return self

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.02)  # waiting for a process to bind: there is no event to wait on
        raise RuntimeError(f"nginx did not come up within {timeout:g} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            try:  # a worker the master left behind
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if hasattr(self, "_out"):
            self._out.close()
