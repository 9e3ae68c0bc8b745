"""Tasks of tests/test_crash_safety.py and tests/test_idempotency.py.

Every run first leaves a ``start`` row on a connection of its own (it
survives the run's abort or a SIGKILL), then writes its effect in the run's
transaction: ``ws_test_effects (task_id = key, value = 'effect')``.
"""
from __future__ import annotations

import os
import time

from sqlalchemy import text

from websauna_tasks import RetryableTransactionTask, ScheduleOnCommitTask, TransactionalTask, task
from websauna_tasks.db import get_engine


def _started(task_self, key: str) -> int:
    """Record a start outside the transaction; returns how many starts ``key`` has had."""
    with get_engine(task_self.get_request().registry).begin() as conn:
        conn.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:key, :value)"),
                     {"key": key, "value": f"start:{os.getpid()}"})
        return conn.execute(text("SELECT count(*) FROM ws_test_effects WHERE task_id = :key "
                                 "AND value LIKE 'start:%'"), {"key": key}).scalar_one()


def _effect(task_self, key: str, pause: float, after_commit_pause: float) -> str:
    request = task_self.get_request()
    time.sleep(pause)
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:key, 'effect')"),
                              {"key": key})
    if after_commit_pause:
        # Widens the gap between the commit and the acknowledgement, where a
        # killed worker leaves a committed run to be delivered again.
        request.tm.get().addAfterCommitHook(lambda ok: time.sleep(after_commit_pause))
    return key


@task(name="tests.rel.slow_effect", base=TransactionalTask, bind=True)
def slow_effect(self, key, pause=0.0, after_commit_pause=0.0):
    _started(self, key)
    return _effect(self, key, pause, after_commit_pause)


@task(name="tests.rel.idempotent_effect", base=TransactionalTask, bind=True, idempotent=True)
def idempotent_effect(self, key, pause=0.0, after_commit_pause=0.0):
    _started(self, key)
    return _effect(self, key, pause, after_commit_pause)


@task(name="tests.rel.idempotent_retryable", base=RetryableTransactionTask, bind=True, idempotent=True)
def idempotent_retryable(self, key, pause=0.0):
    _started(self, key)
    return _effect(self, key, pause, 0.0)


@task(name="tests.rel.idempotent_fails_first", base=TransactionalTask, bind=True, idempotent=True)
def idempotent_fails_first(self, key):
    """Writes its effect, then raises on its first start: that run must leave nothing behind."""
    starts = _started(self, key)
    _effect(self, key, 0.0, 0.0)
    if starts == 1:
        raise RuntimeError(f"first run of {key} fails")
    return key


@task(name="tests.rel.not_acks_late", base=TransactionalTask, bind=True, acks_late=False)
def not_acks_late(self, key):
    return key


@task(name="tests.rel.on_commit", base=ScheduleOnCommitTask)
def on_commit(key):
    return key
