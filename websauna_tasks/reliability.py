"""Crash safety: the Redis visibility timeout against countdowns, ETAs and its own copies.

A Redis broker keeps every message a worker has taken but not yet
acknowledged in its ``unacked`` set; after ``visibility_timeout`` seconds
(``broker_transport_options``, default 3600) any worker puts it back in the
queue. A worker holds a countdown/ETA message unacknowledged until it is
due, so a delay longer than the timeout is delivered again, and again every
timeout, each copy running at the ETA (Celery #2481, #7009, kombu #337).
:func:`check_delay` refuses such a message in the caller;
:func:`check_transport_options` warns at start when the result backend's
timeout is not the broker's (Celery's Redis docs ask for the same value in
``broker_transport_options``, ``result_backend_transport_options`` and
``visibility_timeout``).

Why the task base classes are ``acks_late`` is in ``docs/RELIABILITY.md``.
"""
from __future__ import annotations

import datetime
import logging
import typing as t

from .queues import _REDIS_SCHEMES, REDIS_VISIBILITY_TIMEOUT

if t.TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

_SETTING = "broker_transport_options['visibility_timeout']"


class VisibilityTimeoutExceeded(ValueError):
    """A countdown or ETA at or past the Redis broker's visibility timeout: it would run more than once."""

    def __init__(self, what: str, delay: float, timeout: float):
        super().__init__(
            f"{what}: a countdown/eta of {delay:g}s is not shorter than the Redis broker's visibility_timeout "
            f"({timeout:g}s): Redis would deliver the message again every {timeout:g}s while it waits, and each "
            f"copy would run (Celery #2481/#7009). Raise {_SETTING} (and result_backend_transport_options, "
            f"visibility_timeout) above {delay:g}, or schedule it later by other means (beat, a row polled "
            "by a periodic task)")
        self.delay = delay
        self.timeout = timeout


def visibility_timeout(app: Celery) -> float | None:
    """The Redis broker's visibility timeout in seconds; None when it does not apply (not Redis, eager)."""
    conf = app.conf
    if conf.task_always_eager or not str(conf.broker_url or "").startswith(_REDIS_SCHEMES):
        return None
    options = conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", REDIS_VISIBILITY_TIMEOUT))


def delay_of(options: t.Mapping[str, t.Any], now: datetime.datetime | None = None) -> float:
    """Seconds until a message sent with these ``apply_async`` options is due (``countdown`` wins)."""
    countdown = options.get("countdown")
    if countdown is not None:
        return float(countdown)
    eta = options.get("eta")
    if eta is None:
        return 0.0
    if isinstance(eta, str):
        eta = datetime.datetime.fromisoformat(eta)
    if not isinstance(eta, datetime.datetime):
        return 0.0
    if eta.tzinfo is None:  # Celery reads a naive ETA as UTC
        eta = eta.replace(tzinfo=datetime.timezone.utc)
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (eta - now).total_seconds())


def check_delay(app: Celery, what: str, options: t.Mapping[str, t.Any]) -> None:
    """Raise :class:`VisibilityTimeoutExceeded` when ``options`` delay a Redis message past its visibility timeout."""
    if options.get("countdown") is None and options.get("eta") is None:
        return
    timeout = visibility_timeout(app)
    if timeout is None:
        return
    from .dispatch import has_sink

    if has_sink():
        # The test task client captures the message: it never waits in Redis.
        return
    delay = delay_of(options)
    if delay >= timeout:
        raise VisibilityTimeoutExceeded(what, delay, timeout)


def check_transport_options(app: Celery) -> list[str]:
    """At start: warn when the Redis timeouts Celery asks to align differ. Returns the warnings."""
    broker = visibility_timeout(app)
    if broker is None:
        return []
    conf = app.conf
    others = {
        "result_backend_transport_options['visibility_timeout']":
            (conf.result_backend_transport_options or {}).get("visibility_timeout"),
        "visibility_timeout": conf.get("visibility_timeout"),
    }
    backend = str(conf.result_backend or "")
    warnings = []
    for name, value in others.items():
        if value is None and not (name.startswith("result") and backend.startswith(_REDIS_SCHEMES)):
            continue
        # A Redis result backend left at its default uses the default timeout.
        value = REDIS_VISIBILITY_TIMEOUT if value is None else value
        try:
            differs = float(value) != broker
        except (TypeError, ValueError):
            differs = True
        if differs:
            message = (f"websauna_tasks: {name} is {value!r} but {_SETTING} is {broker:g}: "
                       "set the same value in both (Celery's Redis caveats)")
            logger.warning(message)
            warnings.append(message)
    return warnings
