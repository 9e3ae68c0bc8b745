"""Shared fixtures: real Redis and PostgreSQL, apps built from settings, INI files.

Services are found at WS_TEST_REDIS_URL / WS_TEST_DATABASE_URL (defaults:
the machine's Redis db 15 and PostgreSQL database ``test``). When one is not
reachable the test is skipped on a laptop but fails when CI=true.

Tiers (markers given at collection, see ``pytest_collection_modifyitems``):
``fault`` as marked by hand; ``integration`` for every test that uses a
service fixture (``SERVICE_FIXTURES``, directly or through other fixtures) or
is marked so; ``unit`` for the rest, which may not connect to a service port
(``unit_tier_guard``).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import textwrap
import typing as t
import urllib.parse
import uuid

import pytest
import redis
import sqlalchemy
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy import text

from tests.servers import PrivatePostgres, PrivateRabbitMQ, PrivateRedis
from tests.unit_guard.sitecustomize import ENVIRONMENT, UnitGuard

ROOT = pathlib.Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("WS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("WS_TEST_DATABASE_URL", "postgresql+psycopg://root@127.0.0.1:5432/test")
#: The machine's RabbitMQ, without a vhost: each test gets a vhost of its own (``rabbitmq_url``).
RABBITMQ_URL = os.environ.get("WS_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672").rstrip("/")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Fixtures that reach Redis, PostgreSQL or a broker, or start processes that do: a test that
#: uses one (``item.fixturenames`` includes fixtures used through other fixtures) is integration.
SERVICE_FIXTURES = frozenset({
    "redis_url", "database_url", "redis_client", "db", "ws_celery_worker_factory", "fault_servers", "rabbitmq_url",
})
TIERS = ("unit", "integration", "fault")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put each test in exactly one tier; a test in none or in two stops the collection."""
    wrong = []
    for item in items:
        tiers = {mark.name for mark in item.iter_markers() if mark.name in TIERS}
        services = sorted(SERVICE_FIXTURES.intersection(item.fixturenames))
        if not tiers:
            tiers = {"integration" if services else "unit"}
            item.add_marker(next(iter(tiers)))
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid} is marked {' and '.join(sorted(tiers))}: one tier only")
        elif "unit" in tiers and services:
            wrong.append(f"{item.nodeid} is marked unit but uses the service fixture(s) {', '.join(services)}")
    if wrong:
        raise pytest.UsageError("test tiers (tests/conftest.py):\n  " + "\n  ".join(wrong))


def _port(url: str, default: int) -> int:
    try:
        return sqlalchemy.engine.make_url(url).port or default
    except Exception:
        return default


#: Redis, PostgreSQL, AMQP, and wherever WS_TEST_* moved them.
SERVICE_PORTS = frozenset({6379, 5432, 5672, _port(REDIS_URL, 6379), _port(DATABASE_URL, 5432),
                           _port(RABBITMQ_URL, 5672)})
UNIT_GUARD_PATH = ROOT / "tests" / "unit_guard"
UNIT_GUARD = UnitGuard(SERVICE_PORTS, f"use a service fixture ({', '.join(sorted(SERVICE_FIXTURES))}) or mark "
                                      "the test @pytest.mark.integration(reason=...), so that it runs in the "
                                      "integration tier (tests/conftest.py)")
UNIT_GUARD.install()


def _refused_in_unit_tests(cls: type, what: str) -> None:
    original = cls.start

    def start(self: t.Any, *args: t.Any, **kwargs: t.Any) -> t.Any:
        if UNIT_GUARD.test is not None:
            UNIT_GUARD.refuse(what)
        return original(self, *args, **kwargs)

    cls.start = start


# Servers of a test's own are services too, even on ports of their own.
_refused_in_unit_tests(PrivateRedis, "started a redis-server (tests/servers.py)")
_refused_in_unit_tests(PrivatePostgres, "started a PostgreSQL server (tests/servers.py)")
_refused_in_unit_tests(PrivateRabbitMQ, "started a RabbitMQ node (tests/servers.py)")


@pytest.fixture(autouse=True)
def unit_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> t.Iterator[None]:
    """A unit-tier test fails if it, a thread or a Python process it started connects to a service port."""
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    handle, report = tempfile.mkstemp(prefix="ws-unit-guard-", suffix=".jsonl")
    os.close(handle)
    UNIT_GUARD.test, UNIT_GUARD.refused = request.node.nodeid, []
    monkeypatch.setenv(ENVIRONMENT, UNIT_GUARD.environment(report))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(UNIT_GUARD_PATH),
                                                                     os.environ.get("PYTHONPATH")])))
    try:
        yield
    finally:
        UNIT_GUARD.test = None
        with open(report, encoding="utf-8") as lines:
            refused = UNIT_GUARD.refused + [json.loads(line) for line in lines if line.strip()]
        os.unlink(report)
    if refused:
        # Also when the code under test swallowed the ConnectionRefusedError.
        pytest.fail(refused[0], pytrace=False)


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


def _rabbitmqctl(*args: str) -> None:
    subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", *args], check=True, capture_output=True, text=True,
                   timeout=60)


@pytest.fixture
def rabbitmq_url() -> t.Iterator[str]:
    """An AMQP URL of the machine's RabbitMQ on a vhost of this test's own, deleted afterwards.

    The vhost is made with ``rabbitmqctl`` (add_vhost, set_permissions for
    the URL's user): its queues and exchanges vanish with it, whatever the
    test left behind.
    """
    import kombu

    try:
        with kombu.Connection(RABBITMQ_URL + "//", connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1)
        if shutil.which("rabbitmqctl") is None:
            raise FileNotFoundError("rabbitmqctl is not on PATH (needed to make the test's vhost)")
    except Exception as exc:
        service_missing(f"RabbitMQ at {maybe_sanitize_url(RABBITMQ_URL)}", exc)
    vhost = f"wstest-{uuid.uuid4().hex[:12]}"
    user = urllib.parse.urlsplit(RABBITMQ_URL).username or "guest"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{RABBITMQ_URL}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


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


def include_in_memory(**settings: str):
    """A Configurator that included pyramid_tm and websauna_tasks with an in-memory broker: no service."""
    from pyramid.config import Configurator

    config = Configurator(settings={"websauna.celery_config": "{'broker_url': 'memory://'}", **settings})
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    return config


@pytest.fixture
def run_cli(subprocess_env, tmp_path):
    """``run_cli(ini, *args)``: ``ws-celery INI -- args`` in a subprocess, its CompletedProcess (text)."""
    import subprocess
    import sys

    def run(ini: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "websauna_tasks.cli", ini, "--", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path, env={**os.environ, **subprocess_env})

    return run


# Dead letters of a test go to "<queue_name>.dead"; tests that use these
# fixtures define a ``settings`` fixture that says so.
@pytest.fixture
def dead_key(redis_client, queue_name):
    key = f"{queue_name}.dead"
    yield key
    redis_client.delete(key, f"{queue_name}.other")


@pytest.fixture
def celery(make_app, settings, dead_key):
    """The Celery app of an application built from the test module's ``settings`` fixture."""
    from websauna_tasks import get_celery

    return get_celery(make_app(**settings).registry)


@pytest.fixture
def ini(write_ini, settings):
    """An INI file of the test module's ``settings`` fixture."""
    return write_ini(settings)


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
    from tests.apps.testapp import main

    def factory(**settings):
        router = main({}, **settings)
        built_apps.append(router)
        return router

    return factory


@pytest.fixture
def write_ini(tmp_path):
    """Write an INI for tests.apps.testapp with the given [app:main] settings."""

    def factory(settings: dict[str, str], name: str = "test.ini") -> str:
        lines = ["[app:main]", "use = call:tests.apps.testapp:main"]
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

    from tests.apps import fault_tasks

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
