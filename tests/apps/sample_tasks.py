"""Tasks used by the tests (scanned by tests/appfactory.py)."""
import json
import os
import time

import transaction
from pyramid.threadlocal import get_current_request
from sqlalchemy import text
from transaction.interfaces import TransientError

from websauna_tasks import (
    RetryableTransactionTask,
    ScheduleOnCommitTask,
    TransactionalTask,
    WebsaunaTask,
    task,
)
from websauna_tasks.db import get_engine
from websauna_tasks.registry import get_celery
from websauna_tasks.state import registry_of


@task(name="tests.record", base=ScheduleOnCommitTask, bind=True)
def record(self, value, table="ws_test_effects"):
    """Write one row in its own transaction: the visible effect of a run."""
    request = self.get_request()
    with request.tm:
        request.dbsession.execute(
            text(f"INSERT INTO {table} (task_id, value) VALUES (:id, :value)"),
            {"id": self.request.id, "value": str(value)},
        )
    return value


@task(name="tests.add")
def add(a, b):
    return a + b


@task(name="tests.transactional_insert", base=TransactionalTask, bind=True)
def transactional_insert(self, value, fail=False):
    request = self.get_request()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": self.request.id, "value": str(value)})
    if fail:
        raise ValueError("asked to fail")
    return value


@task(name="tests.increment", base=RetryableTransactionTask, bind=True, retry_attempts=50)
def increment(self, counter_id):
    request = self.get_request()
    row = request.dbsession.execute(text("SELECT value FROM ws_test_counter WHERE id = :id"), {"id": counter_id}).one()
    request.dbsession.execute(text("UPDATE ws_test_counter SET value = :v WHERE id = :id"),
                              {"v": row.value + 1, "id": counter_id})
    return row.value + 1


@task(name="tests.route_url", base=WebsaunaTask, bind=True)
def route_url(self):
    return self.get_request().route_url("home")


@task(name="tests.boom", base=ScheduleOnCommitTask)
def boom():
    raise RuntimeError("boom from an eager task")


# --- Worker side: request per run, retries, leaks (tests/test_worker_request.py, test_retryable.py, test_leaks.py)



#: Requests seen by ``inspect_request`` in this process (in-process tests look at them after the run).
observed_requests = []

# A mark left on objects a run has used: a later run that finds it got a recycled object.
_SEEN_MARK = "_ws_test_seen_by_a_run"


def record_outside(request, key, value):
    """Write a row on a connection of its own, so it survives the run's abort."""
    with get_engine(request.registry).begin() as conn:
        conn.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                     {"id": key, "value": str(value)})


def _first_use(obj):
    fresh = not getattr(obj, _SEEN_MARK, False)
    setattr(obj, _SEEN_MARK, True)
    return fresh


@task(name="tests.inspect_request", base=TransactionalTask, bind=True)
def inspect_request(self, label):
    """Commit a JSON report of the run's request; its finished callback reports the close."""
    request = self.get_request()
    observed_requests.append(request)
    session = request.dbsession
    engine = get_engine(request.registry)
    seen = {
        "label": label,
        "pid": os.getpid(),
        "backend_pid": session.execute(text("SELECT pg_backend_pid()")).scalar_one(),
        "registry_is_app": request.registry is registry_of(self.app),
        "celery_is_app": get_celery(request.registry) is self.app,
        "current_request": get_current_request() is request,
        "request_fresh": _first_use(request),
        "tm_fresh": _first_use(request.tm),
        "tm_explicit": request.tm.explicit,
        "tm_is_thread_default": request.tm is transaction.manager,
        "home": request.route_url("home"),
    }
    session.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                    {"id": self.request.id, "value": json.dumps(seen)})

    def report_close(closed_request):
        # Runs after the session's own callback (registered first, on first use of dbsession).
        closed = {"session_in_transaction": session.in_transaction(), "checked_out": engine.pool.checkedout()}
        record_outside(closed_request, self.request.id, "closed:" + json.dumps(closed))

    request.add_finished_callback(report_close)
    return seen


@task(name="tests.whoami", base=TransactionalTask, bind=True)
def whoami(self, pause=0.0):
    """Record which pool process and which PostgreSQL backend ran this."""
    request = self.get_request()
    backend_pid = request.dbsession.execute(text("SELECT pg_backend_pid()")).scalar_one()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": "whoami", "value": f"{os.getpid()}:{backend_pid}"})
    time.sleep(pause)  # keeps one child busy so the other takes the next message
    return backend_pid


class ConflictCountingTask(RetryableTransactionTask):
    """Records every conflict retry outside the transaction, so tests can count them."""

    def on_conflict_retry(self, attempt, exc):
        record_outside(self.get_request(), self.request.id, f"conflict:{attempt}:{type(exc).__name__}")


@task(name="tests.counted_increment", base=ConflictCountingTask, bind=True, retry_attempts=100)
def counted_increment(self, counter_id):
    request = self.get_request()
    value = request.dbsession.execute(text("SELECT value FROM ws_test_counter WHERE id = :id"),
                                      {"id": counter_id}).scalar_one()
    request.dbsession.execute(text("UPDATE ws_test_counter SET value = :v WHERE id = :id"),
                              {"v": value + 1, "id": counter_id})
    return value + 1


def _fail_transiently(task_self, key, failures):
    """Count this run outside the transaction, write inside it, fail the first ``failures`` runs."""
    request = task_self.get_request()
    record_outside(request, key, "run")
    with get_engine(request.registry).connect() as conn:
        runs = conn.execute(text("SELECT count(*) FROM ws_test_effects WHERE task_id = :id AND value = 'run'"),
                            {"id": key}).scalar_one()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": key, "value": f"written by run {runs}"})
    if runs <= failures:
        raise TransientError(f"run {runs} of {key} conflicts")
    return runs


@task(name="tests.transient_until", base=RetryableTransactionTask, bind=True)
def transient_until(self, key, failures):
    """Attempts from the websauna_tasks.retry_attempts setting (default 3)."""
    return _fail_transiently(self, key, failures)


@task(name="tests.transient_until_7", base=RetryableTransactionTask, bind=True, retry_attempts=7)
def transient_until_7(self, key, failures):
    """Attempts from the task option."""
    return _fail_transiently(self, key, failures)


@task(name="tests.duplicate_row", base=RetryableTransactionTask, bind=True, retry_attempts=5)
def duplicate_row(self, key, value):
    """A real, non-transient database error (unique violation, SQLSTATE 23505)."""
    request = self.get_request()
    record_outside(request, key, "run")
    request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES (:v)"), {"v": value})


@task(name="tests.fails_hard", base=RetryableTransactionTask, bind=True, retry_attempts=5)
def fails_hard(self, key):
    record_outside(self.get_request(), key, "run")
    raise ValueError("not a conflict")


@task(name="tests.conflict")
def conflict():
    raise TransientError("conflict in an eager task")
