"""Test helpers, also loaded as a pytest plugin (entry point ``websauna_tasks``).

- ``wait_for(predicate, timeout=30)``: poll until an effect appears.

Fixtures:

- ``ws_celery_worker_factory``: start a real ``ws-celery INI -- worker``
  process for integration tests and stop it afterwards.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import typing as t

import pytest


def wait_for(predicate: t.Callable[[], t.Any], timeout: float = 30.0, interval: float = 0.1,
             describe: t.Callable[[], str] = lambda: "") -> t.Any:
    """Poll ``predicate()`` until it returns something truthy, and return that.

    For integration tests whose effect appears when a worker gets to it:
    fails with ``AssertionError`` (and ``describe()``, e.g. the worker's log)
    after ``timeout`` seconds rather than sleeping a fixed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s\n{describe()}".rstrip())
        time.sleep(interval)


class WorkerProcess:
    """A ``ws-celery INI -- <command>`` subprocess with its output in a log file."""

    def __init__(self, ini: str, command: t.Sequence[str], log_path: str, env: dict[str, str] | None = None):
        self.ini = ini
        self.command = list(command)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        argv = [sys.executable, "-m", "websauna_tasks.cli", ini, "--", *self.command]
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ws-celery exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"ws-celery did not print {text!r} within {timeout}s:\n{self.output()[-4000:]}")

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting for it."""
        if self.process.poll() is None:
            # SIGTERM to the main process only, which stops its own pool.
            # Signalling the whole group kills pool children while one may
            # hold the pool's queue lock, and billiard's parent then hangs on
            # that lock at exit (or forks replacements and keeps working).
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        """Warm shutdown, then SIGKILL to the whole group after ``timeout``."""
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


@pytest.fixture
def ws_celery_worker_factory(tmp_path: t.Any) -> t.Iterator[t.Callable[..., WorkerProcess]]:
    """Start ``ws-celery INI -- worker ...`` processes; all are stopped at teardown.

    ``factory(ini, "worker", "-c", "2")`` returns a :class:`WorkerProcess`
    once the worker reports it is ready.
    """
    started: list[WorkerProcess] = []

    def factory(ini: str, *command: str, ready: str | None = "ready.", env: dict[str, str] | None = None,
                timeout: float = 60.0) -> WorkerProcess:
        command = command or ("worker",)
        if command[0] == "worker" and ready == "ready." and not any(
                arg in ("-l", "--loglevel") or arg.startswith("--loglevel=") for arg in command):
            # Celery prints "ready." at INFO only.
            command = (*command, "-l", "info")
        log_path = str(tmp_path / f"ws-celery-{len(started)}.log")
        process = WorkerProcess(ini, command, log_path, env=env)
        started.append(process)
        if ready:
            process.wait_for_output(ready, timeout=timeout)
        return process

    yield factory
    # Signal all first so their shutdowns overlap, then wait for each.
    for process in started:
        process.terminate()
    for process in started:
        process.stop()
