"""The transactional outbox (websauna_tasks.outbox): real PostgreSQL, real Redis, real ws-celery processes."""
from __future__ import annotations

import logging
import statistics
import time

import pytest
import transaction
import webtest
from sqlalchemy import text

from tests.apps import sample_tasks
from tests.conftest import queued_messages
from tests.outbox_helpers import outbox_rows
from tests.servers import PrivateRedis
from websauna_tasks.db import get_engine
from websauna_tasks.outbox import OutboxError, OutboxRelay, get_outbox
from websauna_tasks.registry import get_celery
from websauna_tasks.request import task_request
from websauna_tasks.testing import TaskClient, wait_for


@pytest.fixture
def app_name(queue_name):
    # Rows are per app name: each test relays its own rows only.
    return f"outbox-{queue_name}"


@pytest.fixture
def outbox_settings(redis_url, database_url, queue_name, db, app_name):
    def factory(broker_url: str | None = None, **extra: str) -> dict[str, str]:
        config = {"broker_url": broker_url or redis_url, "task_default_queue": queue_name}
        settings = {
            "websauna.celery_config": repr(config),
            "sqlalchemy.url": database_url,
            "websauna_tasks.app_name": app_name,
            "websauna_tasks.outbox": "true",
            "websauna_tasks.outbox_poll_seconds": "5",
        }
        settings.update(extra)
        return settings

    return factory


def sent_ids(redis_client, queue_name):
    return [m["headers"]["id"] for m in queued_messages(redis_client, queue_name)]


def published(router) -> None:
    """Wait for the fast path's thread to have tried every row this process committed."""
    assert get_outbox(get_celery(router.registry)).fast_path.flush(10)


def effects(db):
    with db.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT task_id, value FROM ws_test_effects ORDER BY id"))]


# -- written in the request's transaction ---------------------------------------------------------

def test_commit_writes_the_row_in_the_transaction_then_publishes_it(outbox_settings, make_app, db, app_name,
                                                                     redis_client, queue_name):
    router = make_app(**outbox_settings())
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('one')"))
            result = sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
            # Not visible outside the transaction, not sent.
            assert outbox_rows(db, app_name) == []
            assert sent_ids(redis_client, queue_name) == []
    published(router)
    rows = outbox_rows(db, app_name)
    assert [(row_id, name) for row_id, name, _sent in rows] == [(result.id, "tests.add")]
    assert rows[0][2] is not None, "the fast path marks the row sent"
    messages = queued_messages(redis_client, queue_name)
    assert [m["headers"]["id"] for m in messages] == [result.id]
    assert messages[0]["headers"]["task"] == "tests.add"


def test_abort_leaves_no_row_and_no_message(outbox_settings, make_app, db, app_name, redis_client, queue_name):
    router = make_app(**outbox_settings())
    with task_request(router.registry) as request:
        with pytest.raises(ValueError):
            with request.tm:
                request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('gone')"))
                sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
                raise ValueError("view failed")
    assert outbox_rows(db, app_name) == []
    assert sent_ids(redis_client, queue_name) == []
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ws_test_rows")).scalar_one() == 0


def test_savepoint_rollback_removes_the_row(outbox_settings, make_app, db, app_name, redis_client, queue_name):
    router = make_app(**outbox_settings())
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES ('kept')"))
            kept = sample_tasks.add.apply_async(args=(1, 1), tm=request.tm)
            savepoint = request.tm.savepoint()
            sample_tasks.add.apply_async(args=(2, 2), tm=request.tm)
            savepoint.rollback()
            also_kept = sample_tasks.add.apply_async(args=(3, 3), tm=request.tm)
    published(router)
    assert [row[0] for row in outbox_rows(db, app_name)] == [kept.id, also_kept.id]
    assert sent_ids(redis_client, queue_name) == [kept.id, also_kept.id]


def test_a_script_transaction_uses_the_session_joined_to_it(outbox_settings, make_app, db, app_name, redis_client,
                                                            queue_name):
    """No request: the zope.sqlalchemy session already joined to ``tm`` holds the row."""
    router = make_app(**outbox_settings())
    with task_request(router.registry) as request:
        session = request.dbsession
    tm = session.info["websauna_tasks.transaction_events"].transaction_manager
    with tm:
        session.execute(text("INSERT INTO ws_test_rows (value) VALUES ('script')"))
        result = sample_tasks.add.apply_async(args=(4, 4), tm=tm)
    published(router)
    assert [row[0] for row in outbox_rows(db, app_name)] == [result.id]
    assert sent_ids(redis_client, queue_name) == [result.id]


def test_no_session_joined_is_a_clear_error_and_nothing_is_queued(outbox_settings, make_app, db, app_name,
                                                                   redis_client, queue_name):
    make_app(**outbox_settings())
    tm = transaction.TransactionManager(explicit=True)
    with pytest.raises(OutboxError, match="no database session is joined"):
        with tm:
            sample_tasks.add.apply_async(args=(1, 2), tm=tm)
    assert outbox_rows(db, app_name) == []
    assert sent_ids(redis_client, queue_name) == []


def test_values_that_cannot_be_stored_are_refused_at_schedule_time(outbox_settings, make_app, db, app_name):
    router = make_app(**outbox_settings())
    with task_request(router.registry) as request:
        with request.tm:
            # Refused before the outbox sees it (websauna_tasks.payload), naming the argument.
            with pytest.raises(TypeError, match=r"tests\.add: argument 1 \(object\) cannot travel as JSON"):
                sample_tasks.add.apply_async(args=(object(), 2), tm=request.tm)
            with pytest.raises(OutboxError, match="option 'headers'"):
                sample_tasks.add.apply_async(args=(1, 2), headers={"x": {1, 2}}, tm=request.tm)
    assert outbox_rows(db, app_name) == []


def test_link_signatures_and_eta_survive_the_table(outbox_settings, make_app, db, app_name, redis_client,
                                                   queue_name):
    import datetime

    router = make_app(**outbox_settings(**{"websauna_tasks.outbox_publish_on_commit": "false"}))
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(text("SELECT 1"))
            result = sample_tasks.add.apply_async(args=(1, 2), link=sample_tasks.record.s(), eta=eta,
                                                  tm=request.tm)
    assert sent_ids(redis_client, queue_name) == []
    assert get_outbox(get_celery(router.registry)).drain() == 1
    (message,) = queued_messages(redis_client, queue_name)
    assert message["headers"]["id"] == result.id
    assert message["headers"]["eta"] == eta.isoformat()
    import base64
    import json
    body = json.loads(base64.b64decode(message["body"]))
    assert body[2]["callbacks"][0]["task"] == "tests.record"


def test_the_task_client_still_captures_before_anything_is_written(outbox_settings, make_app, db, app_name):
    router = make_app(**outbox_settings())
    with TaskClient() as client:
        with task_request(router.registry) as request:
            with request.tm:
                request.dbsession.execute(text("SELECT 1"))
                sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
        assert client.pending_job_count(None) == 1
    assert outbox_rows(db, app_name) == []


def test_sent_rows_are_pruned_after_the_retention(outbox_settings, make_app, db, app_name):
    router = make_app(**outbox_settings(**{"websauna_tasks.outbox_retention_seconds": "60"}))
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(text("SELECT 1"))
            sample_tasks.add.apply_async(args=(1, 2), tm=request.tm)
    published(router)
    outbox = get_outbox(get_celery(router.registry))
    assert outbox.prune() == 0
    assert outbox.prune(now=time.time() + 61) == 1
    assert outbox_rows(db, app_name) == []


def test_sqlite_rows_are_published_by_a_polling_relay(make_app, redis_url, redis_client, queue_name, tmp_path):
    """No LISTEN/NOTIFY and no SKIP LOCKED on SQLite: one relay finds the rows by polling."""
    router = make_app(**{
        "websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name}),
        "sqlalchemy.url": f"sqlite:///{tmp_path / 'app.sqlite'}",
        "websauna_tasks.outbox": "true",
        "websauna_tasks.outbox_publish_on_commit": "false",
        "websauna_tasks.outbox_poll_seconds": "0.2",
    })
    ids = _commit_one_each(router, 3)
    engine = get_engine(router.registry)
    assert [row[0] for row in outbox_rows(engine)] == ids and all(row[2] is None for row in outbox_rows(engine))
    relay = OutboxRelay(get_outbox(get_celery(router.registry)))
    relay.start()
    try:
        wait_for(lambda: relay.published == 3, timeout=10)
        later = _commit_one_each(router, 1)  # nothing wakes it: the next poll finds the row
        started = time.monotonic()
        wait_for(lambda: relay.published == 4, timeout=10)
        waited = time.monotonic() - started
    finally:
        relay.stop()
    assert relay.failures == 0
    assert sent_ids(redis_client, queue_name) == ids + later
    assert all(row[2] is not None for row in outbox_rows(engine))
    assert waited < 2.0, "found by a 0.2 s poll"


def test_outbox_is_off_by_default(make_app, redis_url, database_url, queue_name, db):
    router = make_app(**{"websauna.celery_config": repr({"broker_url": redis_url}), "sqlalchemy.url": database_url})
    with pytest.raises(Exception, match="outbox is off"):
        get_outbox(get_celery(router.registry))


# -- a real worker ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_view_commit_row_relayed_inside_the_worker_runs_with_the_row_id(
        outbox_settings, make_app, write_ini, ws_celery_worker_factory, subprocess_env, db, app_name):
    # No fast path: only the relay inside the worker can publish.
    settings = outbox_settings(**{"websauna_tasks.outbox_publish_on_commit": "false"})
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2", env=subprocess_env)
    testapp = webtest.TestApp(make_app(**settings))
    task_id = testapp.get("/write/hello").text
    with pytest.raises(RuntimeError):
        testapp.get("/write-fail/never")
    assert [row[0] for row in outbox_rows(db, app_name)] == [task_id]
    rows = wait_for(lambda: effects(db), describe=worker.output)
    assert rows == [(task_id, "hello")]
    assert outbox_rows(db, app_name)[0][2] is not None
    # One relay per worker, in its main process, not one per prefork child.
    assert worker.output().count("outbox relay started") == 1


@pytest.mark.slow
def test_broker_down_at_commit_nothing_lost(outbox_settings, make_app, write_ini, ws_celery_worker_factory,
                                           subprocess_env, db, app_name, tmp_path, caplog, queue_name):
    broker = PrivateRedis(str(tmp_path))
    try:
        settings = outbox_settings(broker_url=broker.url, **{"websauna_tasks.outbox_poll_seconds": "0.2"})
        router = make_app(**settings)
        testapp = webtest.TestApp(router)
        started = time.monotonic()
        # Both commits succeed; the fast path tries the broker from its own thread.
        task_id = testapp.get("/write/survives").text
        second_id = testapp.get("/write/also").text
        elapsed = time.monotonic() - started
        fast_path = get_outbox(get_celery(router.registry)).fast_path
        assert fast_path.flush(30)
        tried = time.monotonic() - started
        print(f"\ntwo commits with the broker down: {elapsed * 1000:.0f} ms in all; "
              f"the fast path's thread gave up after {tried:.1f}s")
        assert elapsed < 1.0, "no request waits for the broker"
        assert fast_path.paused_until > time.monotonic()
        assert any("kept in the outbox for the relay" in record.getMessage() for record in caplog.records)
        with db.connect() as conn:
            assert conn.execute(text("SELECT value FROM ws_test_rows ORDER BY id")).scalars().all() == [
                "survives", "also"]
        assert outbox_rows(db, app_name) == [(task_id, "tests.record", None), (second_id, "tests.record", None)]

        relay = OutboxRelay(get_outbox(get_celery(router.registry)))
        with caplog.at_level(logging.INFO, logger="websauna_tasks.outbox"):
            relay.start()
            wait_for(lambda: relay.failures >= 3, timeout=20)
            assert [row[2] for row in outbox_rows(db, app_name)] == [None, None]
            broker.start()
            wait_for(lambda: all(row[2] is not None for row in outbox_rows(db, app_name)), timeout=30)
            relay.stop()
        warnings = [r for r in caplog.records if r.name == "websauna_tasks.outbox" and r.levelno == logging.WARNING
                    and "outbox relay:" in r.getMessage()]
        assert len(warnings) == 1, "one warning per outage"
        assert any("publishing again" in r.getMessage() for r in caplog.records)
        assert [m["headers"]["id"] for m in queued_messages(broker.client(), queue_name)] == [task_id, second_id]

        worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
        assert sorted(wait_for(lambda: len(effects(db)) == 2 and effects(db), describe=worker.output)) == sorted(
            [(task_id, "survives"), (second_id, "also")])
    finally:
        broker.stop()


# -- relays side by side ----------------------------------------------------------------------------

def _commit_rows(router, count: int, per_transaction: int) -> list[str]:
    ids = []
    for start in range(0, count, per_transaction):
        with task_request(router.registry) as request:
            with request.tm:
                request.dbsession.execute(text("SELECT 1"))
                for number in range(start, min(count, start + per_transaction)):
                    ids.append(sample_tasks.add.apply_async(args=(number, 0), tm=request.tm).id)
    return ids


@pytest.mark.slow
def test_two_relays_publish_each_row_exactly_once(outbox_settings, make_app, write_ini, ws_celery_worker_factory,
                                                  subprocess_env, db, app_name, redis_client, queue_name):
    settings = outbox_settings(**{"websauna_tasks.outbox_publish_on_commit": "false",
                                  "websauna_tasks.outbox_batch_size": "7"})
    ini = write_ini(settings)
    relays = [ws_celery_worker_factory(ini, "outbox-relay", "-l", "debug", ready="outbox relay started",
                                       env=subprocess_env) for _ in range(2)]
    router = make_app(**settings)
    ids = _commit_rows(router, 600, per_transaction=20)
    wait_for(lambda: all(row[2] is not None for row in outbox_rows(db, app_name)), timeout=60,
             describe=lambda: relays[0].output()[-2000:] + relays[1].output()[-2000:])
    time.sleep(0.5)
    published = sent_ids(redis_client, queue_name)
    assert len(published) == len(ids)
    assert sorted(published) == sorted(ids)
    split = [sum(int(line.rsplit("published ", 1)[1].split()[0]) for line in relay.output().splitlines()
                 if "relay: published" in line) for relay in relays]
    print(f"\n600 rows, two relays: {split[0]} + {split[1]} published")
    assert sum(split) == 600
    assert all(share > 0 for share in split), "both relays took part"


# -- LISTEN/NOTIFY --------------------------------------------------------------------------------

@pytest.mark.slow
def test_notify_wakes_the_relay_well_before_the_poll_interval(outbox_settings, make_app, write_ini,
                                                               ws_celery_worker_factory, subprocess_env, db,
                                                               redis_client, queue_name):
    settings = outbox_settings(**{"websauna_tasks.outbox_publish_on_commit": "false",
                                  "websauna_tasks.outbox_poll_seconds": "10"})
    relay = ws_celery_worker_factory(write_ini(settings), "outbox-relay", ready="outbox relay started",
                                     env=subprocess_env)
    router = make_app(**settings)
    time.sleep(0.5)  # LISTEN is issued right after the start message
    delays = []
    for number in range(10):
        with task_request(router.registry) as request:
            with request.tm:
                request.dbsession.execute(text("SELECT 1"))
                sample_tasks.add.apply_async(args=(number, 0), tm=request.tm)
        committed = time.monotonic()
        while redis_client.llen(queue_name) < number + 1:
            assert time.monotonic() - committed < 10, relay.output()[-3000:]
            time.sleep(0.001)
        delays.append(time.monotonic() - committed)
    median = statistics.median(delays)
    print(f"\ncommit -> on the broker through LISTEN/NOTIFY: median {median * 1000:.1f} ms, "
          f"max {max(delays) * 1000:.1f} ms (poll interval 10 s)")
    assert max(delays) < 1.0


# -- ws-celery INI -- outbox-relay ------------------------------------------------------------------

@pytest.mark.slow
def test_outbox_relay_command_stops_cleanly_on_sigterm(outbox_settings, write_ini, ws_celery_worker_factory,
                                                      subprocess_env):
    relay = ws_celery_worker_factory(write_ini(outbox_settings()), "outbox-relay", ready="outbox relay started",
                                     env=subprocess_env)
    time.sleep(0.3)
    started = time.monotonic()
    assert relay.stop(timeout=10) == 0
    assert time.monotonic() - started < 5
    with open(relay.log_path) as log:  # stop() closed the process's log handle
        output = log.read()
    assert "SIGTERM received, stopping" in output
    assert "outbox relay stopped" in output


def test_outbox_relay_command_refuses_an_app_without_the_outbox(write_ini, redis_url, database_url, subprocess_env,
                                                                capsys):
    from websauna_tasks.cli import main

    ini = write_ini({"websauna.celery_config": repr({"broker_url": redis_url}), "sqlalchemy.url": database_url})
    assert main([ini, "--", "outbox-relay"]) == 2
    assert "outbox is off" in capsys.readouterr().err


def test_in_process_relay_thread_stops_promptly(outbox_settings, make_app):
    router = make_app(**outbox_settings(**{"websauna_tasks.outbox_poll_seconds": "30"}))
    relay = OutboxRelay(get_outbox(get_celery(router.registry)))
    relay.start()
    wait_for(lambda: relay.rounds >= 1)
    started = time.monotonic()
    relay.stop()
    assert not relay.thread.is_alive()
    assert time.monotonic() - started < 2


# -- the fast path's thread ------------------------------------------------------------------------

def _commit_one_each(router, count: int) -> list[str]:
    ids = []
    for number in range(count):
        with task_request(router.registry) as request, request.tm:
            request.dbsession.execute(text("SELECT 1"))
            ids.append(sample_tasks.add.apply_async(args=(number, 0), tm=request.tm).id)
    return ids


def test_fast_path_publishes_in_commit_order_and_merges_what_waits(outbox_settings, make_app, db, app_name,
                                                                   redis_client, queue_name, monkeypatch):
    router = make_app(**outbox_settings())
    outbox = get_outbox(get_celery(router.registry))
    rounds = []
    original = outbox.publish_pending

    def counting(ids=None, engine=None):
        rounds.append(len(ids))
        return original(ids, engine=engine)

    monkeypatch.setattr(outbox, "publish_pending", counting)
    ids = _commit_one_each(router, 60)
    published(router)
    assert sent_ids(redis_client, queue_name) == ids
    assert all(row[2] is not None for row in outbox_rows(db, app_name))
    assert sum(rounds) == 60
    print(f"\n60 commits, published by the fast path in {len(rounds)} round(s)")


def test_fast_path_runs_in_a_forked_child_of_its_own(outbox_settings, make_app, db, app_name, redis_client,
                                                     queue_name):
    """A server that imports the app, commits, then forks its workers (gunicorn --preload)."""
    import os

    router = make_app(**outbox_settings())
    parent_ids = _commit_one_each(router, 1)  # the parent's thread now exists
    published(router)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code only
        code = 1
        try:
            get_engine(router.registry).dispose(close=False)  # the parent's connections are not ours
            child_ids = _commit_one_each(router, 3)
            code = 0 if get_outbox(get_celery(router.registry)).fast_path.flush(10) and \
                sent_ids(redis_client, queue_name)[-3:] == child_ids else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(sent_ids(redis_client, queue_name)) == 4 and sent_ids(redis_client, queue_name)[0] == parent_ids[0]
    # The parent's own thread still serves the parent.
    more = _commit_one_each(router, 1)
    published(router)
    assert sent_ids(redis_client, queue_name)[-1] == more[0]


def test_a_script_that_commits_and_exits_at_once_has_its_message_published(outbox_settings, write_ini, db,
                                                                           app_name, redis_client, queue_name,
                                                                           subprocess_env):
    import os
    import subprocess
    import sys

    ini = write_ini(outbox_settings())
    script = (
        "import sys\n"
        "from pyramid.paster import get_app\n"
        "from sqlalchemy import text\n"
        "from tests.apps import sample_tasks\n"
        "from websauna_tasks.request import task_request\n"
        "router = get_app(sys.argv[1])\n"
        "with task_request(router.registry) as request, request.tm:\n"
        "    request.dbsession.execute(text('SELECT 1'))\n"
        "    print(sample_tasks.add.apply_async(args=(2, 3), tm=request.tm).id)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, ini], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **subprocess_env})
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    # No relay ran anywhere: the exiting process published it itself.
    assert sent_ids(redis_client, queue_name) == [task_id]
    assert outbox_rows(db, app_name)[0][0] == task_id and outbox_rows(db, app_name)[0][2] is not None


def test_the_relay_creates_the_table_itself_on_a_fresh_database(outbox_settings, make_app, db):
    """The relay's engine is READ COMMITTED on PostgreSQL; its DDL must still commit."""
    from websauna_tasks.outbox import _table

    with db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS websauna_tasks_outbox"))
    _table._created.clear()  # this process would not look again
    outbox = get_outbox(get_celery(make_app(**outbox_settings()).registry))
    assert outbox.pending_count() == 0
    with db.connect() as conn:
        indexes = conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'websauna_tasks_outbox'"))
        assert {"ix_websauna_tasks_outbox_pending", "ix_websauna_tasks_outbox_sent"} <= set(indexes.scalars())
