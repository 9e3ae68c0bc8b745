"""What the worker benchmark needs around it: a private database, worker subprocesses, cleanup."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import typing as t
import uuid

import redis
import sqlalchemy
from sqlalchemy import text

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The same worker options for both sides; only the way the app is loaded differs.
WORKER_OPTIONS = ["worker", "-c", "2", "-P", "prefork", "-l", "warning",
                  "--without-mingle", "--without-gossip", "--without-heartbeat"]


@contextlib.contextmanager
def private_database(admin_url: str, synchronous_commit: bool = True) -> t.Iterator[str]:
    """A PostgreSQL database of its own for one run, dropped afterwards (never a shared one).

    ``synchronous_commit=False`` sets that PostgreSQL option on this database
    only: commits stop waiting for the WAL flush (what --async-commit shows).
    """
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"wsbench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        if not synchronous_commit:
            conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    try:
        yield sqlalchemy.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def delete_queue_keys(client: redis.Redis, queue: str) -> None:
    """Remove a private queue: its list, its priority lists and kombu's binding sets for it.

    Celery's default queue has an exchange of the same name, which names the
    binding sets; kombu keeps priorities 3, 6 and 9 in lists queue + "\x06\x16" + step.
    """
    client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}",
                  *(f"{queue}\x06\x16{step}" for step in (3, 6, 9)))


class Worker:
    """A worker subprocess in its own process group, output in a log file."""

    def __init__(self, argv: list[str], log_path: pathlib.Path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
                                        env={**os.environ, **env}, start_new_session=True)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # warm shutdown of the worker and its children
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self._log.close()


class WorkerGroup:
    """Several worker processes that measure.worker_run handles as one (the fast profile's solo workers)."""

    def __init__(self, workers: list[Worker]):
        self.workers = workers

    def check_alive(self) -> None:
        for worker in self.workers:
            worker.check_alive()

    def output(self) -> str:
        return "\n".join(worker.output() for worker in self.workers)

    def stop(self, timeout: float = 30.0) -> None:
        for worker in self.workers:
            worker.stop(timeout)


def raw_worker(log_path: pathlib.Path, env: dict[str, str], *extra: str) -> Worker:
    return Worker([sys.executable, "-m", "celery", "-A", "bench.raw_app", *WORKER_OPTIONS, *extra], log_path, env)


def ws_worker(ini: pathlib.Path, log_path: pathlib.Path, env: dict[str, str], *extra: str) -> Worker:
    # ``python -m websauna_tasks.cli`` is the ws-celery console script.
    return Worker([sys.executable, "-m", "websauna_tasks.cli", str(ini), "--", *WORKER_OPTIONS, *extra],
                  log_path, env)


def wait_for_key(client: redis.Redis, key: str, worker: Worker, timeout: float) -> float:
    """The float a marker task stored under ``key``, polling until it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.get(key)
        if value is not None:
            return float(value)
        worker.check_alive()
        time.sleep(0.05)
    raise TimeoutError(f"no {key} after {timeout}s; worker output:\n{worker.output()[-3000:]}")


def wait_for_length(client: redis.Redis, key: str, length: int, worker: Worker | WorkerGroup,
                    timeout: float) -> None:
    """Poll until the list ``key`` holds ``length`` items (tasks RPUSH one each)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.llen(key) >= length:
            return
        worker.check_alive()
        time.sleep(0.05)
    raise TimeoutError(f"{client.llen(key)} of {length} in {key} after {timeout}s; worker output:\n"
                       f"{worker.output()[-3000:]}")
