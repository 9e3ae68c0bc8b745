"""Hostile messages sent straight to the broker never stop a real worker (docs/RELIABILITY.md, "Poison messages").

A real ``ws-celery`` worker, under the prefork, solo and threads pools, takes a
battery of forged Redis entries: bodies of the wrong shape, compression
bombs of every codec kombu offers here, deep nesting, bodies over the
limit, entries that are not JSON or not an envelope, bad headers and
forged deferred calls, with a genuine task after each. The worker keeps
its PID, runs every genuine task, and lists every poison message in the
dead letters with its reason.
"""
from __future__ import annotations

import base64
import bz2
import copy
import json
import lzma
import uuid
import zlib

import pytest
from sqlalchemy import text

from tests.apps import sample_tasks
from websauna_tasks import get_celery, list_dead_letters
from websauna_tasks.defer import DEFERRED_TASK_NAME
from websauna_tasks.payload import MAX_NESTING_DEPTH
from websauna_tasks.testing import wait_for

LIMIT = 200_000


def settings_for(redis_url, database_url, queue_name):
    celery = {"broker_url": redis_url, "task_default_queue": queue_name}
    return {"websauna.celery_config": repr(celery), "sqlalchemy.url": database_url,
            "websauna.site_url": "https://example.com/app",
            "websauna_tasks.deadletter_queue": f"{queue_name}.dead",
            "websauna_tasks.max_message_bytes": str(LIMIT),
            "websauna_tasks.defer_allowed_modules": "tests",
            # The unknown task of the battery is a dead letter at once, not given back for a deploy's grace.
            "websauna_tasks.unknown_task_grace_seconds": "0"}


def template_entry(celery, redis_client, queue_name):
    """A genuine envelope for tests.record, as kombu writes it, taken from a queue nobody consumes."""
    parked = f"{queue_name}.template"
    celery.send_task("tests.record", args=("template",), queue=parked)
    entry = json.loads(redis_client.rpop(parked))
    redis_client.delete(parked, f"_kombu.binding.{parked}")
    return entry


def forge(template, body: bytes, content_type: str = "application/json", compression: str | None = None,
          **headers):
    entry = copy.deepcopy(template)
    task_id = str(uuid.uuid4())
    entry["headers"] = dict(entry["headers"], id=task_id, root_id=task_id, **headers)
    if compression:
        entry["headers"]["compression"] = compression
    entry["body"] = base64.b64encode(body).decode()
    entry["content-type"] = content_type
    entry["properties"] = dict(entry["properties"], delivery_tag=str(uuid.uuid4()), correlation_id=task_id)
    return json.dumps(entry), task_id


def triple(args, kwargs=None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([args, kwargs or {}, embed]).encode()


def nested(depth):
    value = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def bomb(compressor, size=64 * 1024 * 1024) -> bytes:
    chunk = b" " * (1024 * 1024)
    return b"".join(compressor.compress(chunk) for _ in range(size // len(chunk))) + compressor.flush()


def poison(template):
    """(label, raw entry, expected dead-letter kind or None for any, task id or None) for every hostile message."""
    deep_text = b"[" + b"[" * 100_000 + b"]" * 100_000 + b", {}, {}]"
    bomb_body = b'[["' + b" " * 10 + b'"], {}, {}]'
    forged = [
        ("shape [1]", forge(template, b"[1]"), "malformed"),
        ("shape dict", forge(template, b'{"args": [1]}'), "malformed"),
        ("shape four", forge(template, b"[[], {}, {}, 4]"), "malformed"),
        ("args int", forge(template, b"[1, {}, {}]"), "malformed"),
        ("deep args", forge(template, triple([nested(300)])), "malformed"),
        ("deep kwargs", forge(template, triple([], {"value": nested(300)})), "malformed"),
        ("deep text", forge(template, deep_text), None),
        ("zlib bomb", forge(template, bomb(zlib.compressobj()) or bomb_body, compression="application/x-gzip"),
         "undecodable"),
        ("bzip2 bomb", forge(template, bomb(bz2.BZ2Compressor()), compression="application/x-bz2"), "undecodable"),
        ("lzma bomb", forge(template, bomb(lzma.LZMACompressor()), compression="application/x-lzma"), "undecodable"),
        ("unknown codec", forge(template, b"xx", compression="application/x-brotli"), "undecodable"),
        ("over the limit", forge(template, triple(["x" * (LIMIT + 10)])), "too_large"),
        ("task header list", forge(template, triple(["v"]), task=["tests.record"]), "malformed"),
        ("eta garbage", forge(template, triple(["v"]), eta="garbage"), "malformed"),
        ("timelimit text", forge(template, triple(["v"]), timelimit="60"), "malformed"),
        ("pickle", forge(template, b"\x80\x04K\x01.", content_type="application/x-python-serialize"), "invalid_task"),
        ("unknown task", forge(template, triple([1]), task="tests.no_such_task"), "unknown_task"),
        ("deferred @task", forge(template, triple(["tests.apps.sample_tasks:record", ["forged"], {}]),
                                 task=DEFERRED_TASK_NAME), "refused_deferred"),
        ("deferred class", forge(template, triple(["tests.apps.deferred_functions:Jobs", [], {}]),
                                 task=DEFERRED_TASK_NAME), "refused_deferred"),
        ("deferred unbound", forge(template,
                                   triple(["tests.apps.deferred_functions:Jobs.bound_record", [None, "x"], {}]),
                                   task=DEFERRED_TASK_NAME), "refused_deferred"),
        ("deferred os.system", forge(template, triple(["os:system", ["true"], {}]), task=DEFERRED_TASK_NAME),
         "refused_deferred"),
        ("deferred shape", forge(template, triple([1, 2]), task=DEFERRED_TASK_NAME), "refused_deferred"),
    ]
    battery = [(label, raw, kind, task_id) for label, (raw, task_id), kind in forged]
    not_envelopes = [b"this is not JSON", b"\xff\xfe\x00 not utf-8", b"[1]", b'{"body": "x"}',
                     json.dumps(dict(template, body="%%% not base64 %%%")).encode()]
    battery += [(f"raw {raw[:12]!r}", raw, "unreadable", None) for raw in not_envelopes]
    return battery


def effects(db):
    with db.connect() as conn:
        return {row[0] for row in conn.execute(text("SELECT value FROM ws_test_effects"))}


@pytest.mark.fault
@pytest.mark.slow
@pytest.mark.parametrize("pool", ["prefork", "solo", "threads"])
def test_no_message_from_the_broker_stops_a_worker(
        pool, make_app, redis_url, database_url, queue_name, redis_client, db, write_ini, ws_celery_worker_factory,
        subprocess_env):
    settings = settings_for(redis_url, database_url, queue_name)
    dead_key = f"{queue_name}.dead"
    redis_client.delete(dead_key)
    router = make_app(**settings)
    celery = get_celery(router.registry)
    template = template_entry(celery, redis_client, queue_name)
    battery = poison(template)

    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-P", pool, "-c", "1", "--without-gossip",
                                      "--without-mingle", env=subprocess_env)
    pid = worker.pid
    try:
        genuine = []
        for index, (_label, raw, _kind, _task_id) in enumerate(battery):
            redis_client.lpush(queue_name, raw)
            value = f"between-{index}"
            celery.send_task("tests.record", args=(value,), queue=queue_name)
            genuine.append(value)
        # A genuine task with a compressed body still runs, and so does one
        # nested as deep as dispatch allows: the bound is below what the pool pickles.
        celery.send_task("tests.record", args=("compressed",), queue=queue_name, compression="zlib")
        genuine.append("compressed")
        deepest = nested(MAX_NESTING_DEPTH - 1)
        sample_tasks.record.apply_async(args=(deepest,), tm=None, queue=queue_name)
        genuine.append(str(deepest))

        wait_for(lambda: effects(db) >= set(genuine), timeout=120)
        letters = wait_for(lambda: len(list_dead_letters(router.registry)) >= len(battery)
                           and list_dead_letters(router.registry), timeout=60)
    finally:
        redis_client.delete(dead_key)
    assert worker.process.poll() is None, worker.output()[-3000:]
    assert worker.pid == pid
    assert effects(db) == set(genuine), "a genuine task was lost or a poison message ran"
    assert len(letters) == len(battery), [letter["reason"] for letter in letters]

    by_id = {letter["id"]: letter for letter in letters if letter["id"]}
    for label, _raw, kind, task_id in battery:
        if task_id is None:
            continue
        assert task_id in by_id, f"{label} is not in the dead letters"
        letter = by_id[task_id]
        assert letter["reason"], label
        if kind is not None:
            assert letter["kind"] == kind, (label, letter["kind"], letter["reason"])
    assert "MessageTooLarge" in by_id[battery[7][3]]["reason"]
    assert "is a @task" in by_id[battery[17][3]]["reason"]

    unreadable = [letter for letter in letters if letter["kind"] == "unreadable"]
    originals = {raw if isinstance(raw, bytes) else raw.encode() for _l, raw, kind, _id in battery
                 if kind == "unreadable"}
    assert {base64.b64decode(letter["message"]["body"]) for letter in unreadable} == originals
    # Kept as sent, so that a repaired message can be requeued.
    shape = by_id[battery[0][3]]
    assert base64.b64decode(shape["message"]["body"]) == b"[1]"
    assert by_id[battery[11][3]]["message"] is None and by_id[battery[11][3]]["message_size"] > LIMIT
    assert redis_client.llen(queue_name) == 0
