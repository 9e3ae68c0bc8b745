"""The test tiers of tests/conftest.py: who lands in which tier, and the unit tier's guard.

The guard tests are unit-tier tests themselves: they connect to a service
port on purpose, check the refusal, then clear it so that their own teardown
passes. No service needs to run: the refusal comes before any packet is sent.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import redis
import sqlalchemy
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.conftest import UNIT_GUARD
from tests.servers import PrivateRedis, free_port
from tests.unit_guard.sitecustomize import ENVIRONMENT

pytest_plugins = ("pytester",)


@pytest.fixture
def forgiven():
    """Lets a test provoke refusals: they are read and cleared before the guard's teardown sees them."""
    report = json.loads(os.environ[ENVIRONMENT])["report"]

    def refusals() -> list[str]:
        with open(report, encoding="utf-8") as lines:
            from_children = [json.loads(line) for line in lines if line.strip()]
        found = UNIT_GUARD.refused + from_children
        UNIT_GUARD.refused = []
        open(report, "w").close()
        return found

    yield refusals
    refusals()


def test_this_test_is_in_the_unit_tier_only(request):
    tiers = [mark.name for mark in request.node.iter_markers() if mark.name in ("unit", "integration", "fault")]
    assert tiers == ["unit"]


@pytest.mark.parametrize("port, service", [(6379, "Redis"), (5672, "AMQP"), (5432, "PostgreSQL")])
def test_a_socket_to_a_service_port_is_refused_with_the_reason(forgiven, port, service):
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", port), timeout=1)
    assert f"connected to {service} at 127.0.0.1:{port}" in str(refused.value)
    assert "test_a_socket_to_a_service_port_is_refused_with_the_reason" in str(refused.value)
    assert "@pytest.mark.integration" in str(refused.value)
    assert forgiven() == [str(refused.value)]


def test_a_refusal_the_code_swallows_is_still_recorded(forgiven):
    # redis-py turns the refusal into its own ConnectionError, as code under test may swallow it.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)).ping()
    assert [refusal.split(". ")[0] for refusal in forgiven()] == [
        "unit-tier test tests/test_test_tiers.py::test_a_refusal_the_code_swallows_is_still_recorded connected to "
        "Redis at 127.0.0.1:6379"]


def test_libpq_connections_are_refused_too(forgiven):
    engine = sqlalchemy.create_engine("postgresql+psycopg://root@127.0.0.1:5432/test")
    try:
        with pytest.raises(ConnectionRefusedError, match="connected to PostgreSQL at 127.0.0.1:5432"):
            engine.connect()
    finally:
        engine.dispose()
    assert len(forgiven()) == 1


def test_other_ports_are_left_alone(forgiven):
    with pytest.raises(ConnectionRefusedError) as refused:
        socket.create_connection(("127.0.0.1", free_port()), timeout=1)
    assert "unit-tier" not in str(refused.value)
    assert forgiven() == []


def test_a_private_server_is_refused(forgiven, tmp_path):
    with pytest.raises(ConnectionRefusedError, match="started a redis-server"):
        PrivateRedis(str(tmp_path)).start()
    assert len(forgiven()) == 1


@pytest.mark.parametrize("code, service", [
    ("import socket; socket.create_connection(('127.0.0.1', 6379), timeout=1)", "Redis at 127.0.0.1:6379"),
    ("import psycopg; psycopg.connect('host=127.0.0.1 port=5432 dbname=test', connect_timeout=1)",
     "PostgreSQL at 127.0.0.1:5432"),
])
def test_python_processes_the_test_starts_are_guarded_and_report_back(forgiven, code, service):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "ConnectionRefusedError: unit-tier test" in result.stderr
    (refusal,) = forgiven()
    assert f"connected to {service} (process " in refusal


# -- tiers --------------------------------------------------------------------------------------------------------

INNER_CONFTEST = """
from tests.conftest import *  # noqa: F403


def pytest_collection_finish(session):
    for item in session.items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in ("unit", "integration", "fault")]
        print("TIER", item.name, *tiers)
"""
INNER_INI = """[pytest]
markers =
    unit: u
    integration: i
    fault: f
"""
INNER_TESTS = """
import pytest

@pytest.fixture
def app(db):
    return db

def test_plain():
    pass

def test_service(redis_url):
    pass

def test_through_a_fixture(app):
    pass

@pytest.mark.integration(reason="a reason")
def test_marked():
    pass

@pytest.mark.fault
def test_fault(fault_servers):
    pass

class TestGrouped:
    def test_in_a_class(self, ws_celery_worker_factory):
        pass
"""
TWO_TIERS = """
import pytest

@pytest.mark.fault
@pytest.mark.integration
def test_fault_and_integration():
    pass

@pytest.mark.unit
def test_unit_with_a_service(redis_client):
    pass
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    return pytester


def test_each_test_lands_in_one_tier(inner):
    inner.makepyfile(test_inner=INNER_TESTS)
    result = inner.runpytest("--collect-only", "-q", "-s", "-p", "no:cacheprovider")
    assert result.ret == 0
    assert [line.split()[1:] for line in result.outlines if line.startswith("TIER ")] == [
        ["test_plain", "unit"], ["test_service", "integration"], ["test_through_a_fixture", "integration"],
        ["test_marked", "integration"], ["test_fault", "fault"], ["test_in_a_class", "integration"]]


def test_a_test_in_two_tiers_stops_the_collection(inner):
    inner.makepyfile(test_inner=TWO_TIERS)
    result = inner.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = "\n".join(result.errlines)
    assert "test_inner.py::test_fault_and_integration is marked fault and integration: one tier only" in errors
    assert ("test_inner.py::test_unit_with_a_service is marked unit but uses the service fixture(s) redis_client, "
            "redis_url") in errors
