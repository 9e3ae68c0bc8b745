"""Rolling deploys (docs/deploying.md): two releases of an app's tasks on one queue lose nothing.

tests/apps/deploy_v1.py has ``tests.deploy.a(x)``; deploy_v2.py has
``tests.deploy.a(x, y="default")`` and a new ``tests.deploy.b(x)``. Real
``ws-celery`` workers of each release take from one Redis queue: a message
for ``b`` that reaches the old worker is given back to the broker until the
new one takes it, within ``websauna_tasks.unknown_task_grace_seconds``; after
the grace it is a dead letter, and arguments that do not fit the task's
signature are a dead letter at once.
"""
from __future__ import annotations

import base64
import bz2
import copy
import json
import re
import sqlite3
import time
import typing as t
import uuid
import zlib

import pytest
from celery import Celery
from sqlalchemy import text

from websauna_tasks import get_celery, list_dead_letters
from websauna_tasks.rolling import FIRST_SEEN_HEADER, first_seen, signature_problem
from websauna_tasks.testing import wait_for

V1 = "tests.apps.deploy_v1"
V2 = "tests.apps.deploy_v2"
GIVEN_BACK = "for unknown task 'tests.deploy.b' given back"


def settings_for(redis_url, database_url, queue_name, scan, **extra):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    settings = {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
                "websauna.site_url": "https://example.com/app",
                "websauna_tasks.deadletter_queue": f"{queue_name}.dead", "tests.scan": scan}
    settings.update(extra)
    return settings


@pytest.fixture
def release(make_app, write_ini, redis_url, database_url, queue_name, db, dead_key):
    """``release(V1, **settings)``: (the Celery app of that release, an INI for its workers)."""
    def factory(scan, **extra):
        settings = settings_for(redis_url, database_url, queue_name, scan, **extra)
        name = f"{scan.rsplit('_', 1)[-1]}-{uuid.uuid4().hex[:6]}.ini"
        return get_celery(make_app(**settings).registry), write_ini(settings, name)

    return factory


@pytest.fixture
def start(ws_celery_worker_factory, subprocess_env, queue_name):
    def factory(ini, name, pool="prefork"):
        return ws_celery_worker_factory(ini, "worker", "-P", pool, "-c", "1", "-n", f"{name}-{queue_name}@%h",
                                        "--without-gossip", "--without-mingle", "--without-heartbeat",
                                        env=subprocess_env)

    return factory


def effects(db) -> list[tuple[str, str]]:
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text("SELECT task_id, value FROM ws_test_effects"))]


def letters(celery) -> dict[str, dict]:
    return {letter["id"]: letter for letter in list_dead_letters(celery)}


def test_two_releases_on_one_queue_run_every_message_exactly_once(release, start, db, redis_client, queue_name):
    old, old_ini = release(V1, **{"websauna_tasks.unknown_task_retry_seconds": "0.5"})
    new, new_ini = release(V2, **{"websauna_tasks.unknown_task_retry_seconds": "0.5"})
    v1 = start(old_ini, "v1")
    sent: dict[str, str] = {}

    def send_round(tag: str) -> None:
        for index in range(10):
            # The old web processes send a(x); the new ones send a(x) too (y only once no old worker is left),
            # and b, which only the new workers know.
            sent[old.send_task("tests.deploy.a", args=(f"{tag}-old-{index}",), queue=queue_name).id] = "a"
            sent[new.send_task("tests.deploy.a", args=(f"{tag}-new-{index}",), queue=queue_name).id] = "a"
            sent[new.send_task("tests.deploy.b", args=(f"{tag}-{index}",), queue=queue_name).id] = "b"

    started = time.monotonic()
    send_round("before")
    # Only the old release runs: b comes back to the queue instead of the dead letters.
    wait_for(lambda: GIVEN_BACK in v1.output(), timeout=60, describe=v1.output)
    v2 = start(new_ini, "v2")
    send_round("during")
    # The old worker leaves while it may hold b messages unacknowledged: they go back to Redis, not away.
    v1.terminate()
    v1.stop()
    send_round("after")
    done = wait_for(lambda: len(effects(db)) >= len(sent) and effects(db), timeout=120,
                    describe=lambda: v2.output()[-3000:])
    elapsed = time.monotonic() - started

    ids = [task_id for task_id, _value in done]
    assert sorted(ids) == sorted(sent), "a message was lost or ran twice"
    for task_id, value in done:
        if sent[task_id] == "b":
            assert value.startswith("v2:b:"), value
        else:
            assert re.fullmatch(r"v1:a:\S+|v2:a:\S+:default", value), value
    assert letters(old) == {}
    assert redis_client.llen(queue_name) == 0
    with open(v1.log_path, encoding="utf-8", errors="replace") as log:
        given_back = log.read().count(GIVEN_BACK)
    assert given_back >= 1
    print(f"\n{len(sent)} messages over two releases in {elapsed:.1f} s; old worker gave back b {given_back} times")


# The hold runs on the consumer's timer: the event loop's under prefork, a thread of its own under solo and threads.
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_an_unknown_task_is_a_dead_letter_after_the_grace_and_given_back_at_the_retry_pace(
        pool, release, start, db, redis_client, queue_name):
    grace, retry = 3.0, 0.5
    old, old_ini = release(V1, **{"websauna_tasks.unknown_task_grace_seconds": str(grace),
                                  "websauna_tasks.unknown_task_retry_seconds": str(retry)})
    v1 = start(old_ini, "v1", pool)
    sent = time.time()
    task_id = old.send_task("tests.deploy.b", args=("never",), queue=queue_name).id
    letter = wait_for(lambda: letters(old).get(task_id), timeout=30, describe=v1.output)
    assert time.time() - sent >= grace
    assert letter["kind"] == "unknown_task"
    waited = float(re.search(r"still unknown after waiting (\d+) s", letter["reason"]).group(1))
    assert grace - 1 <= waited <= grace + 5, letter["reason"]
    assert "websauna_tasks.unknown_task_grace_seconds = 3" in letter["reason"]
    first = letter["message"]["headers"][FIRST_SEEN_HEADER]
    assert sent - 1 <= first <= sent + 5
    # One give-back per retry, not a loop between the queue and the worker.
    given_back = v1.output().count(GIVEN_BACK)
    assert 2 <= given_back <= grace / retry + 2, given_back
    assert effects(db) == [] and redis_client.llen(queue_name) == 0


def test_arguments_that_do_not_fit_are_a_dead_letter_with_both_signatures(release, start, db, queue_name):
    old, old_ini = release(V1)
    new, _ini = release(V2)
    v1 = start(old_ini, "v1")
    # y is release 2's keyword, sent to a release-1 worker too early; the second call misses x.
    early = new.send_task("tests.deploy.a", args=("x",), kwargs={"y": 2}, queue=queue_name).id
    missing = old.send_task("tests.deploy.a", kwargs={"z": 1}, queue=queue_name).id
    fine = old.send_task("tests.deploy.a", args=("fine",), queue=queue_name).id
    found = wait_for(lambda: {early, missing} <= set(letters(old)) and letters(old), timeout=60, describe=v1.output)
    wait_for(lambda: effects(db) == [(fine, "v1:a:fine")], timeout=30, describe=v1.output)

    assert found[early]["kind"] == found[missing]["kind"] == "signature_mismatch"
    assert "unexpected keyword argument 'y'" in found[early]["reason"]
    assert "the message carries (1 positional, y=...), tests.deploy.a takes (x)" in found[early]["reason"]
    assert "the message carries (0 positional, z=...), tests.deploy.a takes (x)" in found[missing]["reason"]
    assert "given back" not in v1.output()
    # Not run, and not retried: each is in the dead letters once.
    assert [letter["id"] for letter in list_dead_letters(old)].count(early) == 1


@pytest.mark.slow
def test_on_rabbitmq_a_new_task_waits_for_the_new_worker(rabbitmq_url, database_url, db, queue_name, make_app,
                                                        write_ini, start):
    def release(scan):
        config = {"broker_url": rabbitmq_url, "task_default_queue": queue_name}
        settings = {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
                    "websauna_tasks.deadletter_queue": f"{queue_name}.dead", "tests.scan": scan,
                    "websauna_tasks.unknown_task_retry_seconds": "0.5"}
        return get_celery(make_app(**settings).registry), write_ini(settings, f"{scan.rsplit('.', 1)[-1]}.ini")

    old, old_ini = release(V1)
    new, new_ini = release(V2)
    v1 = start(old_ini, "v1")
    sent = {}
    for index in range(5):
        sent[new.send_task("tests.deploy.b", args=(f"rabbit-{index}",), queue=queue_name).id] = "b"
        sent[old.send_task("tests.deploy.a", args=(f"rabbit-{index}",), queue=queue_name).id] = "a"
    wait_for(lambda: GIVEN_BACK in v1.output(), timeout=60, describe=v1.output)
    v2 = start(new_ini, "v2")
    done = wait_for(lambda: len(effects(db)) >= len(sent) and effects(db), timeout=90, describe=v2.output)
    assert sorted(task_id for task_id, _value in done) == sorted(sent), "a message was lost or ran twice"
    assert all(value.startswith("v2:b:") for task_id, value in done if sent[task_id] == "b")
    assert list_dead_letters(old) == []


@pytest.mark.slow
def test_on_the_embedded_sqlite_broker_a_new_task_waits_for_the_new_worker(
        tmp_path, database_url, db, queue_name, make_app, write_ini, start):
    """The serverless default (docs/example.md): kombu's SQLAlchemy transport on a SQLite file, polled each second.

    It has no visibility timeout and no acknowledgement of its own: a read
    row is invisible at once, and a message held unacknowledged lives in the
    worker's memory until it is given back (a new row) or put back at shutdown.
    """
    broker = f"sqla+sqlite:///{tmp_path}/broker.sqlite"

    def release(scan):
        config = {"broker_url": broker, "task_default_queue": queue_name,
                  "broker_transport_options": {"connect_args": {"timeout": 30}}}
        settings = {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url,
                    "websauna_tasks.deadletter_queue": f"{queue_name}.dead", "tests.scan": scan,
                    "websauna_tasks.unknown_task_retry_seconds": "0.5"}
        return get_celery(make_app(**settings).registry), write_ini(settings, f"sqlite-{scan.rsplit('.', 1)[-1]}.ini")

    old, old_ini = release(V1)
    new, new_ini = release(V2)
    v1 = start(old_ini, "v1")
    sent = {}
    for index in range(3):
        sent[new.send_task("tests.deploy.b", args=(f"sqlite-{index}",), queue=queue_name).id] = "b"
        sent[old.send_task("tests.deploy.a", args=(f"sqlite-{index}",), queue=queue_name).id] = "a"
    # Given back more than once: each give-back is a new row the old worker reads again a second later.
    wait_for(lambda: v1.output().count(GIVEN_BACK) >= 6, timeout=60, describe=v1.output)
    assert not effects(db) or all(value.startswith("v1:a:") for _id, value in effects(db))
    v2 = start(new_ini, "v2")
    done = wait_for(lambda: len(effects(db)) >= len(sent) and effects(db), timeout=90, describe=v2.output)
    # The old worker leaves; anything it still held goes back into the file, not away.
    v1.terminate()
    v1.stop()
    assert sorted(task_id for task_id, _value in done) == sorted(sent), "a message was lost or ran twice"
    assert all(value.startswith("v2:b:") for task_id, value in done if sent[task_id] == "b")
    assert all(value.startswith("v1:a:") or value.startswith("v2:a:") for task_id, value in done
               if sent[task_id] == "a")
    assert list_dead_letters(old) == []
    # Drained: no row left to read (a message the old worker put back at its shutdown would be one).
    with sqlite3.connect(f"{tmp_path}/broker.sqlite", timeout=30) as file:
        waiting = file.execute("SELECT count(*) FROM kombu_message WHERE visible = 1")
        assert waiting.fetchone()[0] == 0
    assert sorted(task_id for task_id, _value in effects(db)) == sorted(sent)


def template_entry(celery, redis_client, queue_name):
    """A genuine envelope for tests.deploy.b, as kombu writes it, from a queue nobody consumes."""
    parked = f"{queue_name}.template"
    celery.send_task("tests.deploy.b", args=("forged",), queue=parked)
    entry = json.loads(redis_client.rpop(parked))
    redis_client.delete(parked, f"_kombu.binding.{parked}")
    return entry


def test_forged_first_seen_headers_neither_stop_the_worker_nor_extend_the_grace(
        release, start, db, redis_client, queue_name):
    grace = 3.0
    old, old_ini = release(V1, **{"websauna_tasks.unknown_task_grace_seconds": str(grace),
                                  "websauna_tasks.unknown_task_retry_seconds": "0.5"})
    template = template_entry(old, redis_client, queue_name)
    forged = {}
    for label, headers in [
            ("text", {FIRST_SEEN_HEADER: "garbage"}), ("huge", {FIRST_SEEN_HEADER: 1e300}),
            ("future", {FIRST_SEEN_HEADER: time.time() + 1e6}), ("negative", {FIRST_SEEN_HEADER: -5}),
            ("list", {FIRST_SEEN_HEADER: [1, 2]}), ("bool", {FIRST_SEEN_HEADER: True}),
            ("eta far ahead", {FIRST_SEEN_HEADER: time.time() + 1e6, "eta": "9999-12-31T00:00:00+00:00"}),
            ("huge int", {FIRST_SEEN_HEADER: 10 ** 400})]:
        entry = copy.deepcopy(template)
        task_id = str(uuid.uuid4())
        entry["headers"] = dict(entry["headers"], id=task_id, root_id=task_id, **headers)
        entry["properties"] = dict(entry["properties"], delivery_tag=str(uuid.uuid4()), correlation_id=task_id,
                                   delivery_info={"exchange": "", "routing_key": queue_name})
        redis_client.lpush(queue_name, json.dumps(entry))
        forged[task_id] = label
    v1 = start(old_ini, "v1")
    pid = v1.pid
    started = time.monotonic()
    found = wait_for(lambda: set(forged) <= set(letters(old)) and letters(old), timeout=60, describe=v1.output)
    elapsed = time.monotonic() - started
    genuine = old.send_task("tests.deploy.a", args=("after",), queue=queue_name).id
    wait_for(lambda: effects(db) == [(genuine, "v1:a:after")], timeout=30, describe=v1.output)

    assert v1.process.poll() is None and v1.pid == pid
    assert elapsed < grace + 20, "a forged header extended the grace"
    for task_id, label in forged.items():
        assert found[task_id]["kind"] == "unknown_task", (label, found[task_id]["reason"])
        assert "still unknown after waiting" in found[task_id]["reason"], label


def hostile_b(template, queue_name, body: bytes, compression: str | None = None) -> tuple[str, str]:
    """(raw entry, task id): a message for tests.deploy.b with ``body`` (kombu's base64 envelope)."""
    entry = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    entry["headers"] = dict(entry["headers"], id=task_id, root_id=task_id)
    if compression:
        entry["headers"]["compression"] = compression
    entry["body"] = base64.b64encode(body).decode()
    entry["properties"] = dict(entry["properties"], body_encoding="base64", delivery_tag=str(uuid.uuid4()),
                               correlation_id=task_id, delivery_info={"exchange": "", "routing_key": queue_name})
    return json.dumps(entry), task_id


def call_body(args) -> bytes:
    return json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()


def inflating_to(compressor, size: int) -> bytes:
    chunk = b" " * (1024 * 1024)
    return b"".join(compressor.compress(chunk) for _ in range(size // len(chunk))) + compressor.flush()


def test_hostile_messages_for_an_unknown_task_are_dead_letters_not_give_backs(
        release, start, db, redis_client, queue_name):
    """Bombs, deep nesting and non-finite numbers on the give-back path: refused before it, or given back whole."""
    limit = 1024 * 1024
    settings = {"websauna_tasks.unknown_task_grace_seconds": "60", "websauna_tasks.unknown_task_retry_seconds": "0.5",
                "websauna_tasks.max_message_bytes": str(limit)}
    old, old_ini = release(V1, **settings)
    _new, new_ini = release(V2, **settings)
    template = template_entry(old, redis_client, queue_name)
    deep: t.Any = "leaf"
    for _ in range(300):
        deep = [deep]
    refused = {}
    for label, body, compression, kind in [
            ("zlib bomb", inflating_to(zlib.compressobj(), 8 * limit), "application/x-gzip", "undecodable"),
            ("bzip2 bomb", inflating_to(bz2.BZ2Compressor(), 8 * limit), "application/x-bz2", "undecodable"),
            ("deep args", call_body([deep]), None, "malformed"),
            # Past the JSON decoder's recursion: undecodable by any release, so never given back.
            ("deep text", b"[" * 100_000 + b"]" * 100_000, None, "undecodable")]:
        raw, task_id = hostile_b(template, queue_name, body, compression)
        redis_client.lpush(queue_name, raw)
        refused[task_id] = (label, kind)
    # Compressed but sound: given back inflated (the compression header dropped), it must still read the same.
    zipped_raw, zipped = hostile_b(template, queue_name, zlib.compress(call_body(["zipped"])), "application/x-gzip")
    # NaN is JSON to kombu and Celery on both ends (Python's decoder); the give-back passes the bytes on unchanged.
    nan_raw, nan = hostile_b(template, queue_name, b'[[NaN], {}, {"callbacks": null}]')
    redis_client.lpush(queue_name, zipped_raw, nan_raw)
    v1 = start(old_ini, "v1")
    pid = v1.pid
    found = wait_for(lambda: set(refused) <= set(letters(old)) and letters(old), timeout=60, describe=v1.output)
    for task_id in (zipped, nan):
        wait_for(lambda task_id=task_id: f"message {task_id} for unknown task" in v1.output(), timeout=30,
                 describe=v1.output)
    genuine = old.send_task("tests.deploy.a", args=("after",), queue=queue_name).id
    wait_for(lambda: (genuine, "v1:a:after") in effects(db), timeout=30, describe=v1.output)
    assert v1.process.poll() is None and v1.pid == pid, "the worker keeps running"
    for task_id, (label, kind) in refused.items():
        letter = found[task_id]
        assert kind is None or letter["kind"] == kind, (label, letter["kind"], letter["reason"])
        assert letter["reason"], label
        assert f"message {task_id} for unknown task" not in v1.output(), f"{label} was given back"

    v2 = start(new_ini, "v2")
    wait_for(lambda: {(zipped, "v2:b:zipped"), (nan, "v2:b:nan")} <= set(effects(db)), timeout=60,
             describe=v2.output)
    assert zipped not in letters(old) and nan not in letters(old)


# -- without a broker ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, "garbage", "1", [1], True, float("nan"), float("inf"), 1e300, 10 ** 400,
                                   2000.0])
def test_a_first_seen_header_that_is_absent_absurd_or_in_the_future_starts_the_grace_now(value):
    assert first_seen({} if value is None else {FIRST_SEEN_HEADER: value}, 1000.0) == 1000.0


def test_a_believable_first_seen_header_is_kept():
    assert first_seen({FIRST_SEEN_HEADER: 900}, 1000.0) == 900.0
    assert first_seen({FIRST_SEEN_HEADER: -5.0}, 1000.0) == -5.0  # long past: the grace is over


def test_signature_problem_names_both_signatures_and_respects_typing_off():
    app = Celery("sig", broker="memory://", set_as_current=False)

    @app.task(name="t.a", bind=True)
    def a(self, x, y="default"):
        return x

    @app.task(name="t.loose", typing=False)
    def loose(x):
        return x

    @app.task(name="t.open")
    def open_(*args, **kwargs):
        return args

    assert signature_problem(a, ["x"], {}) is None
    assert signature_problem(a, [], {"x": 1, "y": 2}) is None
    problem = signature_problem(a, ["x"], {"z": 1})
    assert "unexpected keyword argument 'z'" in problem
    assert problem.endswith("the message carries (1 positional, z=...), t.a takes (x, y='default')")
    assert "missing" in signature_problem(a, [], {})
    assert signature_problem(a, [1, 2, 3], {}) is not None
    assert signature_problem(loose, [], {"z": 1}) is None
    assert signature_problem(open_, [1, 2], {"anything": 3}) is None


def test_the_signature_check_costs_microseconds():
    app = Celery("sig", broker="memory://", set_as_current=False)

    @app.task(name="t.cost", bind=True)
    def a(self, x, y="default"):
        return x

    app.finalize()
    registered = app.tasks[a.name]  # what the worker's intake holds: the task itself, not the decorator's proxy
    rounds = 20_000
    began = time.perf_counter()
    for _ in range(rounds):
        signature_problem(registered, ["x"], {"y": 1})
    per_message = (time.perf_counter() - began) / rounds
    print(f"\nsignature check: {per_message * 1e6:.2f} µs per message")
    assert per_message < 20e-6


# -- the retry delay against a short Redis visibility timeout --------------------------------------------------------

def _built_with(visibility: float, **settings: str):
    from pyramid.config import Configurator

    from websauna_tasks import get_celery
    from websauna_tasks.state import app_state

    celery = {"broker_url": "redis://127.0.0.1:9/0", "broker_transport_options": {"visibility_timeout": visibility}}
    config = Configurator(settings={"websauna.celery_config": repr(celery), **settings})
    config.include("websauna_tasks")
    return app_state(get_celery(config.registry)).intake.unknown


def test_the_default_retry_fits_a_short_visibility_timeout():
    # A broker tuned so that crashed runs come back within seconds must still start with the default.
    assert _built_with(3).retry == 1.5
    assert _built_with(3600).retry == 15.0


def test_a_retry_set_by_hand_past_the_visibility_timeout_stops_startup():
    from websauna_tasks.reliability import VisibilityTimeoutExceeded

    with pytest.raises(VisibilityTimeoutExceeded, match="unknown_task_retry_seconds"):
        _built_with(3, **{"websauna_tasks.unknown_task_retry_seconds": "20"})
