"""Redis and PostgreSQL servers of one test, on free loopback ports, stopped and started by PID.

Fault tests break these, never the machine's shared services. The URL of
each is known before it first starts, so an app can be built against a
server that is down and brought up later.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
import sqlalchemy as sa


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not come up in {timeout:.0f} s: {exc}") from exc
            time.sleep(0.05)


class PrivateRedis:
    """A redis-server of this test only.

    ``persistent=True`` keeps an append-only file fsynced on every write in
    ``workdir``: what was queued before a stop is there after the restart,
    as on a production Redis, so a lost message is the producer's loss and
    not the test server's.
    """

    def __init__(self, workdir: str, persistent: bool = False):
        self.port = free_port()
        self.workdir = workdir
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent \
            else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ping():
            client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
            try:
                client.ping()
            finally:
                client.close()

        _wait_until(ping, f"redis-server on port {self.port}", 10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self) -> None:
        """SIGTERM: Redis writes out its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


def _postgres_bindir() -> str:
    configured = os.environ.get("WS_TEST_PG_BINDIR")
    if configured:
        return configured
    on_path = shutil.which("initdb")
    if on_path:
        return os.path.dirname(on_path)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries (initdb) not found; set WS_TEST_PG_BINDIR")
    return os.path.dirname(found[-1])


class PrivatePostgres:
    """A PostgreSQL cluster of this test only: initdb in a temporary directory, ``postgres`` run by PID.

    PostgreSQL refuses to run as root; as root the cluster belongs to the
    ``postgres`` system user, and connections still log in as ``root``
    (trust auth on the loopback port only).
    """

    user = "root"
    database = "postgres"

    def __init__(self):
        self.bindir = _postgres_bindir()
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="wstest-pg-")
        self.datadir = os.path.join(self.workdir, "data")
        self.logfile = os.path.join(self.workdir, "postgres.log")
        self.process: subprocess.Popen | None = None
        self._as = {"user": "postgres"} if os.geteuid() == 0 else {}
        if self._as:
            shutil.chown(self.workdir, "postgres")
        subprocess.run(
            [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", self.user, "-A", "trust",
             "--no-sync", "-E", "UTF8", "--locale", "C"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=self.workdir, **self._as)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> None:
        log = open(self.logfile, "ab")
        try:
            self.process = subprocess.Popen(
                [os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
                 # A test cluster: a crash may lose it, speed matters more.
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, **self._as)
        finally:
            log.close()
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)

        def connect():
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.log_tail()}")
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))

        try:
            _wait_until(connect, f"PostgreSQL on port {self.port}", 30)
        finally:
            engine.dispose()

    def stop(self, mode: str = "fast") -> None:
        """``fast`` (SIGINT): running transactions are aborted and clients disconnected; ``immediate`` (SIGQUIT)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
            self.process.wait(30)
        self.process = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)
