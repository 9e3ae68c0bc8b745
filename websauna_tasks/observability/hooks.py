"""The one way the library tells an observer what happens: an app's :class:`Observer`, None when nobody watches.

The send pipeline (dispatch.py), the run path and its conflict retries (tasks.py), the outbox's
publishing, the worker's intake and the queue limiter each call one method
of the app's observer at the moment the thing happens. Metrics
(``metrics.py``) and tracing (``tracing.py``) are observers; an app with
both has a :class:`Observers` that hands every call to each.

Zero cost when nothing watches: the callers first read :data:`watching`, a
plain module attribute that stays False until some app in the process gets
an observer, and only then look the app's observer up. Neither
prometheus_client nor opentelemetry is imported by this module, nor by any
caller of it.

An observer must not raise: every hook is called where an exception would
change what the library does (a message not sent, a run reported failed).
:func:`safely` is how the callers keep that promise for observers that
break it anyway.
"""
from __future__ import annotations

import logging
import typing as t

from ..state import find_state

if t.TYPE_CHECKING:
    from celery import Celery, Task

    from ..broker import PendingMessage

__all__ = ["Observer", "Observers", "add_observer", "observer_of", "watching", "safely", "observe_messages"]

logger = logging.getLogger(__name__)

#: True once any app of this process has an observer: the hot paths read only this when it is False.
watching = False


class Observer:
    """Every hook, doing nothing: an observer overrides those it cares about."""

    def outgoing(self, task: Task, options: dict[str, t.Any]) -> None:
        """A message passed every check of the send pipeline; its ``options`` may still be changed (headers)."""

    def refused(self, task_name: str, check: str) -> None:
        """The send pipeline's ``check`` (payload, queue, delay, tm, call, name) refused a message."""

    def dispatched(self, messages: t.Sequence[PendingMessage], outcome: str) -> None:
        """``outcome``: "now" (tm=None), "committed" (handed on after the commit), or why dropped:
        "aborted", "savepoint" (rolled back), "commit_failed"."""

    def run(self, task: Task, body: t.Callable[[], t.Any]) -> t.Any:
        """Run ``body`` (one run of ``task``, its request open) and return what it returns, raising what it raises."""
        return body()

    def conflict_retried(self, task: Task, attempt: int) -> None:
        """A ``RetryableTransactionTask``'s transaction hit a transient conflict; ``attempt`` runs again."""

    def published(self, created_at: t.Sequence[float], now: float) -> None:
        """Outbox rows written at ``created_at`` were handed to the broker at ``now`` (time.time())."""

    def dead_lettered(self, kind: str) -> None:
        """The worker's intake kept a message in the dead letters, for ``kind``."""

    def queue_waited(self, queue: str, seconds: float, outcome: str) -> None:
        """A run waited ``seconds`` for its declared queue; ``outcome``: "ran", or "requeued"."""


class Observers(Observer):
    """Several observers of one app, called in order; runs nest, the first outermost."""

    def __init__(self, observers: t.Sequence[Observer]):
        self.observers = tuple(observers)

    def outgoing(self, task: Task, options: dict[str, t.Any]) -> None:
        for observer in self.observers:
            observer.outgoing(task, options)

    def refused(self, task_name: str, check: str) -> None:
        for observer in self.observers:
            observer.refused(task_name, check)

    def dispatched(self, messages: t.Sequence[PendingMessage], outcome: str) -> None:
        for observer in self.observers:
            observer.dispatched(messages, outcome)

    def run(self, task: Task, body: t.Callable[[], t.Any]) -> t.Any:
        for observer in reversed(self.observers):
            body = _bind(observer, task, body)
        return body()

    def conflict_retried(self, task: Task, attempt: int) -> None:
        for observer in self.observers:
            observer.conflict_retried(task, attempt)

    def published(self, created_at: t.Sequence[float], now: float) -> None:
        for observer in self.observers:
            observer.published(created_at, now)

    def dead_lettered(self, kind: str) -> None:
        for observer in self.observers:
            observer.dead_lettered(kind)

    def queue_waited(self, queue: str, seconds: float, outcome: str) -> None:
        for observer in self.observers:
            observer.queue_waited(queue, seconds, outcome)


def _bind(observer: Observer, task: Task, body: t.Callable[[], t.Any]) -> t.Callable[[], t.Any]:
    return lambda: observer.run(task, body)


def add_observer(app: Celery, observer: Observer) -> Observer:
    """Make ``observer`` watch ``app`` too (after any it has); returns what the app now carries."""
    global watching
    state = find_state(app)
    if state is None:
        raise ValueError(f"{app!r} was not built by config.include('websauna_tasks')")
    current = state.observer
    if current is None:
        combined: Observer = observer
    elif isinstance(current, Observers):
        combined = Observers((*current.observers, observer))
    else:
        combined = Observers((current, observer))
    state.observer = combined
    watching = True
    return combined


def observer_of(app: t.Any) -> Observer | None:
    """``app``'s observer, or None (also for a Celery app includeme did not build)."""
    if not watching:
        return None
    state = find_state(app)
    return state.observer if state is not None else None


def safely(call: t.Callable[..., None], *args: t.Any) -> None:
    """Call a hook whose failure must change nothing: logged, never raised."""
    try:
        call(*args)
    except Exception:
        logger.exception("websauna_tasks: an observer failed (%s); what it observed is unchanged",
                         getattr(call, "__qualname__", call))


def observe_messages(messages: t.Sequence[PendingMessage], outcome: str) -> None:
    """Tell each message's app (usually all one) that ``messages`` were dispatched with ``outcome``."""
    if not watching or not messages:
        return
    first = messages[0].task.app
    if all(message.task.app is first for message in messages):
        observer = observer_of(first)
        if observer is not None:
            safely(observer.dispatched, messages, outcome)
        return
    by_app: dict[int, list[PendingMessage]] = {}
    for message in messages:
        by_app.setdefault(id(message.task.app), []).append(message)
    for group in by_app.values():
        observer = observer_of(group[0].task.app)
        if observer is not None:
            safely(observer.dispatched, group, outcome)
