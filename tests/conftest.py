"""Shared fixtures: the scripted fake upstream and the proxy under real gunicorn.

`proxy` is one gunicorn instance (1 worker, 50 ms heartbeat) shared by the session and
pointed at the session's fake upstream; `start_proxy(**env)` starts a private instance
for tests that need other settings or that kill it.  Usage rows are read straight from
the SQLite file after `/health?flush=1` has made the worker commit its queue.  The helpers
themselves live in tests/support/ (see its __init__).

Proxy variables in the environment (`http_proxy`, `HTTPS_PROXY`, `all_proxy`, ...) are
dropped before anything runs: the tests' loopback traffic, the SDK clients' and the proxy's
own (its environment is built from this one) must never go to a proxy server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.fake import FakeUpstream  # noqa: E402
from support.processes import ProxyProcess, drop_proxy_variables  # noqa: E402
from support.rawhttp import close_raw_clients  # noqa: E402

# `pytester` runs test files as a user's suite would (the proxy's pytest plugin among them).
pytest_plugins = ["pytester"]

drop_proxy_variables()


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
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed; install it: apt-get install -y openssl")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server for the session (in a directory of its own: the cluster
    belongs to the `postgres` user when the tests run as root)."""
    import shutil
    import tempfile

    from support.postgres import PostgresServer

    directory = tempfile.mkdtemp(prefix="llm-proxy-pg-")
    os.chmod(directory, 0o755)
    server = PostgresServer(Path(directory) / "cluster").start()
    yield server
    server.stop("immediate")
    shutil.rmtree(directory, ignore_errors=True)


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
