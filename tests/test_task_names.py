"""Task names (defer's ``_name``): one pending task per name, across processes, on every store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import sqlalchemy
import transaction
from celery.result import AsyncResult
from sqlalchemy import text

from tests.apps import deferred_functions
from tests.conftest import ROOT, queued_messages
from websauna_tasks import AlreadyEnqueued, defer, get_celery
from websauna_tasks.names import RETENTION_KEY, names_table
from websauna_tasks.testing import wait_for


def redis_settings(redis_url, database_url, queue_name, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, **extra}


def sqlite_settings(tmp_path, **extra):
    """The embedded default: SQLite data and kombu's SQLAlchemy transport on SQLite."""
    celery = {"broker_url": f"sqla+sqlite:///{tmp_path}/broker.sqlite"}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": f"sqlite:///{tmp_path}/data.sqlite", **extra}


@pytest.fixture
def name() -> str:
    return f"job-{os.getpid()}-{time.time_ns()}"


@pytest.fixture
def redis_app(make_app, redis_url, database_url, queue_name, db, redis_client):
    router = make_app(**redis_settings(redis_url, database_url, queue_name))
    yield router
    for key in redis_client.scan_iter("websauna_tasks:name:*job-*"):
        redis_client.delete(key)


def ids_in(redis_client, queue_name):
    return [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)]


def test_second_defer_returns_the_pending_id(redis_app, redis_client, queue_name, name):
    registry = redis_app.registry
    first = defer(deferred_functions.record, "one", _name=name, _registry=registry)
    second = defer(deferred_functions.record, "two", _name=name, _registry=registry)
    assert second == first
    with pytest.raises(AlreadyEnqueued) as caught:
        defer(deferred_functions.record, "three", _name=name, _raise_if_enqueued=True, _registry=registry)
    assert caught.value.task_id == first and caught.value.name == name
    other = defer(deferred_functions.record, "other", _name=name + "-other", _registry=registry)
    assert ids_in(redis_client, queue_name) == [first, other]


def test_name_is_taken_before_the_commit_and_freed_on_abort(redis_app, redis_client, queue_name, name):
    registry = redis_app.registry
    tm = transaction.TransactionManager(explicit=True)
    with pytest.raises(RuntimeError):
        with tm:
            first = defer(deferred_functions.record, "aborted", _name=name, _tm=tm, _registry=registry)
            # Another caller during the transaction sees the claim.
            assert defer(deferred_functions.record, "x", _name=name, _registry=registry) == first
            raise RuntimeError("request failed")
    assert ids_in(redis_client, queue_name) == []
    again = defer(deferred_functions.record, "again", _name=name, _registry=registry)
    assert again != first
    assert ids_in(redis_client, queue_name) == [again]


def test_savepoint_rollback_frees_the_name(redis_app, redis_client, queue_name, name):
    registry = redis_app.registry
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        savepoint = tm.savepoint()
        rolled_back = defer(deferred_functions.record, "sp", _name=name, _tm=tm, _registry=registry)
        savepoint.rollback()
        kept = defer(deferred_functions.record, "kept", _name=name, _tm=tm, _registry=registry)
        assert kept != rolled_back
    assert ids_in(redis_client, queue_name) == [kept]


def test_failed_commit_frees_the_name(redis_app, redis_client, queue_name, name, db):
    registry = redis_app.registry
    with db.begin() as conn:
        # A deferred constraint: the INSERT passes, the COMMIT fails.
        conn.execute(text("DROP TABLE IF EXISTS ws_test_deferred"))
        conn.execute(text("CREATE TABLE ws_test_deferred (value text UNIQUE DEFERRABLE INITIALLY DEFERRED)"))
        conn.execute(text("INSERT INTO ws_test_deferred (value) VALUES ('taken')"))
    from pyramid.scripting import prepare

    env = prepare(registry=registry)
    request = env["request"]
    request.tm = transaction.TransactionManager(explicit=True)
    try:
        request.tm.begin()
        request.dbsession.execute(text("INSERT INTO ws_test_deferred (value) VALUES ('taken')"))
        first = defer(deferred_functions.record, "never", _name=name, _tm=request.tm, _registry=registry)
        with pytest.raises(sqlalchemy.exc.IntegrityError):
            request.tm.commit()
        request.tm.abort()
    finally:
        env["closer"]()
    second = defer(deferred_functions.record, "later", _name=name, _registry=registry)
    assert second != first
    assert ids_in(redis_client, queue_name) == [second]


def test_eager_run_frees_the_name_unless_retained(make_app, database_url, db, name):
    celery = {"broker_url": "memory://", "task_always_eager": True}
    router = make_app(**{"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url})
    first = defer(deferred_functions.record, "e1", _name=name, _registry=router.registry)
    second = defer(deferred_functions.record, "e2", _name=name, _registry=router.registry)
    assert first != second, "the name was still taken after its task ran"

    retained = make_app(**{"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                           RETENTION_KEY: "30"})
    third = defer(deferred_functions.record, "e3", _name=name, _registry=retained.registry)
    assert defer(deferred_functions.record, "e4", _name=name, _registry=retained.registry) == third


@pytest.mark.slow
def test_worker_run_frees_the_name_or_keeps_it_for_the_retention(
        make_app, redis_url, database_url, queue_name, db, write_ini, ws_celery_worker_factory, subprocess_env,
        redis_client, name):
    settings = redis_settings(redis_url, database_url, queue_name, **{RETENTION_KEY: "3"})
    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    router = make_app(**settings)
    app = get_celery(router.registry)
    first = defer(deferred_functions.record, "w1", _name=name, _registry=router.registry)
    assert AsyncResult(first, app=app).get(timeout=30) == "W1"
    # Within the retention after the run: still the first id.
    assert defer(deferred_functions.record, "w2", _name=name, _registry=router.registry) == first
    later = wait_for(lambda: (new := defer(deferred_functions.record, "w3", _name=name,
                                           _registry=router.registry)) != first and new, timeout=15)
    assert AsyncResult(later, app=app).get(timeout=30) == "W3"


RACER = """
import json, os, sys, time
from tests.apps.testapp import main
from tests.apps import deferred_functions
from websauna_tasks import defer
settings = json.loads(os.environ["WS_RACE_SETTINGS"])
router = main({}, **settings)
start = float(os.environ["WS_RACE_START"])
while time.time() < start:
    time.sleep(0.001)
ids = [defer(deferred_functions.record, f"race-{os.getpid()}-{i}", _name=os.environ["WS_RACE_NAME"],
             _registry=router.registry) for i in range(int(os.environ["WS_RACE_CALLS"]))]
print(json.dumps(ids))
"""


def race(settings: dict, name: str, processes: int = 4, calls: int = 25) -> list[str]:
    """Several processes defer the same name at the same moment; every id each one got back."""
    start = time.time() + 3.0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WS_RACE_SETTINGS": json.dumps(settings),
           "WS_RACE_START": str(start), "WS_RACE_NAME": name, "WS_RACE_CALLS": str(calls)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(processes)]
    ids: list[str] = []
    for racer in racers:
        out, err = racer.communicate(timeout=60)
        assert racer.returncode == 0, err
        ids += json.loads(out.strip().splitlines()[-1])
    return ids


@pytest.mark.slow
def test_processes_racing_on_redis_send_once(redis_url, database_url, queue_name, db, redis_client, name):
    ids = race(redis_settings(redis_url, database_url, queue_name), name)
    assert len(set(ids)) == 1, f"{len(set(ids))} different ids for one name"
    assert ids_in(redis_client, queue_name) == [ids[0]]


@pytest.mark.slow
def test_processes_racing_on_postgresql_send_once(redis_url, database_url, queue_name, db, redis_client, name):
    settings = redis_settings(redis_url, database_url, queue_name, **{"websauna_tasks.name_store": "sql"})
    ids = race(settings, name)
    assert len(set(ids)) == 1, f"{len(set(ids))} different ids for one name"
    assert ids_in(redis_client, queue_name) == [ids[0]]
    with db.connect() as conn:
        holders = conn.execute(sqlalchemy.select(names_table.c.task_id)
                               .where(names_table.c.name.like(f"%{name}"))).scalars().all()
    assert holders == [ids[0]]


@pytest.mark.slow
@pytest.mark.integration(reason="racing Python processes: too slow for the unit tier")
def test_processes_racing_on_the_embedded_default_send_once(tmp_path, name):
    settings = sqlite_settings(tmp_path)
    ids = race(settings, name)
    assert len(set(ids)) == 1, f"{len(set(ids))} different ids for one name"
    broker = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/broker.sqlite")
    with broker.connect() as conn:
        payloads = conn.execute(text("SELECT payload FROM kombu_message")).scalars().all()
    broker.dispose()
    assert [json.loads(p)["headers"]["id"] for p in payloads] == [ids[0]]


def test_apply_async_unique_name(redis_app, redis_client, queue_name, name):
    from tests.apps import sample_tasks

    tm = transaction.TransactionManager(explicit=True)
    with tm:
        first = sample_tasks.add.apply_async(args=(1, 2), tm=tm, unique_name=name)
        again = sample_tasks.add.apply_async(args=(3, 4), tm=tm, unique_name=name)
        assert again.id == first.id
        with pytest.raises(AlreadyEnqueued):
            sample_tasks.add.apply_async(args=(5, 6), tm=None, unique_name=name, raise_if_enqueued=True)
    (message,) = queued_messages(redis_client, queue_name)
    assert message["headers"]["id"] == first.id
    assert message["headers"]["websauna_tasks_name"] == name
    # Aborted: the name is free for the next caller.
    with pytest.raises(RuntimeError):
        with tm:
            aborted = sample_tasks.add.apply_async(args=(1, 1), tm=tm, unique_name=name + "-2")
            raise RuntimeError("failed")
    now = sample_tasks.add.apply_async(args=(1, 1), tm=None, unique_name=name + "-2")
    assert now.id != aborted.id
    assert ids_in(redis_client, queue_name) == [first.id, now.id]


def test_task_defer_is_transactional_when_a_transaction_is_active(redis_app, redis_client, queue_name):
    from tests.apps import sample_tasks

    with transaction.manager:
        inside = sample_tasks.add.defer(1, b=2)
        assert ids_in(redis_client, queue_name) == []
    outside = sample_tasks.add.defer(3, 4)
    assert ids_in(redis_client, queue_name) == [inside, outside]


def test_a_plain_celery_task_carrying_a_name_frees_it_after_its_run_unless_retrying(make_app, name):
    """The release is Celery's task_postrun: any task of the app, not only ours, from the eager headers
    or from a worker's request (the header flattened into Celery's context)."""
    import uuid

    from celery.exceptions import Retry
    from celery.signals import task_postrun

    from websauna_tasks.names import NAME_HEADER, claim_name, get_name_store

    router = make_app(**{"websauna.celery_config": repr({"broker_url": "memory://"})})
    app = get_celery(router.registry)
    store = get_name_store(router.registry, app)

    @app.task(shared=False, lazy=False, name=f"tests.plain_named_{uuid.uuid4().hex}")
    def plain(outcome):
        if outcome == "fails":
            raise ValueError("boom")
        if outcome == "retries":
            raise Retry("again later", when=60)
        return outcome

    def held_after(outcome: str) -> str | None:
        task_id = str(uuid.uuid4())
        assert claim_name(app, name, task_id) is None
        plain.apply((outcome,), task_id=task_id, headers={NAME_HEADER: name})
        holder = store.holder(name)
        store.release(name, task_id)
        return holder

    assert held_after("succeeds") is None
    assert held_after("fails") is None
    assert held_after("retries") is not None

    for state, kept in (("SUCCESS", False), ("FAILURE", False), ("RETRY", True)):
        task_id = str(uuid.uuid4())
        assert claim_name(app, name, task_id) is None
        plain.push_request(id=task_id, **{NAME_HEADER: name})
        try:
            task_postrun.send(sender=plain, task_id=task_id, task=plain, args=(), kwargs={}, retval=None, state=state)
        finally:
            plain.pop_request()
        assert (store.holder(name) == task_id) is kept, state
        store.release(name, task_id)
