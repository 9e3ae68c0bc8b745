"""Redis, PostgreSQL and RabbitMQ servers of one test, on free loopback ports, stopped and started by PID.

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
import uuid

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


def _rabbitmq_server_script() -> str:
    """The ``rabbitmq-server`` start script that runs the node in the foreground as the calling user.

    Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that changes to the
    ``rabbitmq`` user through ``su`` when called as root: the PID returned
    would be su's, and the environment that makes the node private would not
    all reach it. The script it wraps is called directly instead.
    """
    configured = os.environ.get("WS_TEST_RABBITMQ_SERVER")
    candidates = [configured] if configured else ["/usr/lib/rabbitmq/bin/rabbitmq-server",
                                                  shutil.which("rabbitmq-server") or ""]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("rabbitmq-server is not installed; set WS_TEST_RABBITMQ_SERVER")


class PrivateRabbitMQ:
    """A RabbitMQ node of this test only: its own node name, ports, epmd and data directory, run by PID.

    The machine's own node (``rabbit@localhost`` on 5672, epmd on 4369) is
    never contacted: the node registers with an ``epmd`` of its own on a
    free port (started here in the foreground, so that it does not outlive
    the test as a daemon), and nothing of ``/etc/rabbitmq`` is read. Queues
    and persistent messages are kept in ``workdir`` across a stop and start,
    as on a production broker.
    """

    def __init__(self, workdir: str | None = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="wstest-rabbit-")
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"wstest-{uuid.uuid4().hex[:12]}@localhost"
        self.logfile = os.path.join(self.workdir, "rabbitmq-server.out")
        self.process: subprocess.Popen | None = None
        self.epmd: subprocess.Popen | None = None
        self.groups: set[int] = set()  # every process group a start made (the script's PIDs)
        self.script = _rabbitmq_server_script()
        for name, text in (("rabbitmq-env.conf", ""), ("enabled_plugins", "[].\n"),
                           ("rabbitmq.conf", "log.console = false\nlog.file.level = info\n")):
            with open(os.path.join(self.workdir, name), "w", encoding="utf-8") as handle:
                handle.write(text)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _environment(self) -> dict[str, str]:
        # Inherited RABBITMQ_* or ERL_* variables (a shell that sourced the
        # machine's rabbitmq-env.conf) would point the node back at the machine's.
        env = {key: value for key, value in os.environ.items() if not key.startswith(("RABBITMQ_", "ERL_"))}
        join = os.path.join
        env.update({
            "HOME": self.workdir,  # the Erlang cookie is written there, not in the user's home
            "RABBITMQ_CONF_ENV_FILE": join(self.workdir, "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": join(self.workdir, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": join(self.workdir, "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": join(self.workdir, "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": join(self.workdir, "mnesia"),
            "RABBITMQ_LOG_BASE": join(self.workdir, "log"),
            "RABBITMQ_PID_FILE": join(self.workdir, "rabbitmq.pid"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        })
        return env

    def _start_epmd(self, env: dict[str, str]) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        binary = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        self.epmd = subprocess.Popen([binary, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def listening():
            if self.epmd.poll() is not None:
                raise RuntimeError(f"epmd exited with {self.epmd.returncode}")
            socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5).close()

        _wait_until(listening, f"epmd on port {self.epmd_port}", 10)

    def start(self, timeout: float = 90.0) -> None:
        """Start the node and return once it takes AMQP connections (a boot takes 5-10 s here)."""
        import kombu

        env = self._environment()
        self._start_epmd(env)
        with open(self.logfile, "ab") as log:
            # A session of its own: the script, beam.smp and its helpers share
            # one process group, the script's PID, which stop() clears.
            self.process = subprocess.Popen([self.script], env=env, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.groups.add(self.process.pid)

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}: {self.log_tail()}")
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            with kombu.Connection(self.url, connect_timeout=2) as connection:
                connection.ensure_connection(max_retries=1)

        try:
            _wait_until(ready, f"RabbitMQ node {self.nodename} on port {self.port}", timeout)
        except Exception:
            self.kill()
            raise

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM to the start script, which stops the node cleanly (queues and persistent messages kept)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self._clear_group()

    def kill(self) -> None:
        """SIGKILL to the node's whole process group: a crash, nothing flushed."""
        self._clear_group()

    def _clear_group(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # helpers left behind (erl_child_setup, inet_gethost)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.process = None

    def client(self):
        """A kombu connection to the node (the caller closes it)."""
        import kombu

        return kombu.Connection(self.url, connect_timeout=2)

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not those delivered and unacknowledged); 0 if it does not exist."""
        import amqp.exceptions

        with self.client() as connection:
            try:
                return connection.default_channel.queue_declare(queue=queue, passive=True).message_count
            except amqp.exceptions.NotFound:
                return 0

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except OSError:
            return ""

    def leftovers(self) -> list[str]:
        """``pid: command`` of every process still running for this node: in its process groups, or naming it."""
        marks = (self.nodename.split("@")[0], self.workdir, f"-port {self.epmd_port} ")
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    command = handle.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    state, _parent, group = handle.read().rsplit(b")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue
            if state == b"Z":  # dead, waiting for its new parent to reap it
                continue
            group = int(group)
            if group in self.groups or any(mark in command for mark in marks):
                found.append(f"{entry}: {command[:200]}")
        return found

    def cleanup(self) -> None:
        self.kill()
        if self.epmd is not None:
            if self.epmd.poll() is None:
                self.epmd.kill()
            self.epmd.wait(10)
            self.epmd = None
        shutil.rmtree(self.workdir, ignore_errors=True)
