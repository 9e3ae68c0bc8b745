"""Crash safety: acks_late defaults, prefetch, and the Redis visibility-timeout check.

The worker tests SIGKILL a real ``ws-celery`` worker (its pool child, or its
whole process group) while a TransactionalTask sleeps mid-run: the task must
run again and its effect be committed exactly once.
"""
from __future__ import annotations

import datetime
import logging
import os
import signal
import time

import pytest
import transaction
from sqlalchemy import text

from tests.apps import reliability_tasks
from websauna_tasks import ScheduleOnCommitTask, TransactionalTask, VisibilityTimeoutExceeded, defer
from websauna_tasks.reliability import check_transport_options, delay_of
from websauna_tasks.testing import wait_for

SITE_URL = "https://example.com/app"


def reliability_settings(redis_url: str, database_url: str, queue_name: str, **celery) -> dict[str, str]:
    config = {"broker_url": redis_url, "task_default_queue": queue_name, **celery}
    return {"websauna.celery_config": repr(config), "sqlalchemy.url": database_url, "websauna.site_url": SITE_URL}


def make_reliability_app(settings: dict[str, str]):
    from tests.apps.reliability_app import main

    return main({}, **settings)


@pytest.fixture
def build(built_apps, redis_url, database_url, queue_name, db):
    def factory(**celery):
        router = make_reliability_app(reliability_settings(redis_url, database_url, queue_name, **celery))
        built_apps.append(router)
        return router

    return factory


def write_reliability_ini(tmp_path, settings: dict[str, str], name: str = "reliability.ini") -> str:
    lines = ["[app:main]", "use = call:tests.apps.reliability_app:main"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def rows_of(db, key: str) -> list[str]:
    with db.connect() as conn:
        return [row[0] for row in conn.execute(
            text("SELECT value FROM ws_test_effects WHERE task_id = :key ORDER BY id"), {"key": key})]


def starts_and_effects(db, key: str) -> tuple[list[int], int]:
    values = rows_of(db, key)
    starts = [int(value.split(":")[1]) for value in values if value.startswith("start:")]
    return starts, values.count("effect")


# -- the defaults ---------------------------------------------------------------------------------

def test_base_classes_are_at_least_once_and_schedule_on_commit_keeps_celery_defaults():
    assert TransactionalTask.acks_late is True and TransactionalTask.reject_on_worker_lost is True
    from websauna_tasks import RetryableTransactionTask

    assert RetryableTransactionTask.acks_late is True and RetryableTransactionTask.reject_on_worker_lost is True
    # None: Celery takes task_acks_late / task_reject_on_worker_lost from the app (default False).
    assert ScheduleOnCommitTask.acks_late is None and ScheduleOnCommitTask.reject_on_worker_lost is None


def test_bound_tasks_get_the_defaults_and_an_option_overrides(build):
    build()
    assert reliability_tasks.slow_effect.acks_late is True
    assert reliability_tasks.slow_effect.reject_on_worker_lost is True
    assert reliability_tasks.idempotent_retryable.acks_late is True
    assert reliability_tasks.not_acks_late.acks_late is False  # @task(acks_late=False)
    # ScheduleOnCommitTask: Celery's default (ack before the run), or the app's setting.
    assert reliability_tasks.on_commit.acks_late is False
    assert not reliability_tasks.on_commit.reject_on_worker_lost  # Celery default (None: off)


def test_app_setting_still_governs_schedule_on_commit_tasks(build):
    build(task_acks_late=True, task_reject_on_worker_lost=True)
    assert reliability_tasks.on_commit.acks_late is True
    assert reliability_tasks.on_commit.reject_on_worker_lost is True


def test_prefetch_is_one_unless_set(build):
    from websauna_tasks import get_celery

    assert get_celery(build().registry).conf.worker_prefetch_multiplier == 1
    assert get_celery(build(worker_prefetch_multiplier=8).registry).conf.worker_prefetch_multiplier == 8


# -- the visibility timeout ----------------------------------------------------------------------

def test_countdown_past_the_visibility_timeout_is_refused(build, redis_client, queue_name):
    build()
    task = reliability_tasks.slow_effect
    with pytest.raises(VisibilityTimeoutExceeded) as refused:
        task.apply_async(args=("far",), countdown=4000, tm=None)
    message = str(refused.value)
    assert "4000" in message and "3600" in message and "broker_transport_options['visibility_timeout']" in message
    with pytest.raises(VisibilityTimeoutExceeded, match="3600"):
        task.apply_async(args=("far",), countdown=3600, tm=None)  # equal: redelivered at the due time
    eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=2)
    tm = transaction.TransactionManager(explicit=True)
    with tm:
        with pytest.raises(VisibilityTimeoutExceeded):
            task.apply_async(args=("far",), eta=eta, tm=tm)
    # Refused in the caller: nothing was sent.
    assert redis_client.llen(queue_name) == 0
    # Under the timeout: sent.
    task.apply_async(args=("near",), countdown=600, tm=None)
    assert redis_client.llen(queue_name) == 1


def test_defer_countdown_is_checked_too(build):
    from tests.apps import deferred_functions

    app = build()
    with pytest.raises(VisibilityTimeoutExceeded, match=r"defer\(tests.apps.deferred_functions"):
        defer(deferred_functions.record, "x", _countdown=7200, _registry=app.registry)
    far = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=3)
    with pytest.raises(VisibilityTimeoutExceeded):
        defer(deferred_functions.record, "x", _eta=far, _registry=app.registry)


def test_a_raised_visibility_timeout_allows_the_countdown(build, redis_client, queue_name):
    build(broker_transport_options={"visibility_timeout": 86400},
          result_backend_transport_options={"visibility_timeout": 86400})
    reliability_tasks.slow_effect.apply_async(args=("later",), countdown=7200, tm=None)
    assert redis_client.llen(queue_name) == 1


def test_no_check_without_redis_or_in_eager_mode(make_app, database_url, db):
    from websauna_tasks import get_celery

    router = make_reliability_app({"websauna.celery_config": repr({"task_always_eager": True}),
                                   "sqlalchemy.url": database_url})
    try:
        assert get_celery(router.registry).conf.task_always_eager
        from websauna_tasks.reliability import check_delay

        check_delay(get_celery(router.registry), "eager", {"countdown": 10 ** 6})
    finally:
        from websauna_tasks.db import get_engine

        get_engine(router.registry).dispose()


def test_delay_of_reads_countdown_eta_and_strings():
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)
    assert delay_of({"countdown": 5, "eta": now + datetime.timedelta(hours=9)}, now) == 5
    assert delay_of({"eta": now + datetime.timedelta(seconds=90)}, now) == 90
    assert delay_of({"eta": (now + datetime.timedelta(seconds=30)).isoformat()}, now) == 30
    assert delay_of({"eta": datetime.datetime(2030, 1, 1, 0, 1)}, now) == 60  # naive: UTC, as Celery reads it
    assert delay_of({}, now) == 0


def test_misaligned_transport_options_warn_at_start(build, caplog):
    with caplog.at_level(logging.WARNING, logger="websauna_tasks.reliability"):
        build(broker_transport_options={"visibility_timeout": 7200},
              result_backend_transport_options={"visibility_timeout": 3600})
    assert any("result_backend_transport_options['visibility_timeout'] is 3600" in record.getMessage()
               and "7200" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="websauna_tasks.reliability"):
        app = build(broker_transport_options={"visibility_timeout": 7200},
                    result_backend_transport_options={"visibility_timeout": 7200})
    from websauna_tasks import get_celery

    assert check_transport_options(get_celery(app.registry)) == []
    assert not [r for r in caplog.records if r.name == "websauna_tasks.reliability"]


# -- real workers, killed mid-run --------------------------------------------------------------

@pytest.mark.slow
def test_pool_child_sigkilled_mid_run_runs_again_and_commits_once(
        build, tmp_path, redis_url, database_url, queue_name, db, ws_celery_worker_factory, subprocess_env):
    ini = write_reliability_ini(tmp_path, reliability_settings(redis_url, database_url, queue_name))
    worker = ws_celery_worker_factory(ini, "worker", "-c", "1", env=subprocess_env)
    build()
    key = "child-killed"
    reliability_tasks.slow_effect.apply_async(args=(key, 3.0), tm=None)
    starts, _ = wait_for(lambda: starts_and_effects(db, key)[0] and starts_and_effects(db, key), timeout=30,
                         describe=worker.output)
    os.kill(starts[0], signal.SIGKILL)  # the pool child, sleeping before its insert
    # reject_on_worker_lost: the main process puts the message back; a new child runs it.
    starts, effects = wait_for(lambda: starts_and_effects(db, key)[1] and starts_and_effects(db, key),
                               timeout=40, describe=worker.output)
    assert len(starts) == 2 and starts[1] != starts[0]
    assert effects == 1
    time.sleep(1.0)
    assert starts_and_effects(db, key) == (starts, 1)
    assert "WorkerLostError" in worker.output() or "SIGKILL" in worker.output()


@pytest.mark.slow
def test_whole_worker_sigkilled_mid_run_is_redelivered_to_the_next_worker(
        build, tmp_path, redis_url, database_url, queue_name, db, ws_celery_worker_factory, subprocess_env):
    # A short visibility timeout and restore sweep so the test need not wait an hour.
    transport = {"visibility_timeout": 3, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    settings = reliability_settings(redis_url, database_url, queue_name, broker_transport_options=transport)
    ini = write_reliability_ini(tmp_path, settings)
    worker = ws_celery_worker_factory(ini, "worker", "-c", "1", env=subprocess_env)
    build(broker_transport_options=transport)
    key = "worker-killed"
    reliability_tasks.slow_effect.apply_async(args=(key, 2.0), tm=None)
    wait_for(lambda: starts_and_effects(db, key)[0], timeout=30, describe=worker.output)
    os.killpg(worker.pid, signal.SIGKILL)  # main process and pool child at once: nothing is acked or rejected
    worker.process.wait(10)
    assert starts_and_effects(db, key)[1] == 0
    replacement = ws_celery_worker_factory(ini, "worker", "-c", "1", env=subprocess_env)
    starts, effects = wait_for(lambda: starts_and_effects(db, key)[1] and starts_and_effects(db, key),
                               timeout=40, describe=replacement.output)
    assert len(starts) == 2 and effects == 1
    time.sleep(4.0)  # past another visibility timeout: the acknowledged message is not restored again
    assert starts_and_effects(db, key) == (starts, 1)
