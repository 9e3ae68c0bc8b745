"""``async def`` task bodies, scanned only by tests.apps.extra_apps.async_main (tests/test_async_tasks.py)."""
import asyncio
import threading

from celery import current_task
from pyramid.threadlocal import get_current_request
from sqlalchemy import text

from tests.apps.sample_tasks import record_outside
from websauna_tasks import RetryableTransactionTask, TransactionalTask, WebsaunaTask, task
from websauna_tasks.db import get_engine


@task(name="tests.async.insert", base=TransactionalTask, bind=True)
async def async_insert(self, value, fail=False):
    """Write a row, give the loop a turn, then return (or fail): the row commits only on return."""
    request = self.get_request()
    request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                              {"id": self.request.id, "value": value})
    await asyncio.sleep(0)
    if fail:
        raise ValueError("asked to fail after writing")
    # Looked at after the await: the context survives the coroutine's suspension.
    return {
        "value": value,
        "task_id": self.request.id,
        "same_request": self.get_request() is request,
        "pyramid_current_request": get_current_request() is request,
        "current_task": current_task.name if current_task else None,
        "thread": threading.get_ident(),
    }


def _runs(request, key):
    with get_engine(request.registry).connect() as conn:
        return conn.execute(text("SELECT count(*) FROM ws_test_effects WHERE task_id = :id AND value = 'run'"),
                            {"id": key}).scalar_one()


@task(name="tests.async.conflict_once", base=RetryableTransactionTask, bind=True, retry_attempts=5)
async def async_conflict_once(self, key):
    """Read the counter, let another transaction change it (first run only), then write it.

    Under SERIALIZABLE (or REPEATABLE READ) the write of the first run fails
    with SQLSTATE 40001; the retry reads the new value and commits.
    """
    request = self.get_request()
    record_outside(request, key, "run")
    runs = _runs(request, key)
    value = request.dbsession.execute(text("SELECT value FROM ws_test_counter WHERE id = 1")).scalar_one()
    if runs == 1:
        with get_engine(request.registry).begin() as conn:
            conn.execute(text("UPDATE ws_test_counter SET value = value + 100 WHERE id = 1"))
    await asyncio.sleep(0)
    request.dbsession.execute(text("UPDATE ws_test_counter SET value = :v WHERE id = 1"), {"v": value + 1})
    return value + 1


@task(name="tests.async.autoretry", base=WebsaunaTask, bind=True, autoretry_for=(KeyError,), max_retries=3,
      default_retry_delay=0)
async def async_autoretry(self, key):
    """Fails on the first attempt: Celery's autoretry_for must see the exception raised inside the coroutine."""
    record_outside(self.get_request(), key, f"attempt {self.request.retries}")
    await asyncio.sleep(0)
    if self.request.retries == 0:
        raise KeyError(key)
    return self.request.retries


async def _doubled(value):
    await asyncio.sleep(0)
    return value * 2


@task(name="tests.async.returns_coroutine")
def returns_coroutine(value):
    """A sync body that returns a coroutine without awaiting it."""
    return _doubled(value)
