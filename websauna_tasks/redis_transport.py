"""kombu's Redis transport, made safe for a channel whose connection was already torn down.

Celery 5.7's worker, on losing the broker, calls ``connection.collect()`` and
then ``connection.close()``. On a dead Redis the first call fails partway: it
detaches the transport from its :class:`kombu.Connection` (or the channel from
the transport) while the consumer's channel is left half-closed. Whatever
touches that channel next (the ``close()``, or the late acknowledgement of a
task that ran through the outage) builds Redis connection parameters from the
missing connection and fails with ``AttributeError``. Celery treats that as a
bug rather than a broker error, logs "Unrecoverable error" and the worker exits
(with status 0, so a supervisor may not even restart it).

It also never lets a queue entry end the worker: one that is not JSON, or
not an envelope kombu can read, is delivered as a quarantine envelope that
carries its bytes (:class:`Message`), and the worker's intake moves it to the
dead letters.

For a torn-down channel, the same situation raises :class:`redis.exceptions.ConnectionError`, one of
the transport's ``connection_errors``: ``Connection.close()`` ignores it, a late
acknowledgement is logged as "Couldn't ack" (the message is delivered again
after the visibility timeout), and the worker reconnects as it does for any
other outage.

:func:`websauna_tasks.app.make_celery` selects :class:`Transport` for
``redis://`` broker URLs unless the settings name a ``broker_transport``.
"""
from __future__ import annotations

import base64
import typing as t
import uuid
from queue import Empty

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

#: Header of a quarantined entry: why it could not be read. The worker's
#: intake (intake.py) sends such a message to the dead letters.
QUARANTINE_HEADER = "websauna_tasks_unreadable"


def quarantine(raw: bytes | str | t.Any, queue: str, why: str) -> dict[str, t.Any]:
    """A well-formed envelope that carries an unreadable queue entry's bytes, unchanged, as its body."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogateescape")
    elif not isinstance(raw, bytes):
        raw = repr(raw).encode("utf-8", "backslashreplace")
    return {
        "body": base64.b64encode(raw).decode("ascii"),
        "content-type": "application/octet-stream",
        "content-encoding": "binary",
        "headers": {QUARANTINE_HEADER: why[:500]},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
        },
    }


class Message(virtual.Message):
    """A message that can always be built: an entry kombu cannot read becomes its quarantine envelope.

    kombu builds the message inside the transport's delivery, before any
    Celery handler: an entry that is JSON but not an envelope (``[1]``, an
    envelope without properties, a body that is not base64) raised there and
    ended the worker. As a quarantine envelope it is taken like any message,
    held unacknowledged like any message, and refused by the intake.
    """

    def __init__(self, payload: t.Any, channel: t.Any = None, **kwargs: t.Any) -> None:
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except Exception as exc:
            queue = ""
            if isinstance(payload, dict) and isinstance(payload.get("properties"), dict):
                info = payload["properties"].get("delivery_info")
                queue = info.get("routing_key") if isinstance(info, dict) else ""
            text = kombu_redis.dumps(payload) if _dumpable(payload) else repr(payload)
            why = f"not a kombu envelope ({type(exc).__name__}: {exc})"
            super().__init__(quarantine(text, queue if isinstance(queue, str) else "", why), channel=channel,
                             **kwargs)


def _dumpable(value: t.Any) -> bool:
    try:
        kombu_redis.dumps(value)
    except Exception:
        return False
    return True


class Channel(kombu_redis.Channel):
    """A Redis channel that reports a torn-down connection as a connection error and reads any entry."""

    Message = Message

    def _brpop_read(self, **options: t.Any) -> bool:
        # kombu's own reader parses the popped entry as JSON and lets the
        # error escape the event loop (the worker exits, the entry is gone).
        # This one reads the reply the same way, but an entry that is not
        # JSON is delivered as a quarantine envelope carrying its bytes.
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not reply:
                raise Empty()
            key, item = reply
            queue = bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            try:
                payload = loads(bytes_to_str(item))
            except ValueError as exc:  # also a UnicodeDecodeError
                payload = quarantine(item, queue, f"not JSON ({type(exc).__name__}: {str(exc)[:200]})")
            self.connection._deliver(payload, queue)
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu 5.7 and later
            if flush is not None:
                flush()

    def _connparams(self, asynchronous: bool = False) -> dict:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.exceptions.ConnectionError("this channel's broker connection was closed")
        return super()._connparams(asynchronous=asynchronous)


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`.

    ``driver_type`` and ``driver_name`` are inherited ("redis"): Celery and
    kombu choose Redis-specific behaviour by them.
    """

    Channel = Channel
