"""Shared fixtures: the scripted fake upstream and the proxy under real gunicorn.

`proxy` is one gunicorn instance (1 worker, 50 ms heartbeat) shared by the session and
pointed at the session's fake upstream; `start_proxy(**env)` starts a private instance
for tests that need other settings or that kill it.  Usage rows are read straight from
the SQLite file after `/health?flush=1` has made the worker commit its queue.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))

from fakeupstream import FakeUpstream  # noqa: E402
from rawhttp import close_raw_clients  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
HEARTBEAT = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 20.0,
                       describe=lambda: "", verify: bool | str = True) -> None:
    """Until `GET /health` answers 200; fails at once if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {describe()}")
        try:
            if requests.get(url + "/health", timeout=0.5, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.05)  # waiting for a process to bind: there is no event to wait on
    raise RuntimeError(f"the server did not come up: {describe()}")


class ProxyProcess:
    """gunicorn -c deploy/gunicorn.conf.py proxy.wsgi:application, on a free port."""

    def __init__(self, upstream_url: str, tmp: Path, workers: int = 1, threads: int = 64,
                 open_files: int | None = None, tls: tuple[Path, Path] | None = None,
                 **env: str) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify: bool | str = str(tls[0]) if tls else True  # for requests' `verify=`
        self.db_path = str(tmp / f"usage-{self.port}.db")
        self.log_path = tmp / f"gunicorn-{self.port}.log"
        self.env = dict(os.environ)
        self.env.update({
            "LLM_PROXY_ANTHROPIC_BASE_URL": upstream_url,
            "LLM_PROXY_OPENAI_BASE_URL": upstream_url,
            "LLM_PROXY_DB": self.db_path,
            "LLM_PROXY_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "LLM_PROXY_IDLE_TIMEOUT": "5",
            "LLM_PROXY_BIND": f"127.0.0.1:{self.port}",
            "LLM_PROXY_WORKERS": str(workers),
            "LLM_PROXY_THREADS": str(threads),
            "PYTHONPATH": str(ROOT),
        })
        if tls:  # gunicorn itself speaks TLS (the deployment leaves it to nginx)
            self.env["GUNICORN_CMD_ARGS"] = f"--certfile {tls[0]} --keyfile {tls[1]}"
        self.env.update({k: str(v) for k, v in env.items()})
        self.db_path = self.env["LLM_PROXY_DB"]
        if "LLM_PROXY_CONFIG" not in env:
            self.env.pop("LLM_PROXY_CONFIG", None)
        self.open_files = open_files  # a lower limit of file descriptors, for tests that run out
        self.proc: subprocess.Popen | None = None

    def _limit_files(self) -> None:
        if self.open_files is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    def start(self, timeout: float = 20.0) -> "ProxyProcess":
        if self.proc is not None:
            raise RuntimeError("this proxy was started already (a second start would leak it)")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(  # its own process group: stop() can end the workers too
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "proxy.wsgi:application"],
            env=self.env, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self._limit_files if self.open_files else None)
        wait_until_healthy(self.url, self.proc, timeout, describe=self.log, verify=self.verify)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def flush(self) -> None:
        requests.get(self.url + "/health", params={"flush": "1"}, timeout=10, verify=self.verify)

    def rows(self, where: str = "1=1", params: tuple = ()) -> list[dict]:
        if not os.path.exists(self.db_path):
            return []
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute(f"SELECT * FROM usage_records WHERE {where}", params)]
        except sqlite3.OperationalError:
            return []
        finally:
            conn.close()

    def row(self, request_id: str, timeout: float = 10.0) -> dict:
        """The usage row of one request, once the worker has finalized and written it."""
        deadline = time.monotonic() + timeout
        while True:
            self.flush()  # blocks in the worker until its queue is committed
            found = self.rows("request_id = ?", (request_id,))
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no usage row for {request_id}")

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5, verify=self.verify).json()

    def worker_peak_rss(self) -> int:
        """The worker's peak resident memory so far, in bytes (one worker)."""
        return peak_rss(self.health()["pid"])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            try:  # a worker the master left behind (a test that SIGKILLed it, say)
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if hasattr(self, "_log"):
            self._log.close()


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: a filesystem a test can fill up or mount read-only (needs root, as CI)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_filesystem(directory) -> str:
    """Fill the filesystem of `directory` to the last byte; returns the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return path


def remount(path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def fake():
    upstream = FakeUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(autouse=True)
def _clean_fake(request):
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
    yield


@pytest.fixture(scope="session")
def proxy(fake, tmp_path_factory):
    server = ProxyProcess(fake.url, tmp_path_factory.mktemp("proxy")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _close_raw_clients():
    """Raw test clients are closed after each test (an idle keep-alive connection would
    only delay the shutdown of a private proxy: gunicorn waits for it)."""
    yield
    close_raw_clients()


@pytest.fixture
def start_proxy(fake, tmp_path):
    started: list[ProxyProcess] = []

    def start(**kwargs) -> ProxyProcess:
        server = ProxyProcess(kwargs.pop("upstream_url", fake.url), tmp_path, **kwargs).start()
        started.append(server)
        return server

    yield start
    close_raw_clients()
    for server in started:
        server.stop()
