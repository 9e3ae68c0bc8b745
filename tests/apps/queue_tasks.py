"""Tasks of the queue tests: each run leaves a row with its timing in ``ws_test_queue_runs``.

Rows are written on a connection of their own, in autocommit: a failing
run's transaction is rolled back, and its row must still count.
"""
from __future__ import annotations

import os
import time

from sqlalchemy import text
from transaction.interfaces import TransientError

from websauna_tasks import RetryableTransactionTask, WebsaunaTask, task
from websauna_tasks.db import get_engine

RUNS_TABLE = "ws_test_queue_runs"
CREATE_RUNS_TABLE = f"""
CREATE TABLE IF NOT EXISTS {RUNS_TABLE} (
    id serial PRIMARY KEY, label text NOT NULL, task_id text NOT NULL, retries int NOT NULL,
    started double precision NOT NULL, ended double precision, pid int NOT NULL, queue text
)"""


def _record(task, label: str, started: float, ended: float | None) -> None:
    info = task.request.delivery_info or {}
    with get_engine(task.get_request().registry).begin() as conn:
        conn.execute(text(f"INSERT INTO {RUNS_TABLE} (label, task_id, retries, started, ended, pid, queue) "
                          "VALUES (:label, :id, :retries, :started, :ended, :pid, :queue)"),
                     {"label": label, "id": task.request.id, "retries": task.request.retries,
                      "started": started, "ended": ended, "pid": os.getpid(), "queue": info.get("routing_key")})


@task(name="tests.queues.timed", base=WebsaunaTask, bind=True)
def timed(self, label: str, pause: float = 0.0) -> str:
    """Record when this run started and ended."""
    started = time.time()
    time.sleep(pause)
    _record(self, label, started, time.time())
    return label


@task(name="tests.queues.fails_until", base=WebsaunaTask, bind=True)
def fails_until(self, label: str, succeed_on: int = 0) -> int:
    """Record the run, then fail unless this is attempt ``succeed_on`` (0: always fail)."""
    attempt = self.request.retries + 1
    _record(self, label, time.time(), None)
    if attempt != succeed_on:
        raise RuntimeError(f"{label}: attempt {attempt} fails on purpose")
    return attempt


@task(name="tests.queues.own_retries", base=WebsaunaTask, bind=True, max_retries=1)
def own_retries(self, label: str) -> None:
    """Retries itself once (max_retries=1), then its error must be final whatever the queue allows."""
    _record(self, label, time.time(), None)
    try:
        raise ValueError(f"{label}: always fails")
    except ValueError as exc:
        raise self.retry(exc=exc, countdown=0.1)


@task(name="tests.queues.auto_retries", base=WebsaunaTask, bind=True, autoretry_for=(KeyError,),
      max_retries=2, retry_backoff=False, default_retry_delay=0.1)
def auto_retries(self, label: str) -> None:
    """autoretry_for KeyError, twice; the queue must not add attempts after Celery gives up."""
    _record(self, label, time.time(), None)
    raise KeyError(label)


@task(name="tests.queues.conflicting", base=RetryableTransactionTask, bind=True, retry_attempts=3)
def conflicting(self, label: str) -> None:
    """Three in-process conflict retries per run, each recorded; the run then fails."""
    _record(self, label, time.time(), None)
    raise TransientError(f"{label}: conflict")
