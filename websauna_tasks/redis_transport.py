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

Here the same situation raises :class:`redis.exceptions.ConnectionError`, one of
the transport's ``connection_errors``: ``Connection.close()`` ignores it, a late
acknowledgement is logged as "Couldn't ack" (the message is delivered again
after the visibility timeout), and the worker reconnects as it does for any
other outage.

:func:`websauna_tasks.app.make_celery` selects :class:`Transport` for
``redis://`` broker URLs unless the settings name a ``broker_transport``.
"""
from __future__ import annotations

import redis
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel that reports a torn-down connection as a connection error."""

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
