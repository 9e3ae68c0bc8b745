"""Outbox rows of idempotent tasks sent but never finished are sent again (websauna_tasks.outbox, _redelivery).

Real PostgreSQL and Redis; the relay's rounds are called directly with a
clock moved forward instead of waiting minutes. The Redis stop that loses
such a message is in tests/test_fault_redis_outage.py.
"""
from __future__ import annotations

import datetime
import time

import pytest
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps import reliability_tasks
from tests.conftest import queued_messages
from tests.test_crash_safety import make_reliability_app, reliability_settings
from websauna_tasks import get_celery
from websauna_tasks.idempotency import DONE_TABLE_NAME
from websauna_tasks.outbox import get_outbox, note_failed_run
from websauna_tasks.request import task_request

AFTER = 60.0


@pytest.fixture
def router(redis_url, database_url, queue_name, db, redis_client, built_apps):
    with db.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS websauna_tasks_outbox"))
        conn.execute(text(f"DROP TABLE IF EXISTS {DONE_TABLE_NAME}"))
    from websauna_tasks import idempotency
    from websauna_tasks.outbox import _table

    _table._created.clear()
    idempotency._created.clear()
    settings = reliability_settings(redis_url, database_url, queue_name)
    settings.update({"websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
                     "websauna_tasks.outbox_redeliver_after_seconds": str(AFTER),
                     "websauna_tasks.outbox_redeliver_max": "2"})
    router = make_reliability_app(settings)
    built_apps.append(router)
    return router


def dispatch(router, task, key: str, **options) -> str:
    with task_request(router.registry) as request, request.tm:
        request.dbsession.execute(text("SELECT 1"))
        return task.apply_async(args=(key,), tm=request.tm, **options).id


def sent_ids(redis_client, queue_name) -> list[str]:
    return [message["headers"]["id"] for message in queued_messages(redis_client, queue_name)]


def redeliveries(db, task_id: str) -> int:
    with db.connect() as conn:
        return conn.execute(text("SELECT redeliveries FROM websauna_tasks_outbox WHERE id = :id"),
                            {"id": task_id}).scalar_one()


def later(seconds: float = AFTER + 1) -> float:
    return time.time() + seconds


def test_a_sent_idempotent_task_without_done_row_is_sent_again_up_to_the_maximum(router, db, redis_client,
                                                                                 queue_name):
    outbox = get_outbox(get_celery(router.registry))
    lost = dispatch(router, reliability_tasks.idempotent_effect, "lost")
    assert outbox.drain() == 1
    redis_client.delete(queue_name)  # the message is gone, as when Redis lost it
    assert outbox.redeliverer.run() == 0, "not yet: sent less than the delay ago"
    assert outbox.redeliverer.run(now=later()) == 1
    assert sent_ids(redis_client, queue_name) == [lost]
    assert redeliveries(db, lost) == 1
    assert outbox.redeliverer.run(now=later()) == 0, "the delay runs again from the new publication"
    assert outbox.redeliverer.run(now=later(2 * AFTER + 2)) == 1
    assert outbox.redeliverer.run(now=later(3 * AFTER + 3)) == 0, "outbox_redeliver_max = 2"
    assert sent_ids(redis_client, queue_name) == [lost, lost]


def test_finished_failed_plain_and_not_yet_due_rows_are_left_alone(router, db, redis_client, queue_name):
    app = get_celery(router.registry)
    outbox = get_outbox(app)
    finished = dispatch(router, reliability_tasks.idempotent_effect, "finished")
    failed = dispatch(router, reliability_tasks.idempotent_effect, "failed")
    plain = dispatch(router, reliability_tasks.slow_effect, "plain")  # not idempotent: no done-row to tell
    due_later = dispatch(router, reliability_tasks.idempotent_effect, "due-later", countdown=3 * AFTER)
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=3 * AFTER)
    eta_later = dispatch(router, reliability_tasks.idempotent_effect, "eta-later", eta=eta)
    assert outbox.drain() == 5
    redis_client.delete(queue_name)
    reliability_tasks.idempotent_effect.apply(args=("finished",), task_id=finished, throw=True)  # its done-row
    note_failed_run(reliability_tasks.idempotent_effect, failed)
    assert outbox.redeliverer.run(now=later()) == 0
    assert sent_ids(redis_client, queue_name) == []
    assert redeliveries(db, failed) == 2 and redeliveries(db, plain) == 0
    # Once due (plus the delay), the delayed ones are looked at like the others.
    assert outbox.redeliverer.run(now=later(4 * AFTER + 2)) == 2
    assert sorted(sent_ids(redis_client, queue_name)) == sorted([due_later, eta_later])


def test_turned_off_with_zero(redis_url, database_url, queue_name, db, redis_client, built_apps):
    settings = reliability_settings(redis_url, database_url, queue_name)
    settings.update({"websauna_tasks.outbox": "true", "websauna_tasks.outbox_publish_on_commit": "false",
                     "websauna_tasks.outbox_redeliver_after_seconds": "0"})
    router = make_reliability_app(settings)
    built_apps.append(router)
    outbox = get_outbox(get_celery(router.registry))
    dispatch(router, reliability_tasks.idempotent_effect, "off")
    outbox.drain()
    redis_client.delete(queue_name)
    assert not outbox.redeliverer.enabled
    assert outbox.redeliverer.run(now=later(10 ** 6)) == 0


@pytest.mark.parametrize(("key", "value"), [
    ("websauna_tasks.outbox_redeliver_after_seconds", "-5"),
    ("websauna_tasks.outbox_redeliver_after_seconds", "soon"),
    ("websauna_tasks.outbox_redeliver_max", "-1"),
])
def test_bad_settings_are_refused_naming_the_key(redis_url, database_url, queue_name, key, value):
    settings = reliability_settings(redis_url, database_url, queue_name)
    settings.update({"websauna_tasks.outbox": "true", key: value})
    with pytest.raises(ConfigurationError, match=key):
        make_reliability_app(settings)
