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

from celery.utils.time import maybe_iso8601, maybe_make_aware

from .queues import REDIS_VISIBILITY_TIMEOUT
from .settings import REDIS_SCHEMES

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
    if conf.task_always_eager or not str(conf.broker_url or "").startswith(REDIS_SCHEMES):
        return None
    options = conf.broker_transport_options or {}
    return float(options.get("visibility_timeout", REDIS_VISIBILITY_TIMEOUT))


def read_eta(app: Celery | None, eta: t.Any) -> datetime.datetime | None:
    """An ``eta`` option as Celery's worker reads it: an aware datetime, or None when it is not one.

    The worker's request does ``maybe_make_aware(maybe_iso8601(eta),
    app.conf.timezone)`` (celery/worker/request.py); the same call here keeps
    the caller's idea of "when" the worker's, whatever Celery's rule for a
    naive value is (in Celery 5.x: read as UTC, then shown in the app's
    time zone). Every reading of an ETA (the delay checks, a name's claim,
    the test client's ``scheduled_at``, outbox redelivery) goes through this.
    """
    if isinstance(eta, str):
        try:
            eta = maybe_iso8601(eta)
        except ValueError:
            return None
    if not isinstance(eta, datetime.datetime):
        return None
    return maybe_make_aware(eta, app.conf.timezone if app is not None else None)


def delay_of(options: t.Mapping[str, t.Any], now: datetime.datetime | None = None,
             app: Celery | None = None) -> float:
    """Seconds until a message sent with these ``apply_async`` options is due (``countdown`` wins).

    A naive ``eta`` is read as ``app``'s worker reads it (:func:`read_eta`).
    """
    countdown = options.get("countdown")
    if countdown is not None:
        return float(countdown)
    eta = read_eta(app, options.get("eta"))
    if eta is None:
        return 0.0
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (eta - now).total_seconds())


def check_delay(app: Celery, what: str, options: t.Mapping[str, t.Any], delay: float | None = None) -> None:
    """Raise :class:`VisibilityTimeoutExceeded` when ``options`` delay a Redis message past its visibility timeout.

    ``delay``: the seconds already worked out by the caller (the send pipeline reads them once).
    """
    if options.get("countdown") is None and options.get("eta") is None:
        return
    timeout = visibility_timeout(app)
    if timeout is None:
        return
    if delay is None:
        delay = delay_of(options, app=app)
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
        if value is None and not (name.startswith("result") and backend.startswith(REDIS_SCHEMES)):
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
