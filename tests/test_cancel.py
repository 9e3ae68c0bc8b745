"""cancel() and cancel_name(): marks every worker reads, kept across restarts; real Redis, PostgreSQL and workers."""
from __future__ import annotations

import os
import re
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa
from celery.result import AsyncResult

from tests.apps import deferred_functions, sample_tasks
from tests.outbox_helpers import outbox_rows
from tests.test_cli import ws_celery_argv
from websauna_tasks import cancel, cancel_name, defer, get_celery
from websauna_tasks.cancel import (
    MAX_TASK_ID_LENGTH,
    WATCH_CLIENT_NAME,
    RedisCancelStore,
    SQLCancelStore,
    cancelled_message,
    check_task_id,
    get_cancel_store,
    is_cancelled,
)
from websauna_tasks.request import task_request
from websauna_tasks.schema import cancellations_table
from websauna_tasks.settings import CANCEL_RETENTION_KEY
from websauna_tasks.testing import wait_for

SCAN = "tests.apps.cancel_tasks"


def redis_settings(redis_url, database_url, queue_name, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name, "result_backend": redis_url,
              "result_expires": 600}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, "tests.scan": SCAN, **extra}


def effects(db) -> set[str]:
    """What ran: sample_tasks.record keeps its value in ``value``, deferred_functions.record in ``task_id``."""
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT task_id, value FROM ws_test_effects")).all()
    return {row[0] for row in rows} | {row[1] for row in rows}


def run_cli(*args, env):
    return subprocess.run([*ws_celery_argv(), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


# -- the ids a cancel accepts (no service) --------------------------------------------------------------------------

@pytest.mark.parametrize("forged", [12345, None, b"abc", ["id"], 1.5])
def test_a_task_id_that_is_not_a_string_is_a_type_error(forged):
    with pytest.raises(TypeError):
        check_task_id(forged)


@pytest.mark.parametrize("forged", ["", "x" * (MAX_TASK_ID_LENGTH + 1), "a\nb", " padded", "x" * 10_000_000])
def test_an_empty_huge_or_unprintable_task_id_is_a_value_error(forged):
    with pytest.raises(ValueError):
        check_task_id(forged)


@pytest.mark.parametrize("header", [None, 5, "", "x" * (MAX_TASK_ID_LENGTH + 1), ["a"]])
def test_the_intake_never_looks_up_a_header_that_cannot_be_an_id(header):
    # No registry is needed: the check stops before the store.
    assert cancelled_message(None, header) is False


@pytest.mark.parametrize("where", [42, "registry", object()])
def test_where_is_a_registry_a_request_or_an_app(where):
    with pytest.raises(TypeError, match="expected a registry, a request or a websauna_tasks Celery app"):
        cancel("0b6c5f0e", where)


# -- Redis --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cancelled_before_a_fresh_worker_starts_never_runs(
        make_app, redis_url, database_url, queue_name, db, redis_client, write_ini, ws_celery_worker_factory,
        subprocess_env):
    settings = redis_settings(redis_url, database_url, queue_name, **{CANCEL_RETENTION_KEY: "120"})
    router = make_app(**settings)
    registry = router.registry
    app = get_celery(registry)
    # One worker takes and runs a task first, then is gone: what it knew dies with it.
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    warm = sample_tasks.record.apply_async(args=("warm",), tm=None)
    AsyncResult(warm.id, app=app).get(timeout=30)
    worker.stop()

    sent = sample_tasks.record.apply_async(args=("sent-then-cancelled",), tm=None)
    assert cancel(sent.id, registry) is False
    # Cancelled before any message carries the id: the mark waits for it.
    early = str(uuid.uuid4())
    assert cancel(early, app) is False
    sample_tasks.record.apply_async(args=("cancelled-before-sent",), task_id=early, tm=None)
    name = f"cancel-job-{uuid.uuid4().hex[:8]}"
    named = defer(deferred_functions.record, "named-cancelled", _name=name, _registry=registry)
    assert cancel_name(name, registry) == named
    assert cancel_name(name, registry) is None  # the name is free again
    renamed = defer(deferred_functions.record, "named-after", _name=name, _registry=registry)
    assert renamed != named
    # A message written straight to the queue, with only the headers the intake insists on, whose id is cancelled.
    forged = str(uuid.uuid4())
    cancel(forged, registry)
    with app.connection_for_write() as connection:
        connection.Producer().publish([["forged-cancelled"], {}, {}], routing_key=queue_name, serializer="json",
                                      headers={"task": "tests.record", "id": forged, "x-forged": "yes"})
    last = sample_tasks.record.apply_async(args=("runs",), tm=None)

    key = f"websauna_tasks:cancel:{app.main}:{sent.id}"
    assert 110_000 < redis_client.pttl(key) <= 120_000

    fresh = ws_celery_worker_factory(write_ini(settings, "fresh.ini"), "worker", "-c", "1", env=subprocess_env)
    AsyncResult(last.id, app=app).get(timeout=30)
    AsyncResult(renamed, app=app).get(timeout=30)
    for task_id in (sent.id, early, named, forged):
        assert wait_for(lambda task_id=task_id: AsyncResult(task_id, app=app).state == "REVOKED", timeout=15,
                        describe=fresh.output)
    ran = effects(db)
    assert {"warm", "runs", "named-after"} <= ran
    assert not {"sent-then-cancelled", "cancelled-before-sent", "named-cancelled", "forged-cancelled"} & ran
    assert fresh.output().count("was cancelled: acknowledged without running") == 4
    assert not redis_client.llen(queue_name)


@pytest.mark.slow
def test_a_running_worker_honours_cancels_also_when_its_subscription_is_killed(
        make_app, redis_url, database_url, queue_name, db, redis_client, write_ini, ws_celery_worker_factory,
        subprocess_env):
    settings = redis_settings(redis_url, database_url, queue_name, **{CANCEL_RETENTION_KEY: "120"})
    registry = make_app(**settings).registry
    app = get_celery(registry)
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    subscribed = re.compile(r"cancel watch subscribed as client (\d+)")

    def send_cancelled(label: str) -> str:
        task_id = str(uuid.uuid4())
        cancel(task_id, registry)  # while the worker runs: it learns of it from the announcement
        sample_tasks.record.apply_async(args=(label,), task_id=task_id, tm=None)
        after = sample_tasks.record.apply_async(args=(f"{label}-after",), tm=None)
        AsyncResult(after.id, app=app).get(timeout=30)  # one queue, one process: the cancelled one came first
        assert wait_for(lambda: AsyncResult(task_id, app=app).state == "REVOKED", timeout=15,
                        describe=worker.output)
        return task_id

    warm = sample_tasks.record.apply_async(args=("watch-warm",), tm=None)
    AsyncResult(warm.id, app=app).get(timeout=30)
    first = wait_for(lambda: subscribed.findall(worker.output()), timeout=15, describe=worker.output)
    send_cancelled("watch-running")

    kill_watch(redis_client, int(first[0]))
    send_cancelled("watch-killed")  # announced to nobody: the worker sees its closed socket and looks it up

    def resubscribed() -> bool:
        if len(subscribed.findall(worker.output())) >= 2:
            return True
        # The watch subscribes again at the first message after its retry delay: give it one.
        sample_tasks.record.apply_async(args=("watch-nudge",), tm=None)
        return False

    wait_for(resubscribed, timeout=30, interval=0.5, describe=worker.output)
    send_cancelled("watch-resubscribed")
    ran = effects(db)
    assert {"watch-warm", "watch-running-after", "watch-killed-after", "watch-resubscribed-after"} <= ran
    assert not {"watch-running", "watch-killed", "watch-resubscribed"} & ran
    assert "cancel watch stopped" in worker.output()
    assert worker.output().count("was cancelled: acknowledged without running") == 3


@pytest.mark.slow
def test_a_running_task_stops_when_it_polls_is_cancelled(
        make_app, redis_url, database_url, queue_name, db, redis_client, write_ini, ws_celery_worker_factory,
        subprocess_env):
    from tests.apps import cancel_tasks

    settings = redis_settings(redis_url, database_url, queue_name)
    router = make_app(**settings)
    app = get_celery(router.registry)
    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    started = f"wstest-started-{uuid.uuid4().hex}"
    try:
        result = cancel_tasks.until_cancelled.apply_async(args=(started,))
        wait_for(lambda: redis_client.exists(started), timeout=30)
        assert not is_cancelled(result.id, router.registry)
        cancel(result.id, router.registry)
        assert is_cancelled(result.id, router.registry)
        assert AsyncResult(result.id, app=app).get(timeout=30) == "stopped"
    finally:
        redis_client.delete(started)


def test_the_intake_check_answers_from_the_watch(make_app, redis_url, database_url, queue_name, db):
    """The per-message cost on the hot path, printed: the store's EXISTS, then the worker's watch."""
    router = make_app(**redis_settings(redis_url, database_url, queue_name))
    registry = router.registry
    store = get_cancel_store(registry)
    assert isinstance(store, RedisCancelStore)
    cancelled = str(uuid.uuid4())
    cancel(cancelled, registry)
    ids = [str(uuid.uuid4()) for _ in range(2000)]
    cancelled_message(registry, ids[0])  # connect first
    started = time.perf_counter()
    hits = sum(cancelled_message(registry, task_id) for task_id in ids)
    looked_up = (time.perf_counter() - started) / len(ids)
    assert hits == 0 and cancelled_message(registry, cancelled)

    cancelled_message(registry, ids[0], watched=True)  # subscribe first
    assert store.watch().live
    lookups = []
    store.contains = lambda task_id: lookups.append(task_id) or RedisCancelStore.contains(store, task_id)
    started = time.perf_counter()
    hits = sum(cancelled_message(registry, task_id, watched=True) for task_id in ids)
    watched = (time.perf_counter() - started) / len(ids)
    print(f"\ncancel check: Redis EXISTS {looked_up * 1e6:.0f} us, the watch {watched * 1e6:.1f} us per message")
    assert hits == 0 and cancelled_message(registry, cancelled, watched=True)
    assert lookups == []  # not one message asked the store
    assert watched < looked_up


def kill_watch(redis_client, client_id) -> None:
    assert redis_client.execute_command("CLIENT", "KILL", "ID", client_id) == 1


def test_the_watch_keeps_its_promise(make_app, redis_url, database_url, queue_name, db, redis_client):
    """Loaded at subscription, announced afterwards, looked up while the subscription is gone, then back."""
    settings = redis_settings(redis_url, database_url, queue_name, **{CANCEL_RETENTION_KEY: "60"})
    registry = make_app(**settings).registry
    before = str(uuid.uuid4())
    cancel(before, registry)
    other_app = make_app(**settings).registry  # another process's cancel(), through its own client
    store = get_cancel_store(registry)
    watch = store.watch()
    assert not watch.live
    assert cancelled_message(registry, before, watched=True)  # loaded when it subscribed
    assert watch.live and before in watch.marks
    assert not cancelled_message(registry, str(uuid.uuid4()), watched=True)

    during = str(uuid.uuid4())
    cancel(during, other_app)
    assert cancelled_message(registry, during, watched=True)  # announced: no lookup
    assert during in watch.marks

    listed = [c for c in redis_client.client_list() if c["id"] == str(watch.client_id)]
    assert listed and listed[0]["name"] == f"{WATCH_CLIENT_NAME}-{os.getpid()}"
    kill_watch(redis_client, watch.client_id)
    lost = str(uuid.uuid4())
    cancel(lost, other_app)  # announced to nobody: the subscription is gone
    assert cancelled_message(registry, lost, watched=True)  # the closed socket is seen: looked up
    assert not watch.live
    assert cancelled_message(registry, before, watched=True) and cancelled_message(registry, during, watched=True)
    assert wait_for(lambda: cancelled_message(registry, lost, watched=True) and watch.live, timeout=10)
    assert lost in watch.marks  # loaded again at the new subscription

    # Anybody may PUBLISH: what does not read like an announcement is ignored, and an announced mark
    # expires in the worker as the key would in Redis.
    short = str(uuid.uuid4())
    redis_client.publish(store.channel, b"not a number")
    redis_client.publish(store.channel, b"80 " + short.encode())
    assert cancelled_message(registry, short, watched=True)  # no key: only the announcement says so
    assert wait_for(lambda: not cancelled_message(registry, short, watched=True), timeout=5, interval=0.02)
    assert watch.live


def test_the_intake_check_without_redis_is_one_primary_key_select(make_app, tmp_path, database_url, db):
    celery = {"broker_url": f"sqla+sqlite:///{tmp_path}/broker.sqlite"}
    router = make_app(**{"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url})
    registry = router.registry
    cancelled = str(uuid.uuid4())
    cancel(cancelled, registry)
    ids = [str(uuid.uuid4()) for _ in range(500)]
    started = time.perf_counter()
    hits = sum(cancelled_message(registry, task_id) for task_id in ids)
    per_message = (time.perf_counter() - started) / len(ids)
    print(f"\ncancel check (PostgreSQL SELECT): {per_message * 1e6:.0f} us per message")
    assert hits == 0 and cancelled_message(registry, cancelled)
    assert per_message < 0.02


# -- PostgreSQL, when there is no Redis -----------------------------------------------------------------------------

@pytest.mark.slow
def test_without_redis_the_marks_are_rows_of_the_database(
        make_app, tmp_path, database_url, db, write_ini, ws_celery_worker_factory, subprocess_env):
    celery = {"broker_url": f"sqla+sqlite:///{tmp_path}/broker.sqlite"}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, "tests.scan": SCAN}
    router = make_app(**settings)
    registry = router.registry
    store = get_cancel_store(registry)
    assert isinstance(store, SQLCancelStore)
    cancelled = sample_tasks.record.apply_async(args=("sql-cancelled",), tm=None)
    cancel(cancelled.id, registry)
    cancel(cancelled.id, registry)  # twice: still one row
    with db.connect() as conn:
        rows = conn.execute(sa.select(cancellations_table).where(
            cancellations_table.c.task_id == cancelled.id)).all()
    assert len(rows) == 1 and rows[0].expires_at > time.time() + 600_000
    sample_tasks.record.apply_async(args=("sql-runs",), tm=None)
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    wait_for(lambda: "sql-runs" in effects(db), timeout=60, describe=worker.output)
    wait_for(lambda: "was cancelled" in worker.output(), timeout=15, describe=worker.output)
    assert "sql-runs" in effects(db) and "sql-cancelled" not in effects(db)


def backend_alive(db, pid: int) -> bool:
    with db.connect() as conn:
        query = sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
        return conn.execute(query, {"pid": pid}).scalar() > 0


def test_the_sql_watch_keeps_its_promise(make_app, tmp_path, database_url, db):
    """PostgreSQL's LISTEN/NOTIFY in place of pub/sub: loaded, announced, looked up while the listener is gone."""
    celery = {"broker_url": f"sqla+sqlite:///{tmp_path}/broker.sqlite"}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                CANCEL_RETENTION_KEY: "60"}
    registry = make_app(**settings).registry
    other_app = make_app(**settings).registry
    before = str(uuid.uuid4())
    cancel(before, registry)
    store = get_cancel_store(registry)
    assert isinstance(store, SQLCancelStore)
    watch = store.watch()
    assert cancelled_message(registry, before, watched=True)  # loaded when it listened
    assert watch.live and before in watch.marks
    ids = [str(uuid.uuid4()) for _ in range(500)]
    lookups = []
    store.contains = lambda task_id: lookups.append(task_id) or SQLCancelStore.contains(store, task_id)
    started = time.perf_counter()
    assert not any(cancelled_message(registry, task_id, watched=True) for task_id in ids)
    per_message = (time.perf_counter() - started) / len(ids)
    print(f"\ncancel check, the SQL watch: {per_message * 1e6:.1f} us per message")
    assert lookups == []

    during = str(uuid.uuid4())
    cancel(during, other_app)
    assert wait_for(lambda: cancelled_message(registry, during, watched=True), timeout=5, interval=0.01)
    assert during in watch.marks and lookups == []

    with db.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": watch.backend_pid})
    # pg_terminate_backend only signals: until the backend has exited, a NOTIFY may still reach it
    # or the client may not have read its goodbye yet (seen in CI), so wait until it is gone.
    wait_for(lambda: not backend_alive(db, watch.backend_pid), timeout=10, interval=0.01)
    lost = str(uuid.uuid4())
    cancel(lost, other_app)  # notified to nobody: the listener is gone
    assert cancelled_message(registry, lost, watched=True)  # the closed connection is seen: looked up
    assert not watch.live and lookups[-1] == lost
    assert wait_for(lambda: cancelled_message(registry, lost, watched=True) and watch.live, timeout=10)
    assert lost in watch.marks  # loaded again when it listened again
    # Another app's notification, and one that is not ours at all, change nothing.
    with db.connect() as conn:
        for payload in ["nonsense", '["another-app", 60000, "x-1"]', '[1, 2, 3]']:
            conn.execute(sa.select(sa.func.pg_notify("websauna_tasks_cancels", payload)))
        conn.commit()
    assert not cancelled_message(registry, "x-1", watched=True) and watch.live


# -- the outbox ---------------------------------------------------------------------------------------------------

def test_an_unsent_outbox_row_is_deleted(make_app, redis_url, database_url, queue_name, db, redis_client):
    settings = redis_settings(redis_url, database_url, queue_name, **{
        "websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
        "websauna_tasks.outbox_relay_in_worker": "false"})
    router = make_app(**settings)
    registry = router.registry
    app = get_celery(registry)
    with task_request(registry) as request:
        with request.tm:
            kept = sample_tasks.record.apply_async(args=("outbox-kept",), tm=request.tm)
            dropped = sample_tasks.record.apply_async(args=("outbox-dropped",), tm=request.tm)
    ids = {row[0] for row in outbox_rows(db, app.main)}
    assert {kept.id, dropped.id} <= ids
    assert cancel(dropped.id, registry) is True
    assert cancel(dropped.id, registry) is False  # gone already; the mark stays
    ids = {row[0] for row in outbox_rows(db, app.main)}
    assert kept.id in ids and dropped.id not in ids
    assert is_cancelled(dropped.id, registry)
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM websauna_tasks_outbox WHERE app = :app"), {"app": app.main})


# -- the command line ---------------------------------------------------------------------------------------------

def test_ws_celery_cancel_by_id_and_by_name(make_app, redis_url, database_url, queue_name, db, redis_client,
                                            write_ini, subprocess_env):
    settings = redis_settings(redis_url, database_url, queue_name)
    router = make_app(**settings)
    registry = router.registry
    ini = write_ini(settings)
    task_id = str(uuid.uuid4())
    result = run_cli(ini, "--", "cancel", task_id, env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cancelled {task_id}"
    assert is_cancelled(task_id, registry)

    name = f"cli-job-{uuid.uuid4().hex[:8]}"
    named = defer(deferred_functions.record, "cli-named", _name=name, _registry=registry)
    result = run_cli(ini, "--", "cancel", "--name", name, env=subprocess_env)
    assert result.returncode == 0, result.stderr
    assert named in result.stdout and is_cancelled(named, registry)
    result = run_cli(ini, "--", "cancel", "--name", name, env=subprocess_env)
    assert result.returncode == 1 and "no pending task holds the name" in result.stderr

    for forged in ("x" * 300, " "):
        result = run_cli(ini, "--", "cancel", forged, env=subprocess_env)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("ws-celery: cancel: not a task id")
    result = run_cli(ini, "--", "cancel", env=subprocess_env)
    assert result.returncode == 2 and "usage" in result.stderr
