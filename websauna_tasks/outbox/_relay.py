"""The relay: a loop that publishes an app's unsent outbox rows, in every worker or on its own.

Woken by PostgreSQL NOTIFY when a writing transaction commits, and every
``outbox_poll_seconds`` anyway; between rounds it sends again what looks
lost (redelivery) and deletes sent rows past their retention.
"""
from __future__ import annotations

import logging
import threading
import time
import typing as t

from celery import bootsteps

from ..settings import get_task_settings
from ..state import app_state
from ..threads import BackgroundLoop
from ._outbox import Outbox, find_outbox, get_outbox
from ._table import CHANNEL

if t.TYPE_CHECKING:
    import sqlalchemy as sa
    from celery import Celery
    from pyramid.registry import Registry

# The outbox's one logger, whichever of its modules speaks.
logger = logging.getLogger(__package__)

#: Back-off after a failed relay round: base * 2**(failures - 1), capped.
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0


def configure_outbox(registry: Registry, app: Celery) -> Outbox | None:
    """Turn the outbox on for ``app`` when the settings ask for it (called by includeme)."""
    if not get_task_settings(registry).outbox:
        return None
    outbox = Outbox(app, registry)
    app_state(app).outbox = outbox
    if outbox.relay_in_worker:
        app.steps["worker"].add(OutboxRelayStep)
    return outbox


class _Listener:
    """A PostgreSQL connection LISTENing on :data:`CHANNEL` (psycopg 3 or psycopg2)."""

    def __init__(self, engine: sa.Engine):
        self.driver = engine.dialect.driver
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        if self.driver == "psycopg":
            import psycopg

            self.conn = psycopg.connect(*cargs, **cparams, autocommit=True)
        elif self.driver == "psycopg2":
            import psycopg2

            self.conn = psycopg2.connect(*cargs, **cparams)
            self.conn.autocommit = True
        else:
            raise RuntimeError(f"LISTEN needs psycopg or psycopg2, not {self.driver}")
        self.conn.cursor().execute(f"LISTEN {CHANNEL}")

    def wait(self, timeout: float) -> bool:
        """True when a notification arrived within ``timeout`` seconds."""
        if self.driver == "psycopg":
            got = False
            for _notify in self.conn.notifies(timeout=timeout, stop_after=1):
                got = True
            return got
        import select

        if not self.conn.notifies and select.select([self.conn], [], [], timeout) == ([], [], []):
            return False
        self.conn.poll()
        got = bool(self.conn.notifies)
        self.conn.notifies.clear()
        return got

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


class OutboxRelay(BackgroundLoop):
    """Publishes an app's unsent outbox rows until stopped.

    Woken by PostgreSQL NOTIFY when a writing transaction commits, and every
    ``outbox_poll_seconds`` anyway (the only wake-up on SQLite). Any error
    (broker down, database gone) rolls the round back and is retried after
    a capped exponential back-off, forever; the first failure of an outage
    is logged at WARNING, its end at INFO.
    """

    #: Longest single wait, so that stop() is noticed quickly.
    WAIT_SLICE = 0.5
    PRUNE_EVERY_SECONDS = 60.0

    thread_name = "websauna_tasks-outbox-relay"

    def __init__(self, outbox: Outbox, listen: bool = True):
        self.outbox = outbox
        self.listen = listen
        super().__init__()
        self.failures = 0
        self.published = 0
        #: Set after every round, successful or not (tests wait on it).
        self.rounds = 0

    def run(self) -> None:
        outbox = self.outbox
        listener: _Listener | None = None
        next_prune = 0.0
        next_redelivery = 0.0
        logger.info("websauna_tasks outbox relay started (app %s, batch %d, poll %.3gs)",
                    outbox.app_name, outbox.batch_size, outbox.poll_seconds)
        try:
            while not self.stopping.is_set():
                try:
                    engine = outbox.relay_engine()
                    if listener is None and self.listen and engine.dialect.name == "postgresql":
                        # LISTEN before draining: a commit in between still wakes us.
                        listener = _Listener(engine)
                    published = outbox.drain()
                    if published:
                        self.published += published
                        logger.debug("websauna_tasks outbox relay: published %d message(s)", published)
                    if outbox.redeliverer.enabled and time.monotonic() >= next_redelivery:
                        outbox.redeliverer.run()
                        next_redelivery = time.monotonic() + outbox.redeliverer.interval
                    if time.monotonic() >= next_prune:
                        outbox.prune()
                        next_prune = time.monotonic() + min(self.PRUNE_EVERY_SECONDS,
                                                            max(1.0, outbox.retention_seconds))
                except Exception as exc:
                    self.failures += 1
                    self.rounds += 1
                    if self.failures == 1:
                        logger.warning("websauna_tasks outbox relay: cannot publish (%s: %s); retrying with back-off, "
                                       "unsent messages stay in the outbox", type(exc).__name__, exc)
                    else:
                        logger.debug("websauna_tasks outbox relay: attempt %d failed: %r", self.failures, exc)
                    if listener is not None:
                        listener.close()
                        listener = None
                    self.stopping.wait(min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (self.failures - 1)))
                    continue
                self.rounds += 1
                if self.failures:
                    logger.info("websauna_tasks outbox relay: publishing again after %d failed attempt(s)",
                                self.failures)
                    self.failures = 0
                self._wait(listener)
        finally:
            if listener is not None:
                listener.close()
            logger.info("websauna_tasks outbox relay stopped (app %s)", outbox.app_name)

    def _wait(self, listener: _Listener | None) -> None:
        deadline = time.monotonic() + self.outbox.poll_seconds
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if listener is None:
                self.stopping.wait(min(left, self.WAIT_SLICE))
            elif listener.wait(min(left, self.WAIT_SLICE)):
                return


class OutboxRelayStep(bootsteps.StartStopStep):
    """Runs an :class:`OutboxRelay` thread in the worker's main process.

    A step of the *worker* blueprint, which only the main process runs:
    prefork children never start one (``worker_process_init`` would start a
    relay per child, each with its own LISTEN connection, for no gain, and a
    thread started before a fork does not survive in the child anyway). It
    starts after the pool, so no child is forked while the thread is first
    opening its connections, and stops on warm and cold shutdown.
    """

    requires = ("celery.worker.components:Pool",)
    label = "websauna_tasks outbox relay"

    def __init__(self, parent: t.Any, **kwargs: t.Any):
        super().__init__(parent, **kwargs)
        self.relay: OutboxRelay | None = None

    def include_if(self, parent: t.Any) -> bool:
        return find_outbox(parent.app) is not None

    def create(self, parent: t.Any) -> OutboxRelay:
        self.relay = OutboxRelay(get_outbox(parent.app))
        return self.relay

    def terminate(self, parent: t.Any) -> None:
        self.stop(parent)


def run_relay(app: Celery, stop: threading.Event | None = None) -> OutboxRelay:
    """Run a relay in the calling thread until ``stop`` is set (``ws-celery INI -- outbox-relay``)."""
    relay = OutboxRelay(get_outbox(app))
    if stop is not None:
        relay.stopping = stop
    relay.run()
    return relay
