"""RetryableTransactionTask: transient conflicts re-run the body, others do not.

Runs are counted in rows written on a connection of their own (outside the
task's transaction), so an aborted attempt still leaves its count behind
while its transactional write disappears.
"""
from __future__ import annotations

import collections

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from transaction.interfaces import TransientError

from tests.apps import sample_tasks
from tests.test_worker_request import effect_rows, worker_settings
from websauna_tasks.testing import wait_for


def runs_of(db, key: str) -> int:
    return sum(1 for _, value in effect_rows(db, key) if value == "run")


def committed_writes_of(db, key: str) -> list[str]:
    return [value for _, value in effect_rows(db, key) if value.startswith("written by")]


@pytest.fixture
def app_factory(redis_url, database_url, queue_name, db, make_app):
    def factory(**extra: str):
        return make_app(**worker_settings(redis_url, database_url, queue_name, **extra))

    return factory


# -- in-process (task.apply) ---------------------------------------------------------

# (task, retry_attempts setting or None for the default, attempts expected in all)
ATTEMPT_SOURCES = [
    pytest.param(sample_tasks.transient_until, None, 3, id="default-3"),
    pytest.param(sample_tasks.transient_until, "5", 5, id="setting-5"),
    pytest.param(sample_tasks.transient_until, "1", 1, id="setting-1-no-retry"),
    pytest.param(sample_tasks.transient_until_7, "2", 7, id="task-option-7-beats-setting-2"),
]


@pytest.mark.parametrize("task_proxy, setting, attempts", ATTEMPT_SOURCES)
def test_succeeds_on_the_last_allowed_attempt(task_proxy, setting, attempts, app_factory, db):
    app_factory(**({} if setting is None else {"websauna_tasks.retry_attempts": setting}))
    key = f"succeed-{attempts}"
    result = task_proxy.apply(args=(key, attempts - 1), throw=True)
    assert result.get() == attempts
    assert runs_of(db, key) == attempts
    # Every failed attempt was rolled back; only the last one's write is committed.
    assert committed_writes_of(db, key) == [f"written by run {attempts}"]


@pytest.mark.parametrize("task_proxy, setting, attempts", ATTEMPT_SOURCES)
def test_gives_up_after_exactly_the_allowed_attempts(task_proxy, setting, attempts, app_factory, db):
    app_factory(**({} if setting is None else {"websauna_tasks.retry_attempts": setting}))
    key = f"give-up-{attempts}"
    with pytest.raises(TransientError, match=f"run {attempts} of {key}"):
        task_proxy.apply(args=(key, attempts + 10), throw=True)
    assert runs_of(db, key) == attempts
    assert committed_writes_of(db, key) == []


def test_non_transient_error_runs_once(app_factory, db):
    app_factory()
    with pytest.raises(ValueError, match="not a conflict"):
        sample_tasks.fails_hard.apply(args=("hard",), throw=True)
    assert runs_of(db, "hard") == 1


def test_integrity_error_is_not_a_conflict(app_factory, db):
    app_factory()
    with db.begin() as conn:
        conn.execute(text("INSERT INTO ws_test_rows (value) VALUES ('taken')"))
    with pytest.raises(IntegrityError):
        sample_tasks.duplicate_row.apply(args=("dup", "taken"), throw=True)
    assert runs_of(db, "dup") == 1


# -- real workers ----------------------------------------------------------------------

def send(task_proxy, *args):
    return task_proxy.apply_async(args=args, tm=None)


@pytest.mark.slow
def test_worker_retries_up_to_the_setting_then_fails(redis_url, database_url, queue_name, db, make_app, write_ini,
                                                     ws_celery_worker_factory, subprocess_env):
    settings = worker_settings(redis_url, database_url, queue_name, **{"websauna_tasks.retry_attempts": "4"})
    ws_celery_worker_factory(write_ini(settings), "worker", "-c", "2", "-l", "info", env=subprocess_env)
    make_app(**settings)
    gives_up = send(sample_tasks.transient_until, "worker-gives-up", 100)
    succeeds = send(sample_tasks.transient_until_7, "worker-succeeds", 6)
    with pytest.raises(TransientError):
        gives_up.get(timeout=30)
    assert succeeds.get(timeout=30) == 7
    assert runs_of(db, "worker-gives-up") == 4
    assert committed_writes_of(db, "worker-gives-up") == []
    assert runs_of(db, "worker-succeeds") == 7
    assert committed_writes_of(db, "worker-succeeds") == ["written by run 7"]


TASKS = 200


@pytest.mark.slow
def test_serializable_increments_of_one_row_end_at_the_exact_total(redis_url, database_url, queue_name, db,
                                                                   make_app, write_ini, ws_celery_worker_factory,
                                                                   subprocess_env):
    settings = worker_settings(redis_url, database_url, queue_name, **{"sqlalchemy.isolation_level": "SERIALIZABLE"})
    with db.begin() as conn:
        conn.execute(text("INSERT INTO ws_test_counter (id, value) VALUES (1, 0)"))
    ini = write_ini(settings)
    # Two worker processes of two pool children each: four transactions can overlap on one row.
    workers = [ws_celery_worker_factory(ini, "worker", "-c", "2", "-l", "info", "-n", f"w{i}@%h",
                                        env=subprocess_env) for i in range(2)]
    make_app(**settings)
    results = [send(sample_tasks.counted_increment, 1) for _ in range(TASKS)]
    values = sorted(result.get(timeout=60) for result in results)

    def counter() -> int:
        with db.connect() as conn:
            return conn.execute(text("SELECT value FROM ws_test_counter WHERE id = 1")).scalar_one()

    def logs() -> str:
        return "\n".join(worker.output()[-3000:] for worker in workers)

    wait_for(lambda: counter() == TASKS, describe=lambda: f"counter at {counter()}\n{logs()}")
    # No lost update, no double count: each run saw a distinct predecessor.
    assert values == list(range(1, TASKS + 1))
    conflicts = [value for _, value in effect_rows(db) if value.startswith("conflict:")]
    kinds = collections.Counter(value.rsplit(":", 1)[1] for value in conflicts)
    print(f"\n{TASKS} serializable increments on one row: {len(conflicts)} conflict retries {dict(kinds)}")
    assert len(conflicts) > 0, "no conflict happened: the test did not exercise the retry"
    logged = sum(output.count("transient conflict on attempt") for output in (w.output() for w in workers))
    assert logged == len(conflicts)
