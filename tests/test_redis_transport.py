"""websauna_tasks.redis_transport: a torn-down Redis channel fails with a connection error.

Celery 5.7's worker tears its connection down with ``collect()`` then
``close()`` when Redis goes away; with kombu's own transport the second step
(or a late ack) raises AttributeError and the worker exits. The tests build
that half-closed channel on purpose, with both transports, so they show what
the subclass protects against.
"""
from __future__ import annotations

import socket

import pytest
import redis
from kombu import Queue
from kombu.common import ignore_errors
from kombu.utils.url import parse_url

from tests.servers import PrivateRedis
from websauna_tasks import get_celery
from websauna_tasks.app import REDIS_TRANSPORT, make_celery
from websauna_tasks.redis_transport import Transport

#: What the settings say -> the transport class the connection must use.
TRANSPORTS = {"ours": None, "kombu's": "redis"}


@pytest.fixture
def build(make_app, queue_name):
    def factory(broker_url: str, **celery):
        config = {"broker_url": broker_url, "task_default_queue": queue_name, **celery}
        return get_celery(make_app(**{"websauna.celery_config": repr(config)}).registry)

    return factory


def test_redis_url_selects_our_transport(build, redis_url):
    celery = build(redis_url)
    assert celery.conf.broker_transport == REDIS_TRANSPORT
    with celery.connection_for_write() as conn:
        assert type(conn.transport) is Transport
        # Celery and kombu pick Redis behaviour (events, mingle, prefetch) by these.
        assert (conn.transport.driver_type, conn.transport.driver_name) == ("redis", "redis")
        expected = parse_url(redis_url)
        assert (conn.hostname, conn.port, conn.virtual_host, conn.password) == (
            expected["hostname"], expected["port"], expected["virtual_host"], expected["password"])


def test_explicit_broker_transport_is_left_alone(build, redis_url):
    celery = build(redis_url, broker_transport="redis")
    assert celery.conf.broker_transport == "redis"
    with celery.connection_for_write() as conn:
        assert type(conn.transport).__module__ == "kombu.transport.redis"


@pytest.mark.parametrize("url", [
    "rediss://127.0.0.1:6380/0",  # kombu adds TLS defaults only when the scheme names the transport
    "redis+socket:///tmp/redis.sock",
    "amqp://guest@localhost//",
    "redis://127.0.0.1:6379/0;amqp://guest@localhost//",
])
def test_other_broker_urls_keep_kombus_choice(url):
    assert make_celery({"broker_url": url}).conf.broker_transport is None


def test_failover_and_list_of_redis_urls_use_our_transport():
    assert make_celery({"broker_url": "redis://a:6379/0;redis://b:6379/0"}).conf.broker_transport == REDIS_TRANSPORT
    assert make_celery({"broker_url": ["redis://a/0", "redis://b/0"]}).conf.broker_transport == REDIS_TRANSPORT
    # A write URL of another kind: one broker_transport cannot serve both.
    mixed = make_celery({"broker_url": "redis://a/0", "broker_write_url": "amqp://guest@b//"})
    assert mixed.conf.broker_transport is None


def _password_url(redis_url: str) -> str:
    """The test Redis with a password in the URL: redis-py sends AUTH, so the server must accept it."""
    parts = parse_url(redis_url)
    return f"redis://:{parts['password'] or ''}@{parts['hostname']}:{parts['port'] or 6379}/" \
           f"{parts['virtual_host'] or 0}"


def round_trip(celery, queue_name: str) -> None:
    with celery.connection_for_write() as conn:
        assert type(conn.transport) is Transport
        with conn.SimpleQueue(queue_name) as simple:
            simple.put({"hello": "redis"})
            message = simple.get(timeout=5)
            assert message.payload == {"hello": "redis"}
            message.ack()
        conn.default_channel.queue_delete(queue_name)
        conn.default_channel.client.delete(f"_kombu.binding.{queue_name}")


def test_round_trip_with_db_number(build, redis_url, redis_client, queue_name):
    parts = parse_url(redis_url)
    celery = build(redis_url)
    round_trip(celery, queue_name)
    # The db of the URL was used, not db 0.
    assert parts["virtual_host"] is None or celery.connection_for_write().virtual_host == parts["virtual_host"]


def test_round_trip_without_db_number(build, redis_url, redis_client, queue_name):
    parts = parse_url(redis_url)
    if parts["virtual_host"] not in (None, "0", "/0"):
        # Without a db number the queue goes to db 0; use a client of that db to clean up.
        cleanup = redis.Redis(host=parts["hostname"], port=parts["port"] or 6379, password=parts["password"])
    else:
        cleanup = None
    url = f"redis://{parts['hostname']}:{parts['port'] or 6379}"
    if parts["password"]:
        url = f"redis://:{parts['password']}@{parts['hostname']}:{parts['port'] or 6379}"
    try:
        round_trip(build(url), queue_name)
    finally:
        if cleanup is not None:
            cleanup.delete(queue_name, f"_kombu.binding.{queue_name}")
            cleanup.close()


@pytest.mark.integration(reason="starts a redis-server of its own (tests/servers.py)")
@pytest.mark.parametrize("which", TRANSPORTS)
def test_worker_teardown_on_a_stopped_redis(which, build, tmp_path, queue_name):
    """Celery 5.7's teardown after a lost connection: collect(), then close(), which may only fail
    with a connection error, then the late ack of a task that ran through the outage."""
    server = PrivateRedis(str(tmp_path))
    server.start()
    try:
        celery = build(server.url, broker_transport=TRANSPORTS[which])
        conn = celery.connection_for_write()
        channel = conn.default_channel
        received = []
        conn.Producer(channel).publish({"n": 1}, routing_key=queue_name, declare=[Queue(queue_name)])
        channel.basic_consume(queue_name, False, received.append, "test-consumer")
        conn.drain_events(timeout=5)
        assert len(received) == 1
        # Leaves a BRPOP in flight, as a worker waiting for its next message has.
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=0.2)
        assert channel._in_poll
        server.stop()

        try:
            conn.collect(socket_timeout=1)
        except Exception:
            pass  # as Celery does: collect() on a dead connection may fail partway
        # Half-closed: marked closed, still attached to a transport that lost its Connection.
        assert channel.closed and channel.connection is not None and channel.connection.client is None
        # Where the channel's close() got past dropping its pools but not to building new ones
        # (it depends on where the dead socket fails), the next ack must build a pool.
        channel._disconnect_pools()
        if which == "ours":
            ignore_errors(conn, conn.close)
            with pytest.raises(redis.exceptions.ConnectionError, match="broker connection was closed") as caught:
                received[0].ack()
            assert isinstance(caught.value, conn.connection_errors)
        else:
            with pytest.raises(AttributeError, match="hostname"):
                received[0].ack()
    finally:
        server.stop()
