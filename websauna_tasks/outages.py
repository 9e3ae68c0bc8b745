"""Database outages: a transactional run that lost its database is sent again later.

When PostgreSQL restarts, fails over or refuses connections, every run in
flight fails with a connection error, and so does each pooled connection's
first use afterwards. Such a run committed nothing (its transaction was
aborted with the connection), so running it again is what at-least-once
asks for; running it again *at once* would fail the same way while the
server is down. :func:`retry_after_outage` therefore sends it again through
the broker with a growing countdown (Celery's ``Task.retry``, the same task
id), up to ``websauna_tasks.db_outage_retries`` times.

SQLAlchemy invalidates the whole pool on the first disconnect it sees, so a
worker needs no restart: the retried runs open fresh connections.

A disconnect *during COMMIT* leaves the outcome unknown: the server may have
committed. The retry then runs the body a second time; ``idempotent=True``
makes that second run a no-op (docs/RELIABILITY.md).
"""
from __future__ import annotations

import logging
import random
import typing as t

import sqlalchemy as sa

from .queues import retry_with_limit
from .reliability import visibility_timeout
from .settings import DB_OUTAGE_BACKOFF_MAX_KEY as BACKOFF_MAX_KEY  # noqa: F401
from .settings import DB_OUTAGE_RETRIES_KEY as RETRIES_KEY  # noqa: F401
from .settings import DEFAULT_DB_OUTAGE_BACKOFF_MAX_SECONDS as DEFAULT_BACKOFF_MAX_SECONDS  # noqa: F401
from .settings import DEFAULT_DB_OUTAGE_RETRIES as DEFAULT_RETRIES  # noqa: F401
from .settings import TaskSettings, parse_settings
from .state import app_state, find_state

if t.TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

# Settings (declared and parsed in settings.py, imported above under their old names): RETRIES_KEY,
# times a run is sent again after a database outage (10; 0 turns it off); BACKOFF_MAX_KEY, longest
# countdown between two of those runs, in seconds (60).
BACKOFF_BASE_SECONDS = 1.0

# PostgreSQL SQLSTATEs that mean "this server cannot serve you now", not "your
# query is wrong": connection exceptions (class 08), the server shutting
# down or starting (57P01-57P03), too many connections (53300).
_UNAVAILABLE_PREFIXES = ("08", "57P01", "57P02", "57P03", "53300")


class OutagePolicy(t.NamedTuple):
    retries: int
    backoff_max: float

    def countdown(self, retries_so_far: int, limit: float | None = None) -> float:
        """1, 2, 4... seconds (the upper half of each randomised, so workers do not return in step)."""
        ceiling = min(self.backoff_max, BACKOFF_BASE_SECONDS * 2 ** retries_so_far)
        if limit is not None:
            ceiling = min(ceiling, limit)
        return random.uniform(ceiling / 2, ceiling)


def configure_outages(settings: TaskSettings | t.Mapping[str, t.Any], app: Celery) -> OutagePolicy:
    """Keep the outage policy on ``app`` (called by includeme with the parsed settings; a mapping is parsed)."""
    if not isinstance(settings, TaskSettings):
        settings = parse_settings(settings)
    policy = OutagePolicy(settings.db_outage_retries, settings.db_outage_backoff_max_seconds)
    app_state(app).outage_policy = policy
    return policy


def outage_policy(app: Celery) -> OutagePolicy | None:
    """``app``'s policy; None for a Celery app that ``includeme`` did not build."""
    state = find_state(app)
    return state.outage_policy if state is not None else None


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) says the database connection is gone or refused."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, sa.exc.DBAPIError):
            if error.connection_invalidated:
                return True
            if isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
                code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
                # No SQLSTATE: the client library itself lost or could not open
                # the connection (refused, reset, closed), no server answered.
                if code is None or str(code).startswith(_UNAVAILABLE_PREFIXES):
                    return True
        error = error.__cause__ or error.__context__
    return False


def retry_after_outage(task: Task, exc: Exception) -> None:
    """Raise Celery's Retry for a worker run that failed on a database outage; return otherwise.

    Eager runs and direct calls are left alone: there is no broker to wait
    in, and their caller sees the error.
    """
    policy = outage_policy(task.app)
    request = task.request
    if policy is None or not policy.retries or request.called_directly or request.is_eager:
        return
    if not database_unavailable(exc):
        return
    retries = request.retries or 0
    if retries >= policy.retries:
        logger.error("%s[%s]: the database is still unavailable after %d retries; giving up (%s)",
                     task.name, request.id, retries, exc)
        return
    timeout = visibility_timeout(task.app)
    # Half the Redis visibility timeout at most: a countdown at or past it is refused (reliability.py).
    countdown = policy.countdown(retries, None if timeout is None else timeout / 2)
    logger.warning("%s[%s]: database unavailable (%s: %s); sent again in %.1fs (retry %d of %d)",
                   task.name, request.id, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                   countdown, retries + 1, policy.retries)
    retry_with_limit(task, exc, countdown, retries + 1)
