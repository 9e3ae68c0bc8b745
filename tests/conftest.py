"""Shared fixtures: real Redis and PostgreSQL, apps built from settings, INI files.

Services are found at WS_TEST_REDIS_URL / WS_TEST_DATABASE_URL (defaults:
the machine's Redis db 15 and PostgreSQL database ``test``). When one is not
reachable the test is skipped on a laptop but fails when CI=true.
"""
from __future__ import annotations

import json
import os
import pathlib
import textwrap
import uuid

import pytest
import redis
import sqlalchemy
from sqlalchemy import text

ROOT = pathlib.Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("WS_TEST_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_missing(what: str, exc: Exception):
    message = f"{what} is not reachable ({exc})"
    if IN_CI:
        pytest.fail(message + " and CI=true: services are required", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str:
    """A PostgreSQL database private to this test session (dropped at the end).

    Private so that two test runs on one machine (or one run's worker
    subprocesses of another) never see each other's tables.
    """
    try:
        admin = sqlalchemy.create_engine(DATABASE_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        service_missing(f"PostgreSQL at {DATABASE_URL}", exc)
    name = f"wstest_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(DATABASE_URL).set(database=name)
    yield url.render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def queue_name() -> str:
    """A Redis queue name private to this test."""
    return f"wstest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_url, queue_name):
    client = redis.Redis.from_url(redis_url)
    yield client
    # kombu also keeps the queue's exchange bindings in sets of its own.
    client.delete(queue_name, f"_kombu.binding.{queue_name}", f"_kombu.binding_permanent.{queue_name}")
    client.close()


def queued_messages(client, queue: str) -> list[dict]:
    """Messages waiting in a Redis queue, oldest first, as kombu stored them."""
    return [json.loads(raw) for raw in reversed(client.lrange(queue, 0, -1))]


@pytest.fixture
def db(database_url):
    """A PostgreSQL engine with fresh test tables."""
    engine = sqlalchemy.create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS ws_test_effects, ws_test_rows, ws_test_counter"))
        conn.execute(text("CREATE TABLE ws_test_effects (id serial PRIMARY KEY, task_id text, value text)"))
        conn.execute(text("CREATE TABLE ws_test_rows (id serial PRIMARY KEY, value text UNIQUE)"))
        conn.execute(text("CREATE TABLE ws_test_counter (id int PRIMARY KEY, value int NOT NULL)"))
    yield engine
    engine.dispose()


def celery_config_literal(**config) -> str:
    return repr(config)


@pytest.fixture
def built_apps():
    """A list to append every router a test builds to; their engines are disposed afterwards.

    Scanned tasks keep every app they were bound to, and with them pools of
    idle connections that would add up to PostgreSQL's max_connections over
    a whole run.
    """
    from websauna_tasks.db import get_engine

    apps = []
    yield apps
    for router in apps:
        engine = get_engine(router.registry)
        if engine is not None:
            engine.dispose()


@pytest.fixture
def make_app(built_apps):
    """Build the test application from a settings dict; returns the WSGI router."""
    from tests.testapp import main

    def factory(**settings):
        router = main({}, **settings)
        built_apps.append(router)
        return router

    return factory


@pytest.fixture
def write_ini(tmp_path):
    """Write an INI for tests.testapp with the given [app:main] settings."""

    def factory(settings: dict[str, str], name: str = "test.ini") -> str:
        lines = ["[app:main]", "use = call:tests.testapp:main"]
        for key, value in settings.items():
            value = textwrap.indent(str(value), "    ").lstrip() if "\n" in str(value) else value
            lines.append(f"{key} = {value}")
        path = tmp_path / name
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    return factory


@pytest.fixture
def subprocess_env():
    """Environment for ws-celery subprocesses: tests package importable."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


@pytest.fixture
def fault_servers(tmp_path):
    """A persistent private Redis and a private PostgreSQL (tests/servers.py) with ``fault_effects``.

    Yields (broker, database, engine); both servers are stopped, and the
    cluster deleted, whatever the test did to them.
    """
    import sqlalchemy as sa

    from tests import fault_tasks
    from tests.servers import PrivatePostgres, PrivateRedis

    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    broker = PrivateRedis(str(redis_dir), persistent=True)
    database = PrivatePostgres()
    engine = None
    try:
        broker.start()
        database.start()
        engine = sa.create_engine(database.url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text(fault_tasks.EFFECTS_DDL))
        yield broker, database, engine
    finally:
        if engine is not None:
            engine.dispose()
        broker.stop()
        database.cleanup()
