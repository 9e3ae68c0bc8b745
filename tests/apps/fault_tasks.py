"""Tasks of the fault tests: each run's effect is one row of ``fault_effects`` with the run's key.

``fault_effects`` has no unique key on purpose: a second committed run of
one key shows up as a second row instead of an error.
"""
from __future__ import annotations

from sqlalchemy import text

from websauna_tasks import RetryableTransactionTask, TransactionalTask, task

EFFECTS_DDL = ("CREATE TABLE IF NOT EXISTS fault_effects "
               "(id bigserial PRIMARY KEY, key text NOT NULL, pid int NOT NULL, at timestamptz DEFAULT now())")


def _record(task_self, key: str) -> str:
    import os

    task_self.get_request().dbsession.execute(
        text("INSERT INTO fault_effects (key, pid) VALUES (:key, :pid)"), {"key": key, "pid": os.getpid()})
    return key


@task(name="tests.fault.effect", base=TransactionalTask, bind=True, idempotent=True)
def effect(self, key):
    return _record(self, key)


@task(name="tests.fault.slow_effect", base=RetryableTransactionTask, bind=True, idempotent=True)
def slow_effect(self, key, pause=0.0):
    """Holds its transaction open ``pause`` seconds (in the database), so a server restart catches it mid-run."""
    if pause:
        self.get_request().dbsession.execute(text("SELECT pg_sleep(:pause)"), {"pause": pause})
    return _record(self, key)


STARTS_DDL = ("CREATE TABLE IF NOT EXISTS fault_starts "
              "(id bigserial PRIMARY KEY, key text NOT NULL, pid int NOT NULL, at timestamptz DEFAULT now())")


@task(name="tests.fault.paced_effect", base=TransactionalTask, bind=True, idempotent=True)
def paced_effect(self, key, pause=0.0, after_commit_pause=0.0):
    """``pause`` seconds before the effect and ``after_commit_pause`` after its commit, where a SIGKILL lands.

    Each start is written outside the run's transaction, so a run that a
    kill cut off still counts as started (a delivery that finds its
    done-row skips the body and never gets here).
    """
    import os
    import time

    from websauna_tasks.db import get_engine

    request = self.get_request()
    with get_engine(request.registry).begin() as conn:
        conn.execute(text("INSERT INTO fault_starts (key, pid) VALUES (:key, :pid)"), {"key": key, "pid": os.getpid()})
    time.sleep(pause)
    _record(self, key)
    if after_commit_pause:
        # The window between the commit and the acknowledgement: a worker
        # killed in it leaves a committed run for the broker to deliver again.
        request.tm.get().addAfterCommitHook(lambda ok: time.sleep(after_commit_pause))
    return key
