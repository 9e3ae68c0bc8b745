"""Idempotent tasks: a redelivered run whose task id committed does nothing.

In-process runs (``task.apply(task_id=...)``) check the done-row's
transaction semantics; real ws-celery workers receive the same message
twice, and one is SIGKILLed in the middle of 100 idempotent tasks.
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import pytest
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps import reliability_tasks
from tests.test_crash_safety import (
    make_reliability_app,
    reliability_settings,
    rows_of,
    starts_and_effects,
    write_reliability_ini,
)
from websauna_tasks import ScheduleOnCommitTask, get_celery, prune_done, task
from websauna_tasks.idempotency import DONE_TABLE_NAME
from websauna_tasks.testing import wait_for


@pytest.fixture
def build(redis_url, database_url, queue_name, db):
    """Build tests.apps.reliability_app with extra Celery settings; engines disposed afterwards."""
    from websauna_tasks.db import get_engine

    apps = []

    def factory(**celery):
        router = make_reliability_app(reliability_settings(redis_url, database_url, queue_name, **celery))
        apps.append(router)
        return router

    yield factory
    for router in apps:
        get_engine(router.registry).dispose()


def done_rows(db, task_id: str | None = None) -> list[tuple[str, str]]:
    query = f"SELECT task_id, task_name FROM {DONE_TABLE_NAME}"
    params = {}
    if task_id is not None:
        query += " WHERE task_id = :id"
        params["id"] = task_id
    with db.connect() as conn:
        return [tuple(row) for row in conn.execute(text(query), params)]


@pytest.fixture
def clean_done(db):
    with db.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {DONE_TABLE_NAME}"))
    from websauna_tasks import idempotency

    idempotency._created.clear()  # this test's table is created again on first use
    yield


# -- in-process ---------------------------------------------------------------------------------

def test_same_task_id_twice_runs_the_body_once(build, db, clean_done):
    build()
    first = reliability_tasks.idempotent_effect.apply(args=("twice",), task_id="id-twice", throw=True)
    second = reliability_tasks.idempotent_effect.apply(args=("twice",), task_id="id-twice", throw=True)
    assert first.get() == "twice" and second.get() is None
    assert rows_of(db, "twice").count("effect") == 1
    assert len(starts_and_effects(db, "twice")[0]) == 1  # the body did not start again
    assert done_rows(db, "id-twice") == [("id-twice", "tests.rel.idempotent_effect")]
    # Another task id is another task.
    reliability_tasks.idempotent_effect.apply(args=("twice",), task_id="id-other", throw=True)
    assert rows_of(db, "twice").count("effect") == 2


def test_a_run_that_raises_leaves_no_done_row_and_its_redelivery_runs(build, db, clean_done):
    build()
    with pytest.raises(RuntimeError, match="first run"):
        reliability_tasks.idempotent_fails_first.apply(args=("fails",), task_id="id-fails", throw=True)
    assert done_rows(db, "id-fails") == []
    assert rows_of(db, "fails").count("effect") == 0  # rolled back with the done-row
    assert reliability_tasks.idempotent_fails_first.apply(args=("fails",), task_id="id-fails",
                                                          throw=True).get() == "fails"
    assert rows_of(db, "fails").count("effect") == 1 and len(done_rows(db, "id-fails")) == 1
    assert reliability_tasks.idempotent_fails_first.apply(args=("fails",), task_id="id-fails",
                                                          throw=True).get() is None
    assert rows_of(db, "fails").count("effect") == 1


def test_retryable_task_is_idempotent_too(build, db, clean_done):
    build()
    for _ in range(3):
        reliability_tasks.idempotent_retryable.apply(args=("retryable",), task_id="id-retryable", throw=True)
    assert starts_and_effects(db, "retryable") == (starts_and_effects(db, "retryable")[0], 1)
    assert len(starts_and_effects(db, "retryable")[0]) == 1


def test_a_concurrent_duplicate_waits_for_the_first_and_skips(build, db, clean_done):
    """PostgreSQL: the second insert blocks on the primary key until the first run commits."""
    build()
    reliability_tasks.idempotent_effect.apply(args=("warm",), throw=True)  # the table exists before the race
    results = {}

    def run(label, pause):
        results[label] = reliability_tasks.idempotent_effect.apply(
            args=("race", pause), task_id="id-race", throw=True).get()

    first = threading.Thread(target=run, args=("first", 1.0))
    first.start()
    wait_for(lambda: starts_and_effects(db, "race")[0], timeout=10)
    second = threading.Thread(target=run, args=("second", 0.0))
    second.start()
    first.join(20)
    second.join(20)
    assert sorted(results.items()) == [("first", "race"), ("second", None)]
    assert rows_of(db, "race").count("effect") == 1


def test_idempotent_needs_a_transactional_base():
    def body():
        pass

    proxy = task(name="tests.rel.bad_idempotent", base=ScheduleOnCommitTask, idempotent=True)(body)
    from celery import Celery

    with pytest.raises(ConfigurationError, match="idempotent=True needs base=TransactionalTask"):
        proxy.bind_to_app(Celery("bad", set_as_current=False))


def test_prune_done_removes_rows_past_the_retention(build, db, clean_done):
    app = build()
    reliability_tasks.idempotent_effect.apply(args=("prune",), task_id="id-recent", throw=True)
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    with db.begin() as conn:
        conn.execute(text(f"INSERT INTO {DONE_TABLE_NAME} (task_id, task_name, done_at) "
                          "VALUES ('id-old', 'x', :at)"), {"at": old})
    assert prune_done(app.registry) == 1  # default retention: 7 days
    assert [task_id for task_id, _ in done_rows(db)] == ["id-recent"]
    assert prune_done(app.registry, older_than_seconds=0) == 1
    assert done_rows(db) == []


# -- real workers ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_message_delivered_twice_to_a_worker_runs_once(
        build, tmp_path, redis_url, database_url, queue_name, db, clean_done, ws_celery_worker_factory,
        subprocess_env):
    ini = write_reliability_ini(tmp_path, reliability_settings(redis_url, database_url, queue_name))
    worker = ws_celery_worker_factory(ini, "worker", "-c", "2", env=subprocess_env)
    app = get_celery(build().registry)
    for _ in range(2):
        app.send_task("tests.rel.idempotent_effect", args=("delivered-twice",), task_id="id-delivered-twice")
    wait_for(lambda: worker.output().count("id-delivered-twice] succeeded") == 2, timeout=30,
             describe=worker.output)
    starts, effects = starts_and_effects(db, "delivered-twice")
    assert len(starts) == 1 and effects == 1
    assert "already done" in worker.output()


def _fault_run(task_name, key_prefix, tmp_path, redis_url, database_url, queue_name, db, worker_factory, env):
    """100 tasks; SIGKILL the worker's group after ~30 effects; restart; wait. Returns (starts, effects) per key."""
    transport = {"visibility_timeout": 3, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    settings = reliability_settings(redis_url, database_url, queue_name, broker_transport_options=transport)
    ini = write_reliability_ini(tmp_path, settings, name=f"{key_prefix}.ini")
    worker = worker_factory(ini, "worker", "-c", "4", env=env)
    from tests.apps.reliability_app import main

    router = main({}, **settings)
    app = get_celery(router.registry)
    keys = [f"{key_prefix}-{index:03d}" for index in range(100)]
    for key in keys:
        # 0.2 s before the insert, 0.2 s between the commit and the acknowledgement.
        app.send_task(task_name, args=(key, 0.2, 0.2))

    def tally():
        with db.connect() as conn:
            rows = conn.execute(text("SELECT task_id, value FROM ws_test_effects WHERE task_id LIKE :p"),
                                {"p": f"{key_prefix}-%"}).all()
        starts = {key: 0 for key in keys}
        effects = {key: 0 for key in keys}
        for key, value in rows:
            if value == "effect":
                effects[key] += 1
            else:
                starts[key] += 1
        return starts, effects

    wait_for(lambda: sum(1 for n in tally()[1].values() if n) >= 30, timeout=60, describe=worker.output)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.process.wait(10)
    at_kill = sum(1 for n in tally()[1].values() if n)
    time.sleep(3.5)  # past the visibility timeout: the restarted worker restores what was held
    replacement = worker_factory(ini, "worker", "-c", "4", env=env)
    wait_for(lambda: all(tally()[1].values()), timeout=90, describe=replacement.output)
    time.sleep(4.0)  # another visibility timeout: nothing left to redeliver
    starts, effects = tally()
    from websauna_tasks.db import get_engine

    get_engine(router.registry).dispose()
    return starts, effects, at_kill, replacement.output()


@pytest.mark.slow
def test_worker_killed_among_100_idempotent_tasks_every_effect_exactly_once(
        tmp_path, redis_url, database_url, queue_name, db, clean_done, ws_celery_worker_factory, subprocess_env):
    starts, effects, at_kill, log = _fault_run(
        "tests.rel.idempotent_effect", "idem", tmp_path, redis_url, database_url, queue_name, db,
        ws_celery_worker_factory, subprocess_env)
    skipped = log.count("already done")
    print(f"\nidempotent: 100 tasks, worker group SIGKILLed after {at_kill} effects; "
          f"runs started twice: {sum(1 for n in starts.values() if n > 1)}; "
          f"redeliveries skipped as already done: {skipped}; effects: {sum(effects.values())}")
    assert sorted(set(effects.values())) == [1], {k: n for k, n in effects.items() if n != 1}
    assert sum(effects.values()) == 100
    assert len(done_rows(db)) == 100


@pytest.mark.slow
def test_same_fault_without_idempotency_is_at_least_once(
        tmp_path, redis_url, database_url, queue_name, db, ws_celery_worker_factory, subprocess_env):
    """The contrast: every task still runs (acks_late), but a committed, unacknowledged one runs twice."""
    starts, effects, at_kill, _log = _fault_run(
        "tests.rel.slow_effect", "plain", tmp_path, redis_url, database_url, queue_name, db,
        ws_celery_worker_factory, subprocess_env)
    twice = sum(1 for n in effects.values() if n > 1)
    print(f"\nwithout idempotency: 100 tasks, killed after {at_kill} effects; "
          f"effects committed twice: {twice}; effects in all: {sum(effects.values())}")
    assert all(effects.values())  # nothing lost
    assert sum(effects.values()) == 100 + sum(n - 1 for n in effects.values() if n > 1)


@pytest.mark.slow
def test_worker_prunes_done_rows_past_the_retention(
        build, tmp_path, redis_url, database_url, queue_name, db, clean_done, ws_celery_worker_factory,
        subprocess_env):
    settings = reliability_settings(redis_url, database_url, queue_name)
    settings.update({"websauna_tasks.idempotency_prune_interval_seconds": "0.5",
                     "websauna_tasks.idempotency_retention_seconds": "2"})
    worker = ws_celery_worker_factory(write_reliability_ini(tmp_path, settings), "worker", "-c", "1",
                                      env=subprocess_env)
    app = get_celery(build().registry)
    app.send_task("tests.rel.idempotent_effect", args=("pruned",), task_id="id-pruned")
    wait_for(lambda: "effect" in rows_of(db, "pruned"), timeout=30, describe=worker.output)
    committed = time.monotonic()
    assert done_rows(db, "id-pruned")
    wait_for(lambda: not done_rows(db, "id-pruned"), timeout=30, describe=worker.output)
    kept = time.monotonic() - committed
    assert 1.0 < kept < 10.0, f"kept {kept:.1f}s with a 2 s retention and a 0.5 s interval"
    assert "pruned 1 row(s) of websauna_tasks_done" in worker.output()
    assert rows_of(db, "pruned").count("effect") == 1  # the task's own writes stay


@pytest.mark.parametrize("value", ["-1", "hourly"])
def test_bad_prune_interval_is_refused_at_start(build, value):
    with pytest.raises(ConfigurationError, match="websauna_tasks.idempotency_prune_interval_seconds"):
        from tests.test_crash_safety import make_reliability_app

        make_reliability_app({"websauna.celery_config": repr({"broker_url": "memory://"}),
                              "websauna_tasks.idempotency_prune_interval_seconds": value})
