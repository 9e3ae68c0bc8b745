"""Helpers of tests/test_outbox.py: a private Redis server, outbox rows."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis
import sqlalchemy as sa


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server of this test only, on a free loopback port; stopped by its PID.

    ``url`` is known before the server starts, so an app can be pointed at
    a broker that is down and brought up later.
    """

    def __init__(self, workdir: str):
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None


def outbox_rows(engine: sa.Engine, app_name: str | None = None) -> list:
    """(id, task_name, sent_at) of every outbox row (of ``app_name``), oldest first."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("websauna_tasks_outbox"):
            return []
        query = "SELECT id, task_name, sent_at FROM websauna_tasks_outbox"
        params = {}
        if app_name is not None:
            query += " WHERE app = :app"
            params["app"] = app_name
        return [tuple(row) for row in conn.execute(sa.text(query + " ORDER BY created_at"), params)]
