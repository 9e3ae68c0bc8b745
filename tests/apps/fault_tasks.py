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
