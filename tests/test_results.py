"""Result backends: AsyncResult(id) of on-commit and deferred tasks, in Redis and in SQL (db+...)."""
from __future__ import annotations

import pytest
import sqlalchemy
import transaction
from celery.result import AsyncResult

from tests.apps import deferred_functions, sample_tasks
from websauna_tasks import defer, get_celery


def backend_url(kind: str, redis_url: str, database_url: str) -> str:
    if kind == "redis":
        return redis_url
    return "db+" + database_url


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "sql"])
def test_state_and_value_of_on_commit_and_deferred_tasks(kind, make_app, redis_url, database_url, queue_name, db,
                                                         write_ini, ws_celery_worker_factory, subprocess_env):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name,
              "result_backend": backend_url(kind, redis_url, database_url), "result_expires": 600}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url}
    router = make_app(**settings)
    app = get_celery(router.registry)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        on_commit = sample_tasks.add.apply_async(args=(20, 22), tm=tm)
        deferred_id = defer(deferred_functions.record, "result", _tm=tm, _registry=router.registry)
        failing_id = defer(deferred_functions.record_then_fail, "boom", _tm=tm, _registry=router.registry)
    # Sent, not yet run: nobody consumes the queue.
    assert AsyncResult(on_commit.id, app=app).state == "PENDING"

    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2", env=subprocess_env)
    assert on_commit.get(timeout=30) == 42
    # A bare AsyncResult(id) finds the app: includeme makes it the current one.
    deferred = AsyncResult(deferred_id)
    assert deferred.get(timeout=30) == "RESULT"
    assert deferred.state == "SUCCESS"
    failing = AsyncResult(failing_id, app=app)
    with pytest.raises(ValueError, match="asked to fail"):
        failing.get(timeout=30)
    assert failing.state == "FAILURE"
    if kind == "sql":
        engine = sqlalchemy.create_engine(database_url)
        with engine.connect() as conn:
            stored = conn.execute(sqlalchemy.text("SELECT task_id, status FROM celery_taskmeta")).all()
        engine.dispose()
        assert {(on_commit.id, "SUCCESS"), (deferred_id, "SUCCESS"), (failing_id, "FAILURE")} <= set(stored)
