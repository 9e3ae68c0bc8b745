"""A 5 MB payload sent through the outbox while Redis is down runs, with all its bytes, once Redis is back.

A private Redis (tests/servers.py, append-only) is stopped before the
request commits: the commit writes the outbox row and the payload row and
returns at once; the fast path cannot publish. Redis is started again on the
same port, a worker's relay publishes the reference, and the worker's intake
loads the 5 MB row. Without claim check the call itself is refused
(``PayloadTooLarge``: 5 MB is ten times ``max_payload_bytes``).
"""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from tests.apps import claim_check_tasks
from tests.apps.claim_check_tasks import describe
from tests.outbox_helpers import outbox_rows
from tests.servers import PrivateRedis
from tests.test_claim_check import effects, settings_for, stored_rows
from websauna_tasks.outbox import get_outbox
from websauna_tasks.registry import get_celery
from websauna_tasks.request import task_request
from websauna_tasks.testing import wait_for

pytestmark = [pytest.mark.fault, pytest.mark.slow]

#: 5 MB of JSON text, not one repeated character: compression or a shortcut would not make it small.
PAYLOAD = "".join(f"{index:08x}" for index in range(5 * 1024 * 1024 // 8))


def test_a_5_mb_payload_through_the_outbox_while_redis_is_down(
        make_app, database_url, queue_name, db, tmp_path, write_ini, ws_celery_worker_factory, subprocess_env):
    broker = PrivateRedis(str(tmp_path), persistent=True)
    broker.start()
    app_name = f"cc-fault-{queue_name}"
    settings = settings_for(broker.url, database_url, queue_name, **{
        "websauna_tasks.outbox": "true", "websauna_tasks.app_name": app_name,
        "websauna_tasks.outbox_poll_seconds": "0.2"})
    try:
        router = make_app(**settings)
        broker.stop()
        started = time.monotonic()
        with task_request(router.registry) as request:
            with request.tm:
                request.dbsession.execute(sa.text("INSERT INTO ws_test_rows (value) VALUES ('big')"))
                sent = claim_check_tasks.digest.apply_async(args=(PAYLOAD,), kwargs={"tag": "outage"},
                                                            tm=request.tm)
        committed_in = time.monotonic() - started
        assert committed_in < 5, "the commit does not wait for the broker"
        # The fast path tries, fails, and leaves the row to the relay.
        assert get_outbox(get_celery(router.registry)).fast_path.flush(60)
        assert outbox_rows(db, app_name) == [(sent.id, "tests.claim.digest", None)]
        [(task_name, length, _retention)] = stored_rows(db, sent.id).values()
        assert task_name == "tests.claim.digest" and length > 5 * 1024 * 1024

        broker.start()
        worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", "-l", "info",
                                          env=subprocess_env, timeout=120)
        runs = wait_for(lambda: effects(db).get(sent.id), timeout=120, describe=worker.output)
        assert [run["payload"] for run in runs] == [describe(PAYLOAD)]
        assert outbox_rows(db, app_name)[0][2] is not None
        wait_for(lambda: stored_rows(db, sent.id) == {}, timeout=30, describe=worker.output)
        # The broker carried the reference, never the 5 MB.
        assert "moved to dead letters" not in worker.output()
        print(f"\n5 MB payload committed in {committed_in * 1000:.0f} ms with Redis down; "
              "run with all its bytes after Redis came back")
    finally:
        broker.stop()
