"""``TaskFinished``: the Pyramid event notified after every task run.

Websauna notified one after each run so that applications could clean up
per-run state, count runs or store outcomes without wiring Celery signals
(which know nothing of the Pyramid request). Subscribe the Pyramid way::

    config.add_subscriber(on_task_finished, TaskFinished)

The event is notified once per run of a ``WebsaunaTask`` subclass: in a
worker, in eager mode and when the task is called directly. It comes after
the body's transaction has committed or aborted and before the run's request
is closed, so ``event.request`` (its registry, ``dbsession`` and ``tm``) is
still usable; database work in a subscriber needs its own
``with event.request.tm:``. A run that never started (a declared queue's slot
was not free, so the message went back) notifies nothing.

A subscriber's exception is logged and does not change the run's outcome:
by then a transactional body has committed, and reporting a committed run
as failed would have it run again.
"""
from __future__ import annotations

import logging
import typing as t

from celery import states
from celery.exceptions import Ignore, Reject, Retry
from pyramid.registry import Registry
from zope.interface import implementedBy

if t.TYPE_CHECKING:
    from celery import Task
    from pyramid.request import Request

__all__ = ["TaskFinished", "notify_task_finished", "run_state"]

logger = logging.getLogger(__name__)


class TaskFinished:
    """One task run has ended.

    ``state`` is how this run ended, as Celery names it: ``"SUCCESS"``,
    ``"FAILURE"`` (``exception`` says why), ``"RETRY"`` (the task will run
    again: ``self.retry()``, an autoretry, a conflict or a database outage),
    ``"IGNORED"`` or ``"REJECTED"``.
    """

    __slots__ = ("request", "task", "task_id", "state", "result", "exception")

    def __init__(self, request: Request, task: Task, task_id: str | None, state: str,
                 result: t.Any = None, exception: BaseException | None = None):
        self.request = request
        self.task = task
        #: None when the task was called directly (no message, no id).
        self.task_id = task_id
        self.state = state
        #: What the body returned (SUCCESS only).
        self.result = result
        self.exception = exception

    def __repr__(self) -> str:
        return f"<TaskFinished {self.task.name}[{self.task_id}] {self.state}>"


#: What ``providedBy`` gives a TaskFinished: the key of its subscribers' lookup.
_EVENT_SPEC = implementedBy(TaskFinished)


def run_state(exc: BaseException | None) -> str:
    """The Celery state name of a run that raised ``exc`` (None: returned)."""
    if exc is None:
        return states.SUCCESS
    if isinstance(exc, Retry):
        return states.RETRY
    if isinstance(exc, Ignore):
        return states.IGNORED
    if isinstance(exc, Reject):
        return states.REJECTED
    return states.FAILURE


def _may_have_subscribers(registry: t.Any) -> bool:
    """False when Pyramid's own ``notify`` would call nobody for a TaskFinished: no event need be built.

    Every run asks; the answer is the registry's cached subscription lookup
    (zope.interface drops its cache on every registration), so a subscriber
    added after the worker started is still notified. A registry whose
    ``notify`` is not Pyramid's (a test's recorder) is always notified.
    """
    adapters = getattr(registry, "adapters", None)
    if adapters is None or getattr(type(registry), "notify", None) is not Registry.notify \
            or "notify" in getattr(registry, "__dict__", ()):
        return True
    return bool(adapters.subscriptions((_EVENT_SPEC,), None))


def notify_task_finished(task: Task, request: Request, result: t.Any = None,
                         exc: BaseException | None = None) -> None:
    """Notify :class:`TaskFinished` on the run's registry; subscribers' errors are logged, not raised."""
    registry = request.registry
    notify = getattr(registry, "notify", None)
    if notify is None or not _may_have_subscribers(registry):
        return
    context = task.request
    task_id = None if context is None or context.called_directly else context.id
    event = TaskFinished(request, task, task_id, run_state(exc), result if exc is None else None, exc)
    try:
        notify(event)
    except Exception:
        logger.exception("%s[%s]: a TaskFinished subscriber failed (the run's outcome stands)", task.name, task_id)
