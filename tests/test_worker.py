"""End to end: a view commits a row, a real ws-celery worker runs the task."""
from __future__ import annotations

import time

import pytest
import webtest
from sqlalchemy import text

from websauna_tasks.testing import wait_for


@pytest.fixture
def settings(redis_url, database_url, queue_name, db):
    config = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {
        "websauna.celery_config": repr(config),
        "sqlalchemy.url": database_url,
        "websauna.site_url": "https://example.com/app",
    }


def effects(db):
    with db.connect() as conn:
        return conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id")).all()


@pytest.mark.slow
def test_view_commit_runs_task_in_worker_with_same_id(settings, make_app, write_ini, ws_celery_worker_factory,
                                                     subprocess_env, db):
    ini = write_ini(settings)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", env=subprocess_env)
    testapp = webtest.TestApp(make_app(**settings))
    task_id = testapp.get("/write/hello").text
    with pytest.raises(RuntimeError):
        testapp.get("/write-fail/never")
    rows = wait_for(lambda: effects(db))
    assert [tuple(r) for r in rows] == [(task_id, "hello")]
    # The aborted request's task never arrives, even after the worker drained the queue.
    time.sleep(1.0)
    assert [tuple(r) for r in effects(db)] == [(task_id, "hello")]
    assert worker.process.poll() is None


@pytest.mark.slow
def test_chain_and_link_callbacks_continue_in_the_worker(settings, make_app, write_ini, ws_celery_worker_factory,
                                                       subprocess_env, db):
    """The worker sends the next step itself (no tm): ScheduleOnCommitTask must allow it."""
    import transaction
    from celery import chain

    from tests.apps import sample_tasks

    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info", env=subprocess_env)
    make_app(**settings)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        chain(sample_tasks.add.s(1, 2), sample_tasks.record.s()).apply_async(tm=tm)
        sample_tasks.add.apply_async(args=(20, 1), link=sample_tasks.record.s(), tm=tm)
    rows = wait_for(lambda: len(effects(db)) == 2 and effects(db))
    assert sorted(value for _id, value in rows) == ["21", "3"]
