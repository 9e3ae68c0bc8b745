"""Large payloads (claim check, websauna_tasks/claim_check.py): real PostgreSQL, Redis and ws-celery workers.

A payload over ``websauna_tasks.payload_store_threshold_bytes`` is a row of
``websauna_tasks_payloads`` written with the sending transaction; the broker
carries an empty argument list and a header naming the task id; the worker's
intake puts the arguments back before anything else looks at them. The 5 MB
payload sent through the outbox while Redis is down is in
tests/test_fault_claim_check.py (the fault tier).
"""
from __future__ import annotations

import base64
import datetime
import json
import os
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa
import transaction
from pyramid.exceptions import ConfigurationError

from tests.apps import claim_check_tasks, deferred_functions
from tests.apps.claim_check_tasks import describe
from tests.outbox_helpers import outbox_rows
from tests.test_cli import ws_celery_argv
from websauna_tasks import PayloadTooLarge, defer, get_celery, prune_stored_payloads
from websauna_tasks.claim_check import PAYLOAD_HEADER, claim_check_of
from websauna_tasks.deadletters import list_dead_letters
from websauna_tasks.request import task_request
from websauna_tasks.schema import PAYLOADS_TABLE_NAME, MissingTables
from websauna_tasks.settings import parse_settings
from websauna_tasks.testing import wait_for

SCAN = "tests.apps.claim_check_tasks"
#: Above this the arguments are stored: the payloads below are ten times that.
THRESHOLD = 64 * 1024
BLOB = "claim-check " * 60_000  # 720,000 characters: over the default max_payload_bytes (512 KiB) too
THRESHOLD_KEY = "websauna_tasks.payload_store_threshold_bytes"
MAX_KEY = "websauna_tasks.payload_store_max_bytes"
RETENTION_KEY = "websauna_tasks.payload_store_retention_seconds"


def settings_for(redis_url, database_url, queue_name, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url, "tests.scan": SCAN,
                "websauna.site_url": "http://localhost",
                "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
                "websauna_tasks.unknown_task_grace_seconds": "0",
                THRESHOLD_KEY: str(THRESHOLD)}
    settings.update(extra)
    return settings


@pytest.fixture
def build(make_app, redis_url, database_url, queue_name, db):
    def factory(**extra):
        return make_app(**settings_for(redis_url, database_url, queue_name, **extra))
    return factory


def stored_rows(db, *ids: str) -> dict[str, tuple[str, int, float]]:
    """task_name, payload length and retention (expires_at - created_at) of the rows of ``ids``."""
    with db.connect() as conn:
        if not sa.inspect(conn).has_table(PAYLOADS_TABLE_NAME):
            return {}
        rows = conn.execute(sa.text(f"SELECT id, task_name, length(payload), expires_at - created_at "
                                    f"FROM {PAYLOADS_TABLE_NAME} WHERE id = ANY(:ids)"), {"ids": list(ids)}).all()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def queued(redis_client, queue_name) -> list[dict]:
    return [json.loads(raw) for raw in redis_client.lrange(queue_name, 0, -1)]


def body_of(message: dict) -> list:
    return json.loads(base64.b64decode(message["body"]))


def effects(db) -> dict[str, list[dict]]:
    with db.connect() as conn:
        rows = conn.execute(sa.text("SELECT task_id, value FROM ws_test_effects ORDER BY id")).all()
    found: dict[str, list[dict]] = {}
    for task_id, value in rows:
        found.setdefault(task_id, []).append(json.loads(value))
    return found


def insert_row(db, task_id: str, task_name: str, payload: str, expires_in: float = 3600.0) -> None:
    now = time.time()
    with db.begin() as conn:
        conn.execute(sa.text(f"INSERT INTO {PAYLOADS_TABLE_NAME} (id, task_name, payload, created_at, expires_at) "
                             "VALUES (:id, :name, :payload, :now, :expires)"),
                     {"id": task_id, "name": task_name, "payload": payload, "now": now, "expires": now + expires_in})


# -- the settings (no service) ------------------------------------------------------------------------------------

MEMORY = {"websauna.celery_config": "{'broker_url': 'memory://'}"}


@pytest.mark.parametrize(("extra", "fragment"), [
    ({THRESHOLD_KEY: "600000"}, "more than websauna_tasks.max_payload_bytes"),
    ({THRESHOLD_KEY: "100000", MAX_KEY: "50000"}, "more than websauna_tasks.payload_store_max_bytes"),
    ({THRESHOLD_KEY: "-1"}, THRESHOLD_KEY),
    ({THRESHOLD_KEY: "100"}, THRESHOLD_KEY),  # below 1024: a reference costs more than it saves
    ({THRESHOLD_KEY: "lots"}, THRESHOLD_KEY),
    ({THRESHOLD_KEY: "nan"}, THRESHOLD_KEY),
    ({THRESHOLD_KEY: "1e309"}, THRESHOLD_KEY),
    ({THRESHOLD_KEY: "65536.5"}, THRESHOLD_KEY),
    ({MAX_KEY: "0"}, MAX_KEY),
    ({MAX_KEY: str(2 ** 31)}, MAX_KEY),
    ({RETENTION_KEY: "-5"}, RETENTION_KEY),
    ({RETENTION_KEY: "inf"}, RETENTION_KEY),
    ({RETENTION_KEY: "1"}, RETENTION_KEY),
])
def test_hostile_settings_stop_the_startup(extra, fragment):
    with pytest.raises(ConfigurationError) as caught:
        parse_settings({**MEMORY, **extra})
    assert fragment in str(caught.value)


def test_storage_is_off_by_default_and_a_threshold_needs_a_database(make_app):
    parsed = parse_settings(MEMORY)
    assert parsed.payload_store_threshold_bytes == 0
    assert parsed.payload_store_max_bytes == 32 * 1024 * 1024
    assert parsed.payload_store_retention_seconds == 7 * 24 * 3600
    with pytest.raises(ConfigurationError, match="sqlalchemy.url is not set"):
        make_app(**MEMORY, **{THRESHOLD_KEY: "65536"}, **{"tests.scan": SCAN})


def test_create_tables_never_checks_the_payloads_table_at_startup(make_app, tmp_path):
    database = f"sqlite:///{tmp_path / 'fresh.db'}"
    with pytest.raises(MissingTables) as caught:
        make_app(**MEMORY, **{"sqlalchemy.url": database, "websauna_tasks.create_tables": "never",
                              THRESHOLD_KEY: "65536", "tests.scan": SCAN})
    assert f"table {PAYLOADS_TABLE_NAME}" in str(caught.value)
    with pytest.raises(MissingTables) as caught:  # off: the table is not needed
        make_app(**MEMORY, **{"sqlalchemy.url": database, "websauna_tasks.create_tables": "never", "tests.scan": SCAN})
    assert PAYLOADS_TABLE_NAME not in str(caught.value)


def test_off_by_default_a_large_payload_is_still_refused_at_the_call(make_app):
    make_app(**MEMORY, **{"sqlalchemy.url": "sqlite://", "tests.scan": SCAN})
    with pytest.raises(PayloadTooLarge, match="max_payload_bytes"):
        claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None)


# -- sending --------------------------------------------------------------------------------------------------------

def test_on_commit_the_row_is_written_in_the_transaction_and_only_a_reference_travels(build, db, redis_client,
                                                                                       queue_name):
    router = build()
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(sa.text("INSERT INTO ws_test_rows (value) VALUES ('with-payload')"))
            sent = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "commit"}, tm=request.tm)
            # Not committed: nobody else sees the row, and nothing is queued.
            assert stored_rows(db, sent.id) == {}
            assert queued(redis_client, queue_name) == []
    assert stored_rows(db, sent.id) == {sent.id: ("tests.claim.digest", len(json.dumps([[BLOB], {"tag": "commit"}])),
                                                  7 * 24 * 3600)}
    [message] = queued(redis_client, queue_name)
    assert message["headers"]["id"] == sent.id
    assert message["headers"][PAYLOAD_HEADER] == sent.id
    assert body_of(message)[:2] == [[], {}]
    assert len(message["body"]) < 1000

    # Rolled back: no row, no message.
    with task_request(router.registry) as request:
        request.tm.begin()
        aborted = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=request.tm)
        request.dbsession.flush()
        request.tm.abort()
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(sa.text("SELECT 1"))
            savepoint = request.tm.savepoint()
            undone = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=request.tm)
            savepoint.rollback()
            kept = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "kept"}, tm=request.tm)
    assert set(stored_rows(db, aborted.id, undone.id, kept.id)) == {kept.id}
    assert sorted(m["headers"]["id"] for m in queued(redis_client, queue_name)) == sorted([sent.id, kept.id])


def test_a_script_transaction_without_a_session_gets_one_joined_to_it(build, db, redis_client, queue_name):
    build()
    tm = transaction.manager
    with tm:
        sent = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=tm)
    assert set(stored_rows(db, sent.id)) == {sent.id}
    assert [m["headers"][PAYLOAD_HEADER] for m in queued(redis_client, queue_name)] == [sent.id]
    tm.begin()
    dropped = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=tm)
    tm.abort()
    assert stored_rows(db, dropped.id) == {}


def test_sent_now_the_row_is_committed_first_and_deleted_when_the_publish_fails(build, db, redis_client,
                                                                                 queue_name):
    build()
    sent = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None, countdown=30)
    assert set(stored_rows(db, sent.id)) == {sent.id}
    # The countdown is added to the retention: the row outlives the wait.
    assert stored_rows(db, sent.id)[sent.id][2] == pytest.approx(7 * 24 * 3600 + 30, abs=1)
    # A broker nobody listens on: the publish fails, and the row it would have pointed to goes.
    unreachable = build(**{"websauna.celery_config": repr({
        "broker_url": "redis://127.0.0.1:1/0", "task_default_queue": queue_name,
        "broker_transport_options": {"max_retries": 0}, "broker_connection_retry": False})})
    assert unreachable
    task_id = str(uuid.uuid4())
    with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError, whatever the client raises
        claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None, task_id=task_id, retry=False)
    assert stored_rows(db, task_id) == {}


def test_small_payloads_travel_inline_and_nothing_is_stored(build, db, redis_client, queue_name):
    build()
    sent = claim_check_tasks.digest.apply_async(args=("small",), tm=None)
    [message] = queued(redis_client, queue_name)
    assert PAYLOAD_HEADER not in message["headers"]
    assert body_of(message)[:2] == [["small"], {}]
    assert stored_rows(db, sent.id) == {}


def test_over_the_store_limit_is_refused_at_the_call_and_frees_the_name(build, db, redis_client, queue_name):
    build(**{MAX_KEY: str(256 * 1024)})
    name = f"cc-{uuid.uuid4().hex[:8]}"
    with pytest.raises(PayloadTooLarge, match=MAX_KEY):
        claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None, unique_name=name)
    assert queued(redis_client, queue_name) == []
    # The name was never claimed: the next send takes it.
    again = claim_check_tasks.digest.apply_async(args=("x" * 200_000,), tm=None, unique_name=name)
    assert set(stored_rows(db, again.id)) == {again.id}


# -- the worker ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_names_countdown_eta_queues_and_defer_work_with_stored_payloads(
        build, db, redis_client, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url,
        database_url):
    router = build()
    other = f"{queue_name}.other"
    name = f"cc-name-{uuid.uuid4().hex[:8]}"
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(sa.text("SELECT 1"))
            plain = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "plain"}, tm=request.tm)
            named = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "named"}, tm=request.tm,
                                                         unique_name=name)
            # The name is taken: the holder's id, no second row.
            same = claim_check_tasks.digest.apply_async(args=(BLOB + "2",), kwargs={"tag": "named2"}, tm=request.tm,
                                                        unique_name=name)
    assert same.id == named.id
    sent_at = time.time()
    delayed = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "countdown"}, tm=None, countdown=3)
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=4)
    timed = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "eta"}, tm=None, eta=eta)
    routed = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "queue"}, tm=None, queue=other)
    # defer(): the deferred call's message is stored; the intake checks the function on the loaded arguments.
    key = f"cc-deferred-{uuid.uuid4().hex[:8]}"
    deferred = defer(deferred_functions.record, key, note=BLOB, _registry=router.registry)
    ids = [plain.id, named.id, delayed.id, timed.id, routed.id, deferred]
    assert set(stored_rows(db, *ids)) == set(ids)

    worker = ws_celery_worker_factory(write_ini(settings_for(redis_url, database_url, queue_name)), "worker", "-c",
                                      "2", "-Q", f"{queue_name},{other}", env=subprocess_env)
    done = wait_for(lambda: len(effects(db)) == 6 and effects(db), timeout=60, describe=worker.output)
    finished_at = time.time()
    [deferred_run] = done.pop(key)
    assert deferred_run["note"] == BLOB
    by_tag = {runs[0]["tag"]: (task_id, runs) for task_id, runs in done.items()}
    assert set(by_tag) == {"plain", "named", "countdown", "eta", "queue"}
    for task_id, runs in by_tag.values():
        assert [run["payload"] for run in runs] == [describe(BLOB)], task_id
    assert by_tag["named"][0] == named.id
    assert by_tag["eta"][1][0]["eta"].startswith(eta.isoformat()[:19])
    assert by_tag["queue"][1][0]["queue"] == other
    assert finished_at - sent_at >= 3
    # Deleted after each success.
    wait_for(lambda: stored_rows(db, *ids) == {}, timeout=20, describe=worker.output)
    assert "payload_missing" not in worker.output()
    assert list_dead_letters(router.registry) == []


@pytest.mark.slow
def test_retries_find_their_payload_and_idempotent_duplicates_are_skipped(
        build, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url, database_url):
    router = build()
    flaky = claim_check_tasks.flaky.apply_async(args=(BLOB,), kwargs={"tag": "flaky", "failures": 2}, tm=None)
    duplicate_id = str(uuid.uuid4())
    for _ in range(2):  # the same message twice: a redelivery
        claim_check_tasks.idempotent.apply_async(args=(BLOB,), kwargs={"tag": "once"}, tm=None, task_id=duplicate_id)
    worker = ws_celery_worker_factory(write_ini(settings_for(redis_url, database_url, queue_name)), "worker", "-c",
                                      "1", "-l", "info", env=subprocess_env)
    runs = wait_for(lambda: len(effects(db).get(flaky.id, ())) == 3 and effects(db)[flaky.id], timeout=60,
                    describe=worker.output)
    assert [run["tag"] for run in runs] == ["flaky:attempt0", "flaky:attempt1", "flaky:attempt2"]
    assert {run["payload"] for run in runs} == {describe(BLOB)}
    wait_for(lambda: stored_rows(db, flaky.id) == {}, timeout=20, describe=worker.output)
    wait_for(lambda: worker.output().count(f"{duplicate_id}] succeeded") == 2 or "already done" in worker.output(),
             timeout=30, describe=worker.output)
    assert [run["payload"] for run in effects(db)[duplicate_id]] == [describe(BLOB)]
    # An idempotent task's row stays for its duplicates, until the retention.
    assert set(stored_rows(db, duplicate_id)) == {duplicate_id}
    assert list_dead_letters(router.registry) == []


@pytest.mark.slow
def test_missing_malformed_and_forged_references_are_dead_letters_and_the_worker_keeps_running(
        build, db, redis_client, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url,
        database_url):
    router = build(**{MAX_KEY: str(256 * 1024)})
    app = get_celery(router.registry)
    claim_check_of(app).ensure_table(sa.create_engine(database_url))
    name = "tests.claim.digest"
    forged: dict[str, tuple[str, str]] = {}

    def forge(header, task_id=None, expect=("malformed", "")):
        task_id = task_id or str(uuid.uuid4())
        app.send_task(name, args=(), kwargs={}, task_id=task_id, queue=queue_name, headers={PAYLOAD_HEADER: header})
        forged[task_id] = expect
        return task_id

    forge(5, expect=("malformed", "is a int, not a task id"))
    forge(["a", "list"], expect=("malformed", "is a list, not a task id"))
    forge("x" * 100_000, expect=("malformed", "does not name this message's task id"))
    forge("'; DROP TABLE websauna_tasks_payloads; --", expect=("malformed", "does not name this message's task id"))
    sql_id = "'; DROP TABLE websauna_tasks_payloads; --"
    forge(sql_id, task_id=sql_id, expect=("payload_missing", "no stored payload"))
    forge(None, expect=("malformed", "is a NoneType, not a task id"))
    missing = str(uuid.uuid4())
    forge(missing, task_id=missing, expect=("payload_missing", "pruned after"))
    for payload, why in [("not json at all", "is not JSON"), ('{"args": []}', "not the pair [args, kwargs]"),
                         ('[["a"], {}, 3]', "not the pair"), ('[{"a": 1}, []]', "not the pair")]:
        bad = str(uuid.uuid4())
        insert_row(db, bad, name, payload)
        forge(bad, task_id=bad, expect=("malformed", why))
    deep = str(uuid.uuid4())
    nested: list = []
    for _ in range(100):
        nested = [nested]
    insert_row(db, deep, name, json.dumps([[nested], {}]))
    forge(deep, task_id=deep, expect=("malformed", "levels deep"))
    deeper = str(uuid.uuid4())
    insert_row(db, deeper, name, "[" * 100_000 + "]" * 100_000)
    forge(deeper, task_id=deeper, expect=("malformed", "is not JSON: RecursionError"))
    other_task = str(uuid.uuid4())
    insert_row(db, other_task, "tests.record", json.dumps([["x"], {}]))
    forge(other_task, task_id=other_task, expect=("malformed", "belongs to task 'tests.record'"))
    huge = str(uuid.uuid4())
    insert_row(db, huge, name, json.dumps([["y" * 300_000], {}]))
    forge(huge, task_id=huge, expect=("too_large", "more than websauna_tasks.payload_store_max_bytes = 262144"))
    # Arguments that do not fit the task: the signature check sees the loaded ones.
    unfit = str(uuid.uuid4())
    insert_row(db, unfit, name, json.dumps([["a", "b", "c"], {}]))
    forge(unfit, task_id=unfit, expect=("signature_mismatch", ""))
    good = claim_check_tasks.digest.apply_async(args=("z" * 100_000,), kwargs={"tag": "good"}, tm=None)

    worker = ws_celery_worker_factory(write_ini(settings_for(redis_url, database_url, queue_name,
                                                             **{MAX_KEY: str(256 * 1024)})),
                                      "worker", "-c", "1", "-l", "info", env=subprocess_env)
    wait_for(lambda: good.id in effects(db), timeout=60, describe=worker.output)
    letters = wait_for(lambda: len(list_dead_letters(router.registry)) == len(forged)
                       and list_dead_letters(router.registry), timeout=30, describe=worker.output)
    by_id = {letter["id"]: letter for letter in letters}
    assert set(by_id) == set(forged)
    for task_id, (kind, fragment) in forged.items():
        assert by_id[task_id]["kind"] == kind, by_id[task_id]
        assert fragment in by_id[task_id]["reason"], by_id[task_id]
    assert [run["payload"] for run in effects(db)[good.id]] == [describe("z" * 100_000)]
    assert set(effects(db)) == {good.id}
    with db.connect() as conn:  # the SQL-ish id was a parameter, nothing else
        assert sa.inspect(conn).has_table(PAYLOADS_TABLE_NAME)
    assert worker.process.poll() is None
    again = claim_check_tasks.digest.apply_async(args=("w" * 100_000,), kwargs={"tag": "again"}, tm=None)
    wait_for(lambda: again.id in effects(db), timeout=30, describe=worker.output)


@pytest.mark.slow
def test_a_worker_on_another_or_an_unreachable_database_dead_letters_the_reference(
        build, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url, database_url,
        tmp_path):
    router = build()
    sent = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    settings = settings_for(redis_url, elsewhere, queue_name)
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info", env=subprocess_env)
    [letter] = wait_for(lambda: list_dead_letters(router.registry), timeout=60, describe=worker.output)
    assert letter["id"] == sent.id and letter["kind"] == "payload_missing"
    assert f"has no table {PAYLOADS_TABLE_NAME}" in letter["reason"] and "elsewhere.db" in letter["reason"]
    assert worker.process.poll() is None
    # The row is still where it was written: a worker of the right database can run the requeued letter.
    assert set(stored_rows(db, sent.id)) == {sent.id}
    worker.stop()

    # A database that cannot be reached: unavailable, not missing (requeue it once the database is back).
    again = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None)
    down = settings_for(redis_url, "postgresql+psycopg://root@127.0.0.1:1/test", queue_name)
    worker = ws_celery_worker_factory(write_ini(down, "down.ini"), "worker", "-c", "1", "-l", "info",
                                      env=subprocess_env)
    letter = wait_for(lambda: [entry for entry in list_dead_letters(router.registry) if entry["id"] == again.id],
                      timeout=60, describe=worker.output)[0]
    assert letter["kind"] == "payload_unavailable" and "could not be read" in letter["reason"]
    assert worker.process.poll() is None


def test_the_outbox_stores_the_row_with_its_own_and_the_relay_sends_the_reference(
        build, db, redis_client, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url,
        database_url):
    app_name = f"cc-{queue_name}"
    outbox = {"websauna_tasks.outbox": "true", "websauna_tasks.app_name": app_name,
              "websauna_tasks.outbox_publish_on_commit": "false", "websauna_tasks.outbox_poll_seconds": "0.2"}
    router = build(**outbox)
    with task_request(router.registry) as request:
        request.tm.begin()
        claim_check_tasks.digest.apply_async(args=(BLOB,), tm=request.tm)
        request.dbsession.flush()
        request.tm.abort()
    assert outbox_rows(db, app_name) == []
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(sa.text("SELECT 1"))
            sent = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "outbox"}, tm=request.tm)
    assert [row[0] for row in outbox_rows(db, app_name)] == [sent.id]
    assert set(stored_rows(db, sent.id)) == {sent.id}
    with db.connect() as conn:
        args, options = conn.execute(sa.text("SELECT args, options FROM websauna_tasks_outbox WHERE id = :id"),
                                     {"id": sent.id}).one()
    assert json.loads(args) == [] and json.loads(options)["headers"][PAYLOAD_HEADER] == sent.id
    assert redis_client.llen(queue_name) == 0
    worker = ws_celery_worker_factory(write_ini(settings_for(redis_url, database_url, queue_name, **outbox)),
                                      "worker", "-c", "1", env=subprocess_env)
    runs = wait_for(lambda: effects(db).get(sent.id), timeout=60, describe=worker.output)
    assert [run["payload"] for run in runs] == [describe(BLOB)]
    wait_for(lambda: stored_rows(db, sent.id) == {}, timeout=20, describe=worker.output)


def test_rows_past_their_retention_are_pruned(build, db):
    router = build()
    claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None, countdown=10)
    expired, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    insert_row(db, expired, "tests.claim.digest", "[[], {}]", expires_in=-1)
    insert_row(db, fresh, "tests.claim.digest", "[[], {}]", expires_in=3600)
    assert prune_stored_payloads(router.registry) >= 1
    assert set(stored_rows(db, expired, fresh)) == {fresh}
    # Past the countdown and the retention, as a worker's pruner would see it next week.
    assert prune_stored_payloads(get_celery(router.registry), now=time.time() + 8 * 24 * 3600) >= 2
    assert stored_rows(db, fresh) == {}


def test_the_stored_payloads_command_counts_and_prunes(build, db, write_ini, subprocess_env, redis_url,
                                                      database_url, queue_name):
    build()
    expired, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    insert_row(db, expired, "tests.claim.digest", "[[], {}]", expires_in=-1)
    insert_row(db, fresh, "tests.claim.digest", "[[], {}]", expires_in=3600)
    ini = write_ini(settings_for(redis_url, database_url, queue_name))

    def run(*args):
        return subprocess.run([*ws_celery_argv(), ini, "--", "stored-payloads", *args], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **subprocess_env})

    status = run("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["stored"] >= 2
    pruned = run("prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout)["pruned"] >= 1
    assert set(stored_rows(db, expired, fresh)) == {fresh}
    assert run("vacuum").returncode == 2


@pytest.mark.slow
def test_a_database_blip_gives_the_reference_back_until_it_can_be_loaded(
        build, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url, database_url):
    # The worker logs in as a role of its own, so its database can be taken away (NOLOGIN and its connections
    # ended) while the sender's stays: the load fails as in an outage, and comes back with the role.
    router = build()
    role = f"wsblip_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(db.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN SUPERUSER'))
    worker = None
    try:
        url = sa.engine.make_url(database_url).set(username=role).render_as_string(hide_password=False)
        settings = settings_for(redis_url, url, queue_name, **{
            "websauna_tasks.unknown_task_grace_seconds": "120", "websauna_tasks.unknown_task_retry_seconds": "1"})
        worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info", env=subprocess_env)
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER ROLE "{role}" NOLOGIN'))
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"),
                         {"role": role})
        sent = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "blip"}, tm=None)
        given_back = f"message {sent.id} for task 'tests.claim.digest' whose stored arguments cannot be read given back"
        wait_for(lambda: worker.output().count(given_back) >= 2, timeout=60, describe=worker.output)
        assert list_dead_letters(router.registry) == [] and sent.id not in effects(db)

        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER ROLE "{role}" LOGIN'))
        runs = wait_for(lambda: effects(db).get(sent.id), timeout=60, describe=worker.output)
        assert [run["payload"] for run in runs] == [describe(BLOB)]
        assert list_dead_letters(router.registry) == []
        assert worker.process.poll() is None
    finally:
        if worker is not None:
            worker.stop()
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :role"),
                         {"role": role})
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()


@pytest.mark.slow
def test_a_database_that_stays_down_is_a_dead_letter_after_the_grace(
        build, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url):
    router = build()
    sent = claim_check_tasks.digest.apply_async(args=(BLOB,), tm=None)
    down = settings_for(redis_url, "postgresql+psycopg://root@127.0.0.1:1/test", queue_name, **{
        "websauna_tasks.unknown_task_grace_seconds": "3", "websauna_tasks.unknown_task_retry_seconds": "1"})
    worker = ws_celery_worker_factory(write_ini(down), "worker", "-c", "1", "-l", "info", env=subprocess_env)
    [letter] = wait_for(lambda: list_dead_letters(router.registry), timeout=60, describe=worker.output)
    assert letter["id"] == sent.id and letter["kind"] == "payload_unavailable"
    assert "could not be read" in letter["reason"] and "unknown_task_grace_seconds = 3" in letter["reason"]
    assert "given back" in worker.output() and worker.process.poll() is None
    assert set(stored_rows(db, sent.id)) == {sent.id}  # kept for the requeue once the database is back


@pytest.mark.slow
@pytest.mark.parametrize("transport, pool, outbox", [
    ("amqp", "prefork", False), ("amqp", "prefork", True), ("redis", "threads", False), ("redis", "solo", False)])
def test_stored_payloads_run_on_rabbitmq_and_under_every_pool(
        make_app, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, redis_url, rabbitmq_url,
        database_url, transport, pool, outbox):
    # The load splices the stored arguments into the message in the consumer; the pool then gets them
    # by its own route (pickled to a prefork child, shared with a thread, called in place by solo).
    # RabbitMQ has no batched writer: the reference goes through Celery's send_task, whose signature
    # check must not see the message's empty arguments (it did, and the send after commit was lost).
    # Through the outbox, the relay in the worker sends it (strict: a refusal would keep the row forever).
    extra = {"websauna_tasks.outbox": "true", "websauna_tasks.app_name": f"cc-{queue_name}",
             "websauna_tasks.outbox_publish_on_commit": "false",
             "websauna_tasks.outbox_poll_seconds": "0.2"} if outbox else {}
    settings = settings_for(rabbitmq_url if transport == "amqp" else redis_url, database_url, queue_name, **extra)
    router = make_app(**settings)
    with task_request(router.registry) as request:
        with request.tm:
            request.dbsession.execute(sa.text("SELECT 1"))
            on_commit = claim_check_tasks.digest.apply_async(args=(BLOB,), kwargs={"tag": "commit"}, tm=request.tm)
    delayed = claim_check_tasks.digest.apply_async(args=(BLOB + "!",), kwargs={"tag": "countdown"}, tm=None,
                                                   countdown=2)
    assert set(stored_rows(db, on_commit.id, delayed.id)) == {on_commit.id, delayed.id}
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-P", pool, "-c", "1", "-l", "info",
                                      env=subprocess_env)
    done = wait_for(lambda: on_commit.id in effects(db) and delayed.id in effects(db) and effects(db),
                    timeout=90, describe=worker.output)
    assert [run["payload"] for run in done[on_commit.id]] == [describe(BLOB)]
    assert [run["payload"] for run in done[delayed.id]] == [describe(BLOB + "!")]
    wait_for(lambda: stored_rows(db, on_commit.id, delayed.id) == {}, timeout=30, describe=worker.output)
    assert list_dead_letters(router.registry) == [] and worker.process.poll() is None


# -- deletion after a successful run (Celery's task_postrun, names._after_run) --------------------------------------

def test_a_plain_celery_tasks_stored_payload_is_deleted_after_success_only(build, db):
    """Any task of the app may carry the header: deleted after a success, kept after a failure or a retry,
    and kept when an error leaves the tracer after the run (on_success raised Reject: the message may
    come back and needs its arguments)."""
    import celery
    from celery.exceptions import Reject, Retry

    app = get_celery(build().registry)
    claim_check = claim_check_of(app)
    claim_check.ensure_table(claim_check.engine)
    outcomes = {}

    class Rejecting(celery.Task):
        def on_success(self, retval, task_id, args, kwargs):
            raise Reject("requeue", requeue=True)

    @app.task(shared=False, lazy=False, name=f"tests.plain_stored_{uuid.uuid4().hex}")
    def plain(outcome):
        outcomes[outcome] = True
        if outcome == "fails":
            raise ValueError("boom")
        if outcome == "retries":
            raise Retry("again later", when=60)
        return outcome

    @app.task(shared=False, lazy=False, base=Rejecting, name=f"tests.rejecting_{uuid.uuid4().hex}")
    def rejecting():
        return None

    def run(task, *args):
        task_id = str(uuid.uuid4())
        insert_row(db, task_id, task.name, json.dumps([list(args), {}]))
        try:
            task.apply(args, task_id=task_id, headers={PAYLOAD_HEADER: task_id})
        except Reject:
            pass
        return task_id

    succeeded, failed, retried, rejected = (run(plain, "succeeds"), run(plain, "fails"), run(plain, "retries"),
                                            run(rejecting))
    assert set(outcomes) == {"succeeds", "fails", "retries"}
    assert set(stored_rows(db, succeeded, failed, retried, rejected)) == {failed, retried, rejected}
    # A reference that is not the run's own id deletes nothing.
    other = str(uuid.uuid4())
    insert_row(db, other, plain.name, "[[], {}]")
    plain.apply(("succeeds",), headers={PAYLOAD_HEADER: other})
    assert set(stored_rows(db, other)) == {other}


def test_the_stored_payload_of_a_worker_run_is_deleted_from_the_flattened_headers(build, db):
    """A worker's request carries the header as an attribute of Celery's context."""
    from celery.signals import task_postrun, task_success

    app = get_celery(build().registry)
    claim_check = claim_check_of(app)
    claim_check.ensure_table(claim_check.engine)

    @app.task(shared=False, lazy=False, name=f"tests.flattened_{uuid.uuid4().hex}")
    def task():
        return None

    ids = {state: str(uuid.uuid4()) for state in ("SUCCESS", "FAILURE", "RETRY")}
    for state, task_id in ids.items():
        insert_row(db, task_id, task.name, "[[], {}]")
        task.push_request(id=task_id, **{PAYLOAD_HEADER: task_id})
        try:
            # The signals the tracer sends after a run, in its order.
            if state == "SUCCESS":
                task_success.send(sender=task, result=None, runtime=0.001)
            task_postrun.send(sender=task, task_id=task_id, task=task, args=(), kwargs={}, retval=None, state=state)
        finally:
            task.pop_request()
    assert set(stored_rows(db, *ids.values())) == {ids["FAILURE"], ids["RETRY"]}


@pytest.mark.slow
def test_forged_references_published_straight_to_rabbitmq_are_dead_letters(
        make_app, db, queue_name, write_ini, ws_celery_worker_factory, subprocess_env, rabbitmq_url, database_url):
    # The Redis test above forges through Celery; here a bare kombu producer writes the messages onto
    # RabbitMQ itself, with nobody's send path in between: the intake is the only gate they meet.
    import kombu

    settings = settings_for(rabbitmq_url, database_url, queue_name, **{MAX_KEY: str(256 * 1024)})
    router = make_app(**settings)
    claim_check_of(get_celery(router.registry)).ensure_table(sa.create_engine(database_url))
    name = "tests.claim.digest"
    forged: dict[str, str] = {}

    def publish(producer, header, task_id=None, task=name, expect="malformed"):
        task_id = task_id or str(uuid.uuid4())
        headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                   "group": None, "retries": 0, "eta": None, "expires": None, "argsrepr": "()",
                   "kwargsrepr": "{}", "origin": "forger", PAYLOAD_HEADER: header}
        producer.publish([[], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
                         routing_key=queue_name, headers=headers, serializer="json",
                         declare=[kombu.Queue(queue_name, routing_key=queue_name)])
        forged[task_id] = expect
        return task_id

    missing, other, not_json, huge = (str(uuid.uuid4()) for _ in range(4))
    insert_row(db, other, "tests.record", json.dumps([["x"], {}]))
    insert_row(db, not_json, name, "{{{")
    insert_row(db, huge, name, json.dumps([["y" * 600_000], {}]))
    with kombu.Connection(rabbitmq_url) as connection:
        producer = connection.Producer()
        publish(producer, 7)
        publish(producer, {"id": "nested"})
        publish(producer, "someone-else's-id")
        publish(producer, missing, task_id=missing, expect="payload_missing")
        publish(producer, other, task_id=other)
        publish(producer, not_json, task_id=not_json)
        publish(producer, huge, task_id=huge, expect="too_large")
    good = claim_check_tasks.digest.apply_async(args=("z" * 100_000,), kwargs={"tag": "good"}, tm=None)

    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info", env=subprocess_env)
    wait_for(lambda: good.id in effects(db), timeout=90, describe=worker.output)
    letters = wait_for(lambda: len(list_dead_letters(router.registry)) == len(forged)
                       and list_dead_letters(router.registry), timeout=30, describe=worker.output)
    assert {letter["id"]: letter["kind"] for letter in letters} == forged
    assert set(effects(db)) == {good.id}
    assert [run["payload"] for run in effects(db)[good.id]] == [describe("z" * 100_000)]
    assert worker.process.poll() is None
