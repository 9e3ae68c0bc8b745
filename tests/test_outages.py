"""Database outages (websauna_tasks.outages): which errors count, the settings, eager runs, giving up.

The restart of a real PostgreSQL under a worker is in tests/test_fault_postgres_restart.py.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa
from pyramid.exceptions import ConfigurationError
from sqlalchemy import text

from tests.apps import sample_tasks
from tests.servers import free_port
from websauna_tasks import get_celery
from websauna_tasks.outages import (
    DEFAULT_BACKOFF_MAX_SECONDS,
    DEFAULT_RETRIES,
    OutagePolicy,
    database_unavailable,
)
from websauna_tasks.state import app_state
from websauna_tasks.testing import wait_for


def refused_url() -> str:
    return f"postgresql+psycopg://root@127.0.0.1:{free_port()}/nothing"


def error_of(engine: sa.Engine, statement: str) -> Exception:
    with pytest.raises(sa.exc.DBAPIError) as caught:
        with engine.connect() as conn:
            conn.execute(text(statement))
    return caught.value


def test_refused_connection_is_an_outage():
    engine = sa.create_engine(refused_url())
    assert database_unavailable(error_of(engine, "SELECT 1"))


def test_connection_terminated_by_the_server_is_an_outage(database_url):
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as victim, engine.connect() as killer:
            pid = victim.execute(text("SELECT pg_backend_pid()")).scalar_one()
            killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(sa.exc.DBAPIError) as caught:
                victim.execute(text("SELECT 1"))
        assert caught.value.connection_invalidated
        assert database_unavailable(caught.value)
    finally:
        engine.dispose()


def test_errors_of_the_query_or_data_are_not_outages(database_url, db):
    assert not database_unavailable(error_of(db, "SELEC 1"))
    assert not database_unavailable(error_of(db, "SELECT 1/0"))
    with db.begin() as conn:
        conn.execute(text("INSERT INTO ws_test_rows (value) VALUES ('once')"))
    assert not database_unavailable(error_of(db, "INSERT INTO ws_test_rows (value) VALUES ('once')"))
    assert not database_unavailable(ValueError("not a database error"))


def test_an_outage_raised_from_inside_another_error_still_counts():
    engine = sa.create_engine(refused_url())
    refused = error_of(engine, "SELECT 1")
    try:
        try:
            raise refused
        except sa.exc.DBAPIError as exc:
            raise RuntimeError("loading the order failed") from exc
    except RuntimeError as wrapped:
        assert database_unavailable(wrapped)


def test_default_policy_and_its_countdowns(make_app, redis_url, queue_name):
    router = make_app(**{"websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name})})
    policy = app_state(get_celery(router.registry)).outage_policy
    assert policy == OutagePolicy(DEFAULT_RETRIES, DEFAULT_BACKOFF_MAX_SECONDS)
    for retries, (low, high) in {0: (0.5, 1), 1: (1, 2), 3: (4, 8), 9: (30, 60)}.items():
        samples = [policy.countdown(retries) for _ in range(200)]
        assert low <= min(samples) and max(samples) <= high
    assert max(policy.countdown(9, limit=1.5) for _ in range(200)) <= 1.5


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("websauna_tasks.db_outage_retries", "-1", "must be 0 to 1000"),
    ("websauna_tasks.db_outage_retries", "many", "expected a whole number"),
    ("websauna_tasks.db_outage_retries", "2.5", "whole number"),
    ("websauna_tasks.db_outage_backoff_max_seconds", "0", "must be 0.01 to 86400 seconds"),
    ("websauna_tasks.db_outage_backoff_max_seconds", "nan", "expected a finite number (0.01 to 86400 seconds)"),
])
def test_bad_settings_are_refused_naming_the_key(make_app, key, value, expected):
    with pytest.raises(ConfigurationError) as caught:
        make_app(**{"websauna.celery_config": repr({"broker_url": "memory://"}), key: value})
    assert key in str(caught.value) and expected in str(caught.value)


def test_eager_run_raises_the_outage_to_its_caller(make_app):
    make_app(**{"websauna.celery_config": repr({"broker_url": "memory://", "task_always_eager": True}),
                "sqlalchemy.url": refused_url()})
    with pytest.raises(sa.exc.OperationalError):
        sample_tasks.transactional_insert.apply(args=("x",), throw=True)


def test_worker_gives_up_after_the_configured_retries(redis_url, queue_name, write_ini, ws_celery_worker_factory,
                                                      subprocess_env, make_app):
    settings = {
        "websauna.celery_config": repr({"broker_url": redis_url, "task_default_queue": queue_name}),
        "sqlalchemy.url": refused_url(),
        "websauna_tasks.db_outage_retries": "2",
        "websauna_tasks.db_outage_backoff_max_seconds": "0.2",
    }
    make_app(**settings)
    worker = ws_celery_worker_factory(write_ini(settings), "worker", "-c", "1", env=subprocess_env)
    sample_tasks.transactional_insert.apply_async(args=("never",), tm=None)
    wait_for(lambda: "still unavailable after 2 retries" in worker.output(), timeout=30, describe=worker.output)
    output = worker.output()
    assert "retry 1 of 2" in output and "retry 2 of 2" in output and "retry 3 of" not in output
    assert "OperationalError" in output.split("still unavailable after 2 retries", 1)[1]
