"""A real PostgreSQL server for the tests: its own cluster in a temporary directory, on a free
loopback port, started and stopped (and restarted, for outage tests) by the test run.

`.ci/run` installs PostgreSQL from the distribution's packages; the binaries are found in
`/usr/lib/postgresql/<version>/bin` or on PATH.  PostgreSQL refuses to run as root, so as
root the cluster belongs to the `postgres` user the package creates.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from support.processes import free_port


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (.ci/run installs it)")
    return on_path


class PostgresServer:
    """One cluster, trust authentication on loopback, one database per `database()`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.port = free_port()
        self.log = self.directory / "postgres.log"
        self._user = "postgres" if os.geteuid() == 0 else None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "PostgresServer":
        if not self.data.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            self._own(self.directory)
            self._run(_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-sync")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30",
                  "-o", f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=200", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                      check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new, empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def sql(self, statement: str, database: str = "postgres") -> str:
        done = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               "-d", database, "-At", "-v", "ON_ERROR_STOP=1", "-c", statement],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout.strip()

    # -- helpers ----------------------------------------------------------------------------------

    def _own(self, path: Path) -> None:
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *command: str, check: bool = True) -> None:
        if self._user is not None:
            command = ("runuser", "-u", self._user, "--", *command)
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}\n{log}")


def wait_until_down(server: PostgresServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (server.data / "postmaster.pid").exists():
        if time.monotonic() > deadline:
            raise AssertionError("PostgreSQL did not stop")
        time.sleep(0.05)


def wait_for_a_lock_wait(url: str, timeout: float = 10.0) -> None:
    """Until a session of this database waits for a lock (what a test means by "the other
    transaction is blocked now"), as PostgreSQL itself reports it."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as watcher:
        while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'").fetchone()[0]:
            if time.monotonic() > deadline:
                raise AssertionError("no session came to wait for a lock")
            time.sleep(0.01)
