"""``async def`` task bodies: same transactions, requests and results as sync ones, eagerly and in a worker."""
from __future__ import annotations

import asyncio
import threading

import pytest
import transaction
from celery.result import AsyncResult
from sqlalchemy import text

from tests.apps import async_tasks
from tests.apps.extra_apps import async_main, write_ini
from tests.test_worker_request import effect_rows
from websauna_tasks import TransactionalTask, get_celery
from websauna_tasks.testing import wait_for


def values(db) -> list[str]:
    return [value for _, value in effect_rows(db)]


def runs_of(db, key: str) -> int:
    return sum(1 for _, value in effect_rows(db, key) if value == "run")


def counter(db) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT value FROM ws_test_counter WHERE id = 1")).scalar_one()


@pytest.fixture
def counter_row(db):
    with db.begin() as conn:
        conn.execute(text("INSERT INTO ws_test_counter (id, value) VALUES (1, 0)"))


def app_settings(database_url: str, celery: dict) -> dict[str, str]:
    # SERIALIZABLE: the conflict task's second write must fail with 40001, not silently overwrite.
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
            "sqlalchemy.isolation_level": "SERIALIZABLE"}


@pytest.fixture
def eager_app(database_url, db):
    return async_main({}, **app_settings(database_url, {"broker_url": "memory://", "task_always_eager": True}))


# -- the body becomes synchronous at class creation ------------------------------------------------------------------

def test_async_run_of_a_task_class_is_made_synchronous():
    class Doubler(TransactionalTask):
        async def run(self, value):
            await asyncio.sleep(0)
            return value * 2

    class Plain(TransactionalTask):
        def run(self, value):
            return value

    assert Doubler.async_body is True and Plain.async_body is False
    assert Doubler().run(21) == 42  # no request, no app: just the body, run to its end


def test_decorated_async_function_is_marked_async(eager_app):
    assert async_tasks.async_insert.async_body is True
    assert get_celery(eager_app.registry).tasks["tests.async.insert"].async_body is True


# -- eager (task_always_eager) -------------------------------------------------------------------------------------

def test_eager_async_transactional_task_commits_after_the_coroutine(eager_app, db):
    result = async_tasks.async_insert.apply_async(args=("eager-ok",), tm=None)
    seen = result.get()
    assert seen["value"] == "eager-ok"
    assert seen["task_id"] == result.id, "Celery's self.request is the run's inside the coroutine"
    assert seen["same_request"] is True, "get_request() works in the coroutine, also after an await"
    assert seen["pyramid_current_request"] is True
    assert seen["current_task"] == "tests.async.insert"
    assert effect_rows(db) == [(result.id, "eager-ok")]


def test_eager_async_task_sent_after_a_commit(eager_app, db):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        result = async_tasks.async_insert.apply_async(args=("after-commit",), tm=tm)
        assert values(db) == []
    assert effect_rows(db) == [(result.id, "after-commit")]


def test_eager_async_task_that_raises_after_writing_leaves_no_row(eager_app, db):
    result = async_tasks.async_insert.apply_async(args=("eager-fail", True), tm=None)
    with pytest.raises(ValueError, match="asked to fail after writing"):
        result.get()
    assert values(db) == []


def test_eager_async_retryable_task_is_retried_after_a_serialization_conflict(eager_app, db, counter_row):
    result = async_tasks.async_conflict_once.apply_async(args=("eager-conflict",), tm=None)
    # Run 1 read 0, another transaction made it 100, run 1's write failed (40001) and was rolled
    # back; run 2, a new coroutine in a new transaction, read 100 and committed 101.
    assert result.get() == 101
    assert counter(db) == 101
    assert runs_of(db, "eager-conflict") == 2


def test_sync_body_returning_a_coroutine_gives_the_coroutines_result(eager_app):
    assert async_tasks.returns_coroutine.apply_async(args=(21,), tm=None).get() == 42
    assert async_tasks.returns_coroutine.async_body is False


def test_async_body_called_from_a_running_event_loop_runs_in_a_helper_thread(eager_app, db):
    async def caller():
        # A synchronous call from async code: this thread's loop is busy running caller().
        result = async_tasks.async_insert.apply_async(args=("from-a-loop",), tm=None)
        return threading.get_ident(), result.id, result.get()

    loop_thread, task_id, seen = asyncio.run(caller())
    assert seen["thread"] != loop_thread
    assert seen["same_request"] is True, "the task request's context variable reached the helper thread"
    assert seen["pyramid_current_request"] is True, "so did Pyramid's thread locals"
    assert seen["task_id"] == task_id, "and Celery's request stack"
    assert seen["current_task"] == "tests.async.insert"
    assert effect_rows(db) == [(task_id, "from-a-loop")]


def test_async_body_leaves_the_threads_event_loop_alone(eager_app):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        async_tasks.returns_coroutine.apply_async(args=(1,), tm=None).get()
        async_tasks.async_autoretry.apply(args=("leave-loop",), kwargs={}, retries=1).get()
        assert asyncio.get_event_loop_policy().get_event_loop() is loop
    finally:
        asyncio.set_event_loop(None)
        loop.close()


# -- a real worker ----------------------------------------------------------------------------------------------------

@pytest.fixture
def worker_app(redis_url, database_url, queue_name, db, tmp_path, ws_celery_worker_factory, subprocess_env,
               redis_client):  # redis_client: deletes the queue afterwards
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    settings = app_settings(database_url, celery)
    ini = write_ini(tmp_path / "async.ini", "async_main", settings)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", "--without-gossip",
                                      "--without-mingle", env=subprocess_env)
    router = async_main({}, **settings)
    router.worker = worker
    return router


@pytest.mark.slow
def test_worker_runs_async_transactional_tasks(worker_app, db):
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        ok = async_tasks.async_insert.apply_async(args=("worker-ok",), tm=tm)
        fails = async_tasks.async_insert.apply_async(args=("worker-fail", True), tm=tm)
    # The result went through the JSON result backend: it is the coroutine's value, not a coroutine.
    seen = ok.get(timeout=30)
    assert seen["value"] == "worker-ok"
    assert seen["task_id"] == ok.id
    assert seen["same_request"] is True and seen["pyramid_current_request"] is True
    assert seen["current_task"] == "tests.async.insert"
    with pytest.raises(ValueError, match="asked to fail after writing"):
        fails.get(timeout=30)
    assert effect_rows(db) == [(ok.id, "worker-ok")]
    assert "Task tests.async.insert[%s] succeeded" % ok.id in worker_app.worker.output()


@pytest.mark.slow
def test_worker_retries_an_async_body_on_conflicts_and_autoretry(worker_app, db, counter_row):
    conflict = async_tasks.async_conflict_once.apply_async(args=("worker-conflict",), tm=None)
    assert conflict.get(timeout=30) == 101
    assert counter(db) == 101
    assert runs_of(db, "worker-conflict") == 2
    assert "transient conflict on attempt 1/5 (OperationalError)" in worker_app.worker.output()

    # Celery's own autoretry_for wraps run(): it must see the exception the coroutine raised.
    retried = async_tasks.async_autoretry.apply_async(args=("worker-autoretry",), tm=None)
    assert retried.get(timeout=30) == 1
    attempts = wait_for(lambda: [value for _, value in effect_rows(db, "worker-autoretry")])
    assert attempts == ["attempt 0", "attempt 1"]
    assert AsyncResult(retried.id, app=get_celery(worker_app.registry)).state == "SUCCESS"
