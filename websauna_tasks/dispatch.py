"""Holding task messages until the transaction commits, then sending them.

A :class:`DispatchQueue` is joined to the transaction as a data manager, not
just an after-commit hook, for one reason: savepoints. ``transaction`` does
not undo hooks when a savepoint is rolled back, but it does roll back every
joined data manager, so the queue truncates itself to its length at the
savepoint. Being a data manager that supports savepoints also keeps
``transaction.savepoint()`` working for the rest of the application.

Sending happens in the after-commit hook, which ``transaction`` calls with the
commit status; a failed commit (IntegrityError at flush, a failed vote) gives
False and nothing is sent. Exceptions raised in that hook would be logged by
``transaction`` and swallowed, so we log every failed message ourselves, at
ERROR, with enough detail to resend it by hand.
"""
from __future__ import annotations

import contextvars
import logging
import typing as t
from dataclasses import dataclass, field

import transaction
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

if t.TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

_QUEUE_KEY = "websauna_tasks.dispatch_queue"

# Set by the eager-error tween for the duration of a web request: eager task
# failures are appended here so the tween can raise them after pyramid_tm has
# committed (raising inside the after-commit hook would be swallowed).
eager_errors: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "websauna_tasks_eager_errors", default=None
)


@dataclass
class PendingMessage:
    task: "Task"
    args: tuple
    kwargs: dict
    options: dict = field(default_factory=dict)
    task_id: str = ""

    def describe(self) -> str:
        return f"task {self.task.name} id {self.task_id} args {self.args!r} kwargs {self.kwargs!r}"


@implementer(ISavepointDataManager)
class DispatchQueue:
    """Messages for one transaction, published after it commits."""

    def __init__(self, tm: transaction.TransactionManager):
        self.transaction_manager = tm
        self.messages: list[PendingMessage] = []

    # -- queueing -------------------------------------------------------
    def add(self, message: PendingMessage) -> None:
        self.messages.append(message)

    # -- IDataManager: nothing is written during the two phases ---------
    def abort(self, txn: t.Any) -> None:
        self.messages.clear()

    def tpc_begin(self, txn: t.Any) -> None:
        pass

    def commit(self, txn: t.Any) -> None:
        pass

    def tpc_vote(self, txn: t.Any) -> None:
        pass

    def tpc_finish(self, txn: t.Any) -> None:
        pass

    def tpc_abort(self, txn: t.Any) -> None:
        self.messages.clear()

    def sortKey(self) -> str:
        return "~~websauna_tasks.dispatch"

    def savepoint(self) -> "_QueueSavepoint":
        return _QueueSavepoint(self, len(self.messages))

    # -- after commit -----------------------------------------------------
    def after_commit(self, status: bool) -> None:
        messages, self.messages = self.messages, []
        if not status or not messages:
            return
        publish(messages)


class _QueueSavepoint:
    def __init__(self, queue: DispatchQueue, length: int):
        self.queue = queue
        self.length = length

    def rollback(self) -> None:
        del self.queue.messages[self.length:]


def queue_for(tm: transaction.TransactionManager) -> DispatchQueue:
    """The dispatch queue of the current transaction of ``tm``, joined on first use."""
    txn = tm.get()  # an explicit manager with no transaction raises NoTransaction
    try:
        return txn.data(_QUEUE_KEY)
    except KeyError:
        pass
    queue = DispatchQueue(tm)
    txn.join(queue)
    txn.addAfterCommitHook(queue.after_commit)
    txn.set_data(_QUEUE_KEY, queue)
    return queue


def publish(messages: list[PendingMessage]) -> None:
    """Send messages of one committed transaction in one publishing round."""
    app = messages[0].task.app
    if app.conf.task_always_eager:
        _run_eagerly(messages)
        return
    try:
        with app.producer_or_acquire() as producer:
            for index, message in enumerate(messages):
                try:
                    message.task.send_now(
                        message.args, message.kwargs, task_id=message.task_id, producer=producer, **message.options
                    )
                except Exception:
                    logger.exception("websauna_tasks: could not publish after commit: %s", message.describe())
    except Exception:
        # Acquiring the producer failed: none of these were sent.
        for message in messages:
            logger.exception("websauna_tasks: could not publish after commit: %s", message.describe())


def _run_eagerly(messages: list[PendingMessage]) -> None:
    for message in messages:
        try:
            message.task.send_now(message.args, message.kwargs, task_id=message.task_id, throw=True, **message.options)
        except Exception as exc:
            logger.exception("websauna_tasks: eager task failed after commit: %s", message.describe())
            errors = eager_errors.get()
            if errors is not None:
                errors.append(exc)
