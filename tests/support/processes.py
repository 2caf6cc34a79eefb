"""The proxy as the tests run it: gunicorn with deploy/gunicorn.conf.py, in a process group.

`ProxyProcess` starts one instance on a free port (1 worker, 50 ms heartbeat by default),
waits until `/health` answers, and reads its usage rows straight from the SQLite file after
`/health?flush=1` has made the worker commit its queue.  A start that fails kills the whole
process group: no gunicorn outlives a test that could not use it.

Proxy variables (`http_proxy`, `HTTPS_PROXY`, `all_proxy`, ...) would send the tests' loopback
traffic, and the proxy's own traffic to the fake upstream, to a proxy server: every
environment given to a server leaves them out (`without_proxy_variables`), and the test
process drops them from its own (`drop_proxy_variables`, called by conftest).
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
from typing import TYPE_CHECKING

import requests

ROOT = Path(__file__).resolve().parents[2]
GUNICORN_CONF = ROOT / "deploy" / "gunicorn.conf.py"
HEARTBEAT = 0.05

PROXY_VARIABLES = tuple(name for base in ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy",
                                          "no_proxy")
                        for name in (base, base.upper()))


def without_proxy_variables(env) -> dict:
    """A copy of `env` without the variables that route HTTP through a proxy server."""
    return {k: v for k, v in env.items() if k not in PROXY_VARIABLES}


def drop_proxy_variables(environ=os.environ) -> None:
    for name in PROXY_VARIABLES:
        environ.pop(name, None)


def local_session() -> requests.Session:
    """A requests Session that ignores the environment (proxy variables, .netrc): the tests
    talk to loopback servers only."""
    session = requests.Session()
    session.trust_env = False
    return session


def http_get(url: str, **kwargs) -> requests.Response:
    with local_session() as session:
        return session.get(url, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = 10.0, every: float = 0.02):
    """Poll a condition another thread or process brings about (one that gives the test no
    event to wait on: a log line, a row, a scraped value); its first truthy value."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        time.sleep(every)
    return found


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 20.0,
                       describe=lambda: "", verify: bool | str = True) -> None:
    """Until `GET /health` answers 200; fails at once if the server process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {describe()}")
        try:
            if http_get(url + "/health", timeout=0.5, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.05)  # waiting for a process to bind: there is no event to wait on
    raise RuntimeError(f"the server did not come up within {timeout:g} s: {describe()}")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the group `proc` leads (start_new_session=True), and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


class ProxyProcess:
    """gunicorn -c deploy/gunicorn.conf.py proxy.wsgi:application, on a free port.

    `app` serves another module's application instead (found on `pythonpath`), with the
    proxy's own endpoints below `prefix` (the proxy mounted inside a site)."""

    def __init__(self, upstream_url: str, tmp: Path, workers: int = 1, threads: int = 64,
                 open_files: int | None = None, tls: tuple[Path, Path] | None = None,
                 app: str = "proxy.wsgi:application", prefix: str = "",
                 pythonpath: tuple[str, ...] = (), **env: str) -> None:
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.app_spec = app
        self.proxy_url = self.url + prefix  # where /health and the /v1 endpoints are
        self.verify: bool | str = str(tls[0]) if tls else True  # for requests' `verify=`
        self.db_path = str(tmp / f"usage-{self.port}.db")
        self.log_path = tmp / f"gunicorn-{self.port}.log"
        self.env = without_proxy_variables(os.environ)
        self.env.update({
            "LLM_PROXY_ANTHROPIC_BASE_URL": upstream_url,
            "LLM_PROXY_OPENAI_BASE_URL": upstream_url,
            "LLM_PROXY_DB": self.db_path,
            "LLM_PROXY_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "LLM_PROXY_IDLE_TIMEOUT": "5",
            "LLM_PROXY_BIND": f"127.0.0.1:{self.port}",
            "LLM_PROXY_WORKERS": str(workers),
            "LLM_PROXY_THREADS": str(threads),
            # Tests repeat identical requests on purpose: replay is tested where it is asked for.
            "LLM_PROXY_REPLAY_WINDOW": "0",
            "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT)]),
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
            [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), self.app_spec],
            env=self.env, cwd=str(ROOT), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=self._limit_files if self.open_files else None)
        try:
            wait_until_healthy(self.proxy_url, self.proc, timeout, describe=self.log,
                               verify=self.verify)
        except BaseException:  # not up (or the test was interrupted): leave nothing behind
            kill_group(self.proc)
            self._log.close()
            raise
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def flush(self) -> None:
        http_get(self.proxy_url + "/health", params={"flush": "1"}, timeout=10, verify=self.verify)

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
        return http_get(self.proxy_url + "/health", timeout=5, verify=self.verify).json()

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


if TYPE_CHECKING:
    from support.rawhttp import RawConnection


def connections_to_every_worker(proxy: ProxyProcess) -> list[tuple[int, "RawConnection"]]:
    """A kept-alive connection to each worker: each is opened while the workers already
    reached are stopped (SIGSTOP, for the few milliseconds it takes), so another one must
    accept it.  No admission runs meanwhile: a stopped worker holds no one up."""
    from support.rawhttp import RawConnection, RawResponse

    expected = int(proxy.env.get("LLM_PROXY_WORKERS", "1"))
    deadline = time.monotonic() + 20
    while True:  # gunicorn forks its workers one after the other
        workers = [p for p in group_members(proxy.proc.pid) if p != proxy.proc.pid]
        if len(workers) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    reached: list[tuple[int, RawConnection]] = []
    while len(reached) < len(workers):
        for pid, _ in reached:
            os.kill(pid, signal.SIGSTOP)
        try:
            conn = RawConnection(proxy.url)
            answer = RawResponse(proxy.url, "/health", method="GET", conn=conn).read_head()
            answer.read_all()
        finally:
            for pid, _ in reached:
                os.kill(pid, signal.SIGCONT)
        assert answer.json()["pid"] not in [pid for pid, _ in reached]
        reached.append((answer.json()["pid"], conn))
    return reached
