"""Each task run gets a fresh Pyramid request, in-process and in real prefork workers.

The task ``tests.inspect_request`` commits a JSON report of what its request
looked like, and a finished callback records (on a connection of its own)
that the request was closed. The worker tests read those rows back from
PostgreSQL.
"""
from __future__ import annotations

import collections
import json
import typing as t

import pytest
import webtest
from celery.result import AsyncResult
from pyramid.threadlocal import get_current_request
from sqlalchemy import text

from tests.apps import sample_tasks

SITE_URL = "https://example.com/app"
HOME_URL = "https://example.com/app/"


def effect_rows(db, task_id: str | None = None) -> list[tuple[str, str]]:
    query = "SELECT task_id, value FROM ws_test_effects"
    params = {}
    if task_id is not None:
        query += " WHERE task_id = :id"
        params["id"] = task_id
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text(query + " ORDER BY id"), params)]


def worker_settings(redis_url: str, database_url: str, queue_name: str, results: bool = True,
                    **extra: t.Any) -> dict[str, str]:
    """Settings for an app whose tasks go to this test's private queue, results in Redis if asked."""
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    if results:
        celery.update(result_backend=redis_url, result_expires=600)
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.site_url": SITE_URL}
    settings.update(extra)
    return settings


@pytest.fixture
def settings(redis_url, database_url, queue_name, db) -> dict[str, str]:
    return worker_settings(redis_url, database_url, queue_name)


def reports_of(db, task_id: str) -> tuple[dict, dict]:
    """The committed report of a run and what its finished callback saw."""
    rows = [value for _, value in effect_rows(db, task_id)]
    seen = [json.loads(v) for v in rows if not v.startswith("closed:")]
    closed = [json.loads(v[len("closed:"):]) for v in rows if v.startswith("closed:")]
    assert len(seen) == 1 and len(closed) == 1, rows
    return seen[0], closed[0]


def assert_fresh_request(seen: dict) -> None:
    assert seen["registry_is_app"], "request.registry is not the app's registry"
    assert seen["celery_is_app"]
    assert seen["current_request"], "get_current_request() is not the task's request during the run"
    assert seen["request_fresh"], "a request object was reused across runs"
    assert seen["tm_fresh"], "a transaction manager was reused across runs"
    assert seen["tm_explicit"] and not seen["tm_is_thread_default"]
    assert seen["home"] == HOME_URL


def assert_closed(closed: dict) -> None:
    # The finished callbacks ran (this row exists), after the session's own close.
    assert closed == {"session_in_transaction": False, "checked_out": 0}


# -- in-process ------------------------------------------------------------------

def test_apply_gives_each_run_a_fresh_request_closed_afterwards(settings, make_app, db):
    router = make_app(**settings)
    sample_tasks.observed_requests.clear()
    ids = []
    for label in ("first", "second"):
        result = sample_tasks.inspect_request.apply(args=(label,), throw=True)
        ids.append(result.id)
        assert result.get()["label"] == label

    first, second = sample_tasks.observed_requests
    assert first is not second and first.tm is not second.tm
    assert first.registry is router.registry
    assert get_current_request() is None, "the run's request is still pushed on the thread locals"
    for request in (first, second):
        assert not request.finished_callbacks
    for task_id in ids:
        seen, closed = reports_of(db, task_id)
        assert_fresh_request(seen)
        assert_closed(closed)


def test_eager_run_after_web_commit_uses_its_own_request_and_tm(redis_url, database_url, queue_name, db, make_app):
    settings = worker_settings(redis_url, database_url, queue_name,
                               **{"pyramid.includes": "tests.apps.testapp.inspect_views"})
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "task_always_eager": True}
    settings["websauna.celery_config"] = repr(celery)
    testapp = webtest.TestApp(make_app(**settings))
    # The web request's URL is http://localhost/...: the task's URLs must come from websauna.site_url.
    task_id = testapp.get("/inspect-eager/eager").text
    seen, closed = reports_of(db, task_id)
    assert seen["label"] == "eager"
    assert_fresh_request(seen)
    assert_closed(closed)
    assert get_current_request() is None


# -- real prefork worker ---------------------------------------------------------

def send(task_proxy: t.Any, *args: t.Any, **kwargs: t.Any) -> AsyncResult:
    return task_proxy.apply_async(args=args, kwargs=kwargs, tm=None)


@pytest.mark.slow
def test_worker_runs_get_fresh_requests_closed_afterwards(settings, make_app, write_ini, ws_celery_worker_factory,
                                                          subprocess_env, db):
    ini = write_ini(settings)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", env=subprocess_env)
    make_app(**settings)  # the sending side
    results = [send(sample_tasks.inspect_request, f"run-{i}") for i in range(8)]
    for result in results:
        result.get(timeout=30)
    pids = set()
    for result in results:
        # The request is closed inside the run, before its result is stored: no waiting here.
        seen, closed = reports_of(db, result.id)
        assert_fresh_request(seen)
        assert_closed(closed)
        pids.add(seen["pid"])
    # 8 runs on at most 2 children: freshness was checked across runs within one process.
    assert worker.pid not in pids, "a task ran in the parent, not in a pool child"


@pytest.mark.slow
def test_prefork_children_never_share_a_connection(settings, make_app, write_ini, ws_celery_worker_factory,
                                                   subprocess_env, db):
    ini = write_ini(dict(settings, **{"pyramid.includes": "tests.apps.testapp.warm_pool_at_startup"}))
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", env=subprocess_env)
    # The parent opened a connection before forking; it sits idle in the pool the children inherit.
    ((_, startup),) = effect_rows(db, "startup")
    parent_pid, parent_backend = map(int, startup.split(":"))
    assert parent_pid == worker.pid

    make_app(**settings)
    results = [send(sample_tasks.whoami, 0.02) for _ in range(40)]
    for result in results:
        result.get(timeout=30)

    backends_by_child: dict[int, set[int]] = collections.defaultdict(set)
    for _, value in effect_rows(db, "whoami"):
        pid, backend = map(int, value.split(":"))
        backends_by_child[pid].add(backend)
    print(f"\nparent {parent_pid} (backend {parent_backend}); children -> backends: {dict(backends_by_child)}")
    assert len(backends_by_child) == 2, f"expected both children to run tasks: {dict(backends_by_child)}"
    assert parent_pid not in backends_by_child
    children = list(backends_by_child.values())
    assert not children[0] & children[1], "two pool children used the same PostgreSQL backend"
    assert all(parent_backend not in backends for backends in children), \
        "a child reused the connection the parent opened before fork"
    with db.connect() as conn:
        alive = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"),
                             {"pid": parent_backend}).scalar_one()
    assert alive == 1, "a child closed the connection it inherited, under the parent's feet"


# -- TransactionalTask in a worker -----------------------------------------------

@pytest.mark.slow
def test_transactional_task_commits_on_return_and_aborts_on_raise(settings, make_app, write_ini,
                                                                   ws_celery_worker_factory, subprocess_env, db):
    ini = write_ini(settings)
    ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", env=subprocess_env)
    make_app(**settings)
    ok = send(sample_tasks.transactional_insert, "kept")
    failed = send(sample_tasks.transactional_insert, "rolled back", fail=True)
    assert ok.get(timeout=30) == "kept"
    with pytest.raises(ValueError, match="asked to fail"):
        failed.get(timeout=30)
    assert effect_rows(db, ok.id) == [(ok.id, "kept")]
    assert effect_rows(db, failed.id) == []
