"""Rolling deploys at the worker's intake: tasks this worker does not know yet, and arguments that do not fit.

During a deploy old and new workers take from the same queues (docs/deploying.md).
A message for a task added in the new code can reach an old worker: that is
not an error, so :class:`UnknownTasks` gives it back to the broker with a
delay (the existing :func:`~websauna_tasks.broker.republish`, with an ``eta``)
until a worker that knows it takes it, for up to
``websauna_tasks.unknown_task_grace_seconds``. The time a worker first saw it
travels in :data:`FIRST_SEEN_HEADER`, so the grace is measured across
workers and give-backs, and only then is the message a dead letter.

A message for an unknown task whose body cannot be decoded is a dead letter
(``undecodable``) at once: no release could read it either.

The same give-back, under the same grace, waits out a database that cannot
be read for a while: a message whose stored arguments (claim_check.py) the
intake could not load is given back and loaded again later
(:meth:`UnknownTasks.wait_for_store`); only after the grace is it a
``payload_unavailable`` dead letter.

A message whose arguments do not fit the task's signature would fail with a
``TypeError`` at every run; :func:`signature_problem` finds that before the
request is built, so it is a dead letter (``signature_mismatch``) at once.
"""
from __future__ import annotations

import datetime
import inspect
import logging
import math
import time
import typing as t

from . import broker
from .reliability import check_delay, visibility_timeout
from .settings import DEFAULT_UNKNOWN_TASK_RETRY_SECONDS

if t.TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

#: Unix time at which a worker first found the message's task unknown; kept on every give-back.
FIRST_SEEN_HEADER = "websauna_unknown_since"


def first_seen(headers: t.Mapping[str, t.Any], now: float) -> float:
    """When the grace of a message began: its header, or ``now`` when the header is absent or not believable.

    Anybody can write the header. A value that is not a finite number, or
    lies in the future, starts the grace now rather than extending it.
    """
    value = headers.get(FIRST_SEEN_HEADER)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return now
    try:
        value = float(value)  # an int of 400 digits is JSON too
    except OverflowError:
        return now
    if not math.isfinite(value) or value > now:
        return now
    return value


def _eta_timestamp(headers: t.Mapping[str, t.Any]) -> float | None:
    eta = headers.get("eta")
    if not isinstance(eta, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(eta)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, ValueError, OSError):
        return None


class UnknownTasks:
    """Gives messages for tasks this worker does not know back to the broker, until the grace is over.

    ``refuse(message, kind, reason)`` is the intake's way to the dead letters.
    ``timer`` and ``qos`` are the worker consumer's: a message due later is
    held unacknowledged on the timer, as Celery holds a countdown, so that
    old workers do not pass it back and forth without pause.
    """

    def __init__(self, app: Celery, grace: float, retry: float,
                 refuse: t.Callable[[t.Any, str, str], None]) -> None:
        self.app = app
        self.grace = grace
        timeout = visibility_timeout(app)
        if retry == DEFAULT_UNKNOWN_TASK_RETRY_SECONDS and timeout is not None and retry >= timeout:
            # The default must start on any broker: a short visibility timeout (set so that crashed runs
            # come back sooner) gets give-backs at half of it. A value set by hand is checked below instead.
            retry = timeout / 2
        self.retry = min(retry, grace) if grace else retry
        self.refuse = refuse
        if grace:
            # A give-back is a message held by the next worker until its eta:
            # Redis must not hand it out again meanwhile.
            check_delay(app, "websauna_tasks.unknown_task_retry_seconds", {"countdown": self.retry}, self.retry)

    def take(self, message: t.Any, name: str, consumer: t.Any, since: float | None = None) -> None:
        """Decide on ``message`` for the unknown task ``name``: hold it, give it back, or dead-letter it.

        ``since``: the start of the grace when this worker already held the
        message, so that holding never restarts it.
        """
        headers = message.headers
        unreadable = undecodable(message)
        if unreadable is not None:
            # No release reads it better than this one: giving it back for the whole grace would only
            # republish it a few hundred times before the dead letters.
            self.refuse(message, "undecodable", unreadable)
            return
        now = time.time()
        if since is None:
            since = first_seen(headers, now)
        waited = now - since
        if not self.grace or waited >= self.grace:
            self.refuse(message, "unknown_task", self._reason(name, waited))
            return
        due = _eta_timestamp(headers)
        if due is not None and due > now + 0.05:
            # At most one retry at a time, and never past the grace: a forged eta far ahead cannot park it.
            self._hold(message, name, consumer, since, min(due - now, self.retry, since + self.grace - now))
            return
        self._give_back(message, name, consumer, since, now)

    def _reason(self, name: str, waited: float) -> str:
        if not self.grace:
            return f"unknown task {name!r} (not registered in this worker)"
        return (f"unknown task {name!r} (not registered in this worker), still unknown after waiting {waited:.0f} s "
                f"(websauna_tasks.unknown_task_grace_seconds = {self.grace:g})")

    def wait_for_store(self, message: t.Any, consumer: t.Any, reason: str, again: t.Callable[[], t.Any]) -> None:
        """Give back a message whose stored arguments cannot be read now; a dead letter after the grace.

        ``again`` takes the message in once more (the whole intake, the load
        included) when a message not due yet has been held until it is.
        """
        headers = message.headers
        name = headers.get("task")
        label = f"task {name!r} whose stored arguments cannot be read"
        now = time.time()
        due = _eta_timestamp(headers)
        if due is not None and due > now + 0.05:
            # Not due yet (a countdown, or the last give-back's eta): wait here, then try the load again,
            # so that workers do not pass it back and forth while the database is down.
            self._wait(message, consumer, min(due - now, self.retry), again, label)
            return
        since = first_seen(headers, now)
        waited = now - since
        if waited >= self.grace:
            self.refuse(message, "payload_unavailable",
                        f"{reason}; still so after {waited:.0f} s (websauna_tasks.unknown_task_grace_seconds = "
                        f"{self.grace:g})"[:1000])
            return
        self._give_back(message, label, consumer, since, now, again)

    def _hold(self, message: t.Any, name: str, consumer: t.Any, since: float, seconds: float) -> None:
        self._wait(message, consumer, seconds, lambda: self.take(message, name, consumer, since), "an unknown task")

    def _wait(self, message: t.Any, consumer: t.Any, seconds: float, then: t.Callable[[], t.Any],
              label: str) -> None:
        qos = getattr(consumer, "qos", None)
        if qos is not None:
            # Held unacknowledged, it still counts against the prefetch: make room as Celery does for an eta.
            qos.increment_eventually()

        def again() -> None:
            if qos is not None:
                qos.decrement_eventually()
            try:
                then()
            except Exception as exc:
                logger.exception("websauna_tasks: deciding on held message %s failed", headers_id(message))
                self.refuse(message, "intake_error", f"deciding on {label} failed: {type(exc).__name__}: "
                                                     f"{exc}"[:1000])

        consumer.timer.call_after(max(seconds, 0.0), again, priority=6)

    def _give_back(self, message: t.Any, name: str, consumer: t.Any, since: float, now: float,
                   again: t.Callable[[], t.Any] | None = None) -> None:
        delay = min(self.retry, since + self.grace - now)
        eta = datetime.datetime.fromtimestamp(now + delay, datetime.timezone.utc)
        headers = {key: value for key, value in message.headers.items() if key != "compression"}
        headers["eta"] = eta.isoformat()
        headers[FIRST_SEEN_HEADER] = since
        delivery_info = getattr(message, "delivery_info", None) or {}
        queue = delivery_info.get("routing_key") or self.app.conf.task_default_queue
        envelope = {"body": message.body, "headers": headers, "content-type": message.content_type,
                    "content-encoding": message.content_encoding, "properties": dict(message.properties or {})}
        try:
            broker.republish(self.app, envelope, queue)
        except Exception:
            # Not acknowledged, so not lost: held and tried again after a retry.
            logger.exception("websauna_tasks: could not give message %s for %s back to the broker",
                             headers_id(message), name if again is not None else f"unknown task {name!r}")
            if again is None:
                self._hold(message, name, consumer, since, delay)
            else:
                self._wait(message, consumer, delay, again, name)
            return
        # Published first, acknowledged second: a crash in between leaves a copy, never nothing.
        try:
            message.ack()
        except Exception:
            # The copy is out; the broker hands the original out again and it is given back once more.
            logger.exception("websauna_tasks: could not acknowledge message %s after giving it back",
                             headers_id(message))
            return
        logger.info("websauna_tasks: message %s for %s given back to queue %s for %.1f s (waiting %.0f s of %g s)",
                    headers_id(message), name if again is not None else f"unknown task {name!r}", queue, delay,
                    now - since, self.grace)


def undecodable(message: t.Any) -> str | None:
    """Why ``message``'s body cannot be decoded (a body nested past the decoder's recursion, broken JSON), or None.

    kombu keeps a decoded body, so a message the intake has already read costs nothing here.
    """
    try:
        message.decode()
    except Exception as exc:  # RecursionError and the decoders' errors alike
        return f"the body cannot be decoded, so no release could run it: {type(exc).__name__}: {exc}"[:1000]
    return None


def headers_id(message: t.Any) -> t.Any:
    headers = getattr(message, "headers", None)
    return headers.get("id") if isinstance(headers, dict) else None


def signature_problem(task: Task, args: t.Sequence[t.Any], kwargs: t.Mapping[str, t.Any]) -> str | None:
    """Why ``args``/``kwargs`` cannot call ``task`` (both signatures named), or None.

    Celery's ``__header__`` (a function of the task's own signature, built
    once per task) makes the check a single call for a message that fits;
    tasks with ``typing = False`` opted out of argument checks and are
    passed as they are.
    """
    if not getattr(task, "typing", True):
        return None
    check = getattr(task, "__header__", None)
    if check is None:
        return None
    try:
        check(*args, **kwargs)
    except TypeError as exc:
        return (f"{exc}: the message carries {carried_signature(args, kwargs)}, "
                f"{task.name} takes {task_signature(task)}")
    return None


def carried_signature(args: t.Sequence[t.Any], kwargs: t.Mapping[str, t.Any]) -> str:
    """The call a message makes, by shape: ``(2 positional, y=..., z=...)``."""
    parts = [f"{len(args)} positional"] + [f"{key}=..." for key in kwargs]
    text = ", ".join(parts)
    return f"({text[:300]})"


def task_signature(task: Task) -> str:
    """The signature of ``task``'s ``run`` (without ``self`` for a bound task), or ``(?)``."""
    try:
        return str(inspect.signature(task.run))[:300]
    except (TypeError, ValueError):
        return "(?)"
