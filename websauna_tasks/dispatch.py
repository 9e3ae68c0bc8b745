"""The send pipeline: every task message leaves through this module.

Every way of sending comes here: ``apply_async`` (with ``tm``, without it,
``tm=None``), ``delay``, ``task.defer``, ``defer()``, the shards of an
iteration and beat (all through ``apply_async``), Celery's own retries, the
outbox relay and its redelivery (:func:`publish` with ``strict=True``), a
dead letter's requeue (:func:`check_requeue`, :func:`requeue`), and the test client's
capture. :func:`send` runs the checks once, in this order, and stops at the
first that fails, before anything is claimed or written:

1. the arguments: JSON, size and nesting depth (``payload.py``);
2. the queue: declared, when queues are declared (``queues.py``; not for
   Celery's retries, which go back where they came from);
3. the delay: the countdown or ETA, read once (:func:`reliability.delay_of`,
   a naive ETA as Celery's worker reads it), shorter than the Redis
   visibility timeout (``reliability.py``);
4. the call: a transaction manager given where the task needs one, and the
   arguments fitting the task's signature (``typing``);
5. the unique name, claimed for the delay plus the pending window (``names.py``).

Arguments over ``websauna_tasks.payload_store_threshold_bytes`` (when set)
are then stored as a row, in ``tm``'s transaction or committed at once, and
the message carries only a reference (``claim_check.py``; step 1 refuses
them above ``payload_store_max_bytes`` instead of ``max_payload_bytes``).

The message then waits for the commit of ``tm`` (:func:`schedule`, a data
manager joined to the transaction) or is sent now (the task's
``send_now``). Either way it reaches the broker through the app's
*publisher* (:func:`publisher_of`): by default a :class:`BrokerPublisher`,
which writes an outbox row inside the transaction when the outbox is on and
otherwise publishes after the commit (``broker.py``); a test client puts a
:class:`CapturingPublisher` in its place (:func:`set_publisher`), so
production code never asks whether it is under test.

Why a data manager, not just an after-commit hook: savepoints.
``transaction`` does not undo hooks when a savepoint is rolled back, but it
rolls back every joined data manager, so the queue truncates itself to its
length at the savepoint. A failed commit gives the after-commit hook False
and nothing is sent. Exceptions raised in that hook would be logged by
``transaction`` and swallowed, so every failed message is logged here, at
ERROR, with enough detail to resend it by hand.
"""
from __future__ import annotations

import contextvars
import functools
import logging
import typing as t
import weakref

import celery
import transaction
from celery.utils import uuid
from transaction._transaction import Status
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

from . import broker, claim_check
from .broker import PendingMessage
from .names import NAME_HEADER, claim_name, release_name
from .observability import hooks
from .payload import check_payload, check_task_payload
from .queues import check_queue
from .reliability import check_delay, delay_of
from .request import get_current_request
from .state import find_state

if t.TYPE_CHECKING:
    from celery import Celery, Task
    from celery.result import AsyncResult

__all__ = [
    "PendingMessage", "Publisher", "BrokerPublisher", "CapturingPublisher", "MessageSink", "send", "schedule",
    "publish", "publisher_of", "set_publisher", "transaction_to_wait_for", "set_message_sink", "has_sink",
    "captured", "check_payload", "check_task_payload", "check_requeue", "requeue", "EagerTaskError", "outbox_of",
]

logger = logging.getLogger(__name__)

_QUEUE_KEY = "websauna_tasks.dispatch_queue"

#: The smallest payload that may be stored (claim_check.py): smaller ones never ask.
_STORE_FLOOR = claim_check.STORE_FLOOR

#: ``tm`` left out of ``apply_async``: an error for tasks that must wait for a commit.
MISSING: t.Any = object()

# Set by the eager-error tween for the duration of a web request: eager task
# failures are appended here so the tween can raise them after pyramid_tm has
# committed (raising inside the after-commit hook would be swallowed).
eager_errors: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar(
    "websauna_tasks_eager_errors", default=None
)


# -- the checks and the way out --------------------------------------------------------------

def send(task: Task, args: t.Any, kwargs: t.Any, options: dict[str, t.Any], *, tm: t.Any,
         task_id: str | None = None, producer: t.Any = None, unique_name: t.Any = None,
         raise_if_enqueued: bool = False, what: str | None = None,
         arguments: tuple[t.Any, t.Any] | None = None,
         check_call: t.Callable[[tuple, dict], None] | None = None) -> AsyncResult:
    """Check one message (the module's numbered order) and send it now or after ``tm`` commits.

    ``tm``: a transaction manager to wait for, None to send now, or
    :data:`MISSING` (``apply_async`` without ``tm`` on a task that needs
    one: a TypeError). ``what`` names the call in errors (default the task's
    name); ``arguments`` are the ``(args, kwargs)`` the caller passed when
    the message wraps them (``defer()``'s function arguments), checked
    instead of the message's. ``check_call(args, kwargs)`` checks the
    arguments against the task's signature when the message waits for a
    commit (sent now, Celery's own ``apply_async`` does it). Returns the
    message's result, or the pending holder's when ``unique_name`` is taken.
    """
    app = task.app
    what = what or task.name
    # Which check is running, for an observer told of a refusal (observability/hooks.py).
    check = "payload"
    try:
        # 1. arguments
        if arguments is None:
            size = check_task_payload(task, args, kwargs, options)
        else:
            size = check_payload(app, what, arguments[0], arguments[1])
        # One comparison for a small message; a large one asks the app (claim_check.py), which may refuse it.
        store = size > _STORE_FLOOR and claim_check.to_store(app, what, size)
        # 2. queue
        check = "queue"
        if "retries" not in options:
            check_queue(app, options.get("queue") or getattr(task, "queue", None))
        else:
            claim_check.forget_reference(options)
        # 3. delay
        check = "delay"
        delay = 0.0
        if options.get("countdown") is not None or options.get("eta") is not None:
            delay = delay_of(options, app=app)
            if publisher_of(app).waits_in_broker:
                check_delay(app, what, options, delay=delay)
        # 4. the call
        check = "tm"
        if tm is MISSING:
            raise TypeError(
                f"{task.name}.apply_async() needs the transaction manager to send after commit: "
                f"pass tm=request.tm (or tm=None to send immediately)"
            )
        check = "call"
        # Sent now through the broker, Celery's apply_async checks the call; a
        # capturing publisher (a test client) never reaches it, so check here.
        if check_call is not None and (tm is not None or not isinstance(publisher_of(app), BrokerPublisher)):
            check_call(tuple(args or ()), dict(kwargs or {}))
        # 5. the name
        check = "name"
        on_dropped = None
        if unique_name is not None:
            task_id = task_id or uuid()
            holder = claim_name(app, unique_name, task_id, delay, raise_if_enqueued)
            if holder is not None:
                return task.AsyncResult(holder)
            options["headers"] = {**(options.get("headers") or {}), NAME_HEADER: unique_name}
            on_dropped = functools.partial(release_name, app, unique_name, task_id)
        # The arguments stored, only a reference sent; not where nothing travels (eager runs, a test client).
        stored = store and not app.conf.task_always_eager and isinstance(publisher_of(app), BrokerPublisher)
        if stored:
            if tm is None and check_call is not None:
                # Celery's apply_async would check the empty arguments of the reference: check the real ones.
                check_call(tuple(args or ()), dict(kwargs or {}))
            check = "store"
            task_id = task_id or uuid()
            args, kwargs, on_dropped = _store_payload(task, task_id, args, kwargs, options, tm, delay, on_dropped)
    except Exception:
        if hooks.watching:
            _observe_refusal(app, task.name, check)
        raise
    observer = hooks.observer_of(app) if hooks.watching else None
    if observer is not None:
        # Before the message is held or sent, so what the observer adds (trace
        # headers) is in the outbox row and in the message alike.
        hooks.safely(observer.outgoing, task, options)
    if tm is None:
        try:
            if stored:
                result = broker.send_unchecked(task, task_id, producer, options)
            else:
                result = task.send_now(args, kwargs, task_id=task_id, producer=producer, **options)
        except BaseException:
            if on_dropped is not None:
                on_dropped()
            raise
        if observer is not None:
            hooks.observe_messages([PendingMessage(task, (), {}, options, result.id)], "now")
        return result
    task_id = task_id or uuid()
    # A producer given with tm (Celery's group passes one to each member)
    # is not kept: the message is published after the commit, through
    # the producer of that publishing round.
    # Copies, so that the caller's later changes do not travel; a list stays
    # a list, as Celery's argsrepr header shows the difference.
    args = list(args) if isinstance(args, list) else tuple(args or ())
    schedule(tm, PendingMessage(task, args, dict(kwargs or {}), options, task_id, on_dropped))
    return task.AsyncResult(task_id)


def _store_payload(task: Task, task_id: str, args: t.Any, kwargs: t.Any, options: dict[str, t.Any], tm: t.Any,
                   delay: float, on_dropped: t.Callable[[], None] | None) -> tuple[tuple, dict, t.Any]:
    """Write the arguments' row (claim_check.py): the message's empty arguments and what undoes a dropped send."""
    stored = claim_check.claim_check_of(task.app)
    try:
        stored.store(task, task_id, args, kwargs, options, tm, delay)  # type: ignore[union-attr]
    except BaseException:
        if on_dropped is not None:
            on_dropped()
        raise
    if tm is None:
        # Committed already: a publish that fails leaves a row nobody will read.
        on_dropped = functools.partial(_drop_stored, stored, task_id, on_dropped)
    return (), {}, on_dropped


def _drop_stored(stored: t.Any, task_id: str, then: t.Callable[[], None] | None) -> None:
    try:
        stored.delete(task_id)
    except Exception:
        logger.exception("websauna_tasks: could not delete the stored payload of unsent task %s", task_id)
    if then is not None:
        then()


def _observe_refusal(app: Celery, task_name: str, check: str) -> None:
    observer = hooks.observer_of(app)
    if observer is not None:
        hooks.safely(observer.refused, task_name, check)


def check_requeue(app: Celery, queue: str) -> None:
    """The checks a dead letter meets on its way back to ``queue`` (``deadletters.requeue_dead_letter``).

    It goes back as the bytes it came with (moved in one Redis step on a
    Redis broker, else published by :func:`requeue`), so of the numbered
    checks only the queue (2) applies here; its body meets the worker's
    intake (intake.py) again when it is taken.
    """
    check_queue(app, queue)


def requeue(app: Celery, envelope: t.Mapping[str, t.Any], queue: str) -> None:
    """A dead letter kept outside the broker goes back to ``queue``: the queue check, then the raw publish.

    As in :func:`check_requeue`, the body is not checked here: it travels as
    the bytes it came with and meets the worker's intake again.
    """
    check_requeue(app, queue)
    broker.republish(app, envelope, queue)


def send_now(task: Task, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]) -> AsyncResult:
    """``WebsaunaTask.send_now``: hand one message to the app's publisher at once, unchecked."""
    return publisher_of(task.app).send_now(task, args, kwargs, options)


def publish(messages: list[PendingMessage], strict: bool = False) -> None:
    """Hand messages whose transaction has committed (or outbox rows) to their apps' publishers.

    One transaction may hold tasks of several Celery apps (two Pyramid apps
    in one process): each app's messages go to its own publisher, and so to
    its own broker. ``strict``: raise on the first failure instead of
    logging it (the outbox relay, which must not mark the rows sent).
    """
    if not messages:
        return
    first = messages[0].task.app
    if all(message.task.app is first for message in messages):
        publisher_of(first).publish(messages, strict)
        return
    by_app: dict[int, list[PendingMessage]] = {}
    for message in messages:
        by_app.setdefault(id(message.task.app), []).append(message)
    for app_messages in by_app.values():
        publisher_of(app_messages[0].task.app).publish(app_messages, strict)


# -- publishers: where an app's messages go ---------------------------------------------------

class Publisher(t.Protocol):
    """Where the send pipeline hands an app's messages."""

    #: True when a delayed message waits in the broker, so its delay is
    #: checked against the Redis visibility timeout.
    waits_in_broker: bool

    def hold(self, tm: transaction.TransactionManager, message: PendingMessage) -> None:
        """``message`` joins the open transaction of ``tm``; it is published after the commit."""

    def publish(self, messages: list[PendingMessage], strict: bool = False) -> None:
        """Publish messages of one app whose transaction committed (or outbox rows, ``strict``)."""

    def send_now(self, task: Task, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]) -> AsyncResult:
        """Publish one message now; its errors reach the caller."""


def outbox_of(app: Celery) -> t.Any:
    """The outbox ``app``'s messages go through (outbox/ sets it in the app's state), or None when it is off."""
    state = find_state(app)
    return state.outbox if state is not None else None


class BrokerPublisher:
    """The default: the outbox when it is on, else the broker after the commit; eager apps run the task."""

    waits_in_broker = True

    def hold(self, tm: transaction.TransactionManager, message: PendingMessage) -> None:
        app = message.task.app
        outbox = outbox_of(app)
        if outbox is None or app.conf.task_always_eager:
            return
        # The row is written in this transaction, through its database
        # session: it commits, or is rolled back, with the request's writes.
        outbox.write(tm, message)
        message.outboxed = True

    def publish(self, messages: list[PendingMessage], strict: bool = False) -> None:
        app = messages[0].task.app
        outboxed = [message for message in messages if message.outboxed]
        if outboxed:
            _publish_outboxed(app, outboxed)
            messages = [message for message in messages if not message.outboxed]
            if not messages:
                return
        if app.conf.task_always_eager and not strict:
            _run_eagerly(messages)
            return
        broker.write(app, messages, strict)

    def send_now(self, task: Task, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]) -> AsyncResult:
        return celery.Task.apply_async(task, args, kwargs, **options)


class MessageSink(t.Protocol):
    def capture(self, message: PendingMessage) -> None:
        """Keep ``message`` instead of sending it."""


class CapturingPublisher:
    """Hands every message to ``sink`` (a test client) at the moment it would have reached the broker."""

    waits_in_broker = False

    def __init__(self, sink: MessageSink):
        self.sink = sink

    def hold(self, tm: transaction.TransactionManager, message: PendingMessage) -> None:
        pass

    def publish(self, messages: list[PendingMessage], strict: bool = False) -> None:
        for message in messages:
            self.sink.capture(message)

    def send_now(self, task: Task, args: t.Any, kwargs: t.Any, options: dict[str, t.Any]) -> AsyncResult:
        options = dict(options)
        task_id = options.pop("task_id", None) or uuid()
        options.pop("producer", None)
        self.sink.capture(PendingMessage(task, tuple(args or ()), dict(kwargs or {}), options, task_id))
        return task.AsyncResult(task_id)


_BROKER = BrokerPublisher()


class _Publishers:
    """Which publisher each app's messages go to: the app's own, else the default one."""

    def __init__(self) -> None:
        self.default: Publisher = _BROKER
        self.by_app: weakref.WeakKeyDictionary[Celery, Publisher] = weakref.WeakKeyDictionary()
        # Looked at for every message: a plain attribute is cheaper than the mapping's len().
        self.any_own = False


_publishers = _Publishers()


def publisher_of(app: Celery) -> Publisher:
    """The publisher ``app``'s messages go to."""
    if _publishers.any_own:
        own = _publishers.by_app.get(app)
        if own is not None:
            return own
    return _publishers.default


def set_publisher(publisher: Publisher | None, app: Celery | None = None) -> Publisher | None:
    """Send ``app``'s messages (every app's without one of its own, when None) to ``publisher``.

    ``None`` as the publisher removes ``app``'s own one, or puts the broker
    back as the default. Returns what was in place (for an app, None when it
    had none of its own), to be put back the same way.
    """
    if app is None:
        previous = _publishers.default
        _publishers.default = publisher if publisher is not None else _BROKER
        return previous
    previous = _publishers.by_app.get(app)
    if publisher is None:
        _publishers.by_app.pop(app, None)
    else:
        _publishers.by_app[app] = publisher
    _publishers.any_own = bool(_publishers.by_app)
    return previous


def set_message_sink(sink: MessageSink | None) -> MessageSink | None:
    """Divert every app's outgoing messages to ``sink`` (None: send them again); returns the previous sink.

    The default publisher becomes a :class:`CapturingPublisher` of ``sink``.
    """
    previous = set_publisher(CapturingPublisher(sink) if sink is not None else None)
    return previous.sink if isinstance(previous, CapturingPublisher) else None


def has_sink() -> bool:
    """True while every app's messages are diverted to a sink (:func:`set_message_sink`)."""
    return isinstance(_publishers.default, CapturingPublisher)


def captured(message: PendingMessage) -> bool:
    """Hand ``message`` to its app's sink if it has one; False when it must really be sent."""
    publisher = publisher_of(message.task.app)
    if not isinstance(publisher, CapturingPublisher):
        return False
    publisher.sink.capture(message)
    return True


# -- waiting for the commit -----------------------------------------------------------------

@implementer(ISavepointDataManager)
class DispatchQueue:
    """Messages for one transaction, published after it commits."""

    def __init__(self, tm: transaction.TransactionManager):
        self.transaction_manager = tm
        self.messages: list[PendingMessage] = []
        # transaction unjoins a data manager that joined after a savepoint
        # when that savepoint is rolled back; we must join again before the
        # next message so later savepoints still cover it.
        self.joined = False
        # Set once the after-commit hook has taken the messages.
        self.closed = False

    # -- IDataManager: nothing is written during the two phases ---------
    def abort(self, txn: t.Any) -> None:
        # Also how transaction rolls back a savepoint taken before this queue
        # joined; its savepoints are still there then, a real abort has cleared them.
        self._drop(0, "savepoint" if getattr(txn, "_savepoint2index", None) else "aborted")
        self.joined = False

    def tpc_begin(self, txn: t.Any) -> None:
        pass

    def commit(self, txn: t.Any) -> None:
        pass

    def tpc_vote(self, txn: t.Any) -> None:
        pass

    def tpc_finish(self, txn: t.Any) -> None:
        pass

    def tpc_abort(self, txn: t.Any) -> None:
        self._drop(0, "commit_failed")

    def _drop(self, keep: int, why: str) -> None:
        dropped, self.messages[keep:] = self.messages[keep:], []
        for message in dropped:
            message.dropped()
        hooks.observe_messages(dropped, why)

    def sortKey(self) -> str:
        return "~~websauna_tasks.dispatch"

    def savepoint(self) -> "_QueueSavepoint":
        return _QueueSavepoint(self, len(self.messages))

    # -- after commit -----------------------------------------------------
    def after_commit(self, status: bool) -> None:
        messages, self.messages = self.messages, []
        self.closed = True
        if not status:
            for message in messages:
                message.dropped()
            hooks.observe_messages(messages, "commit_failed")
            return
        if not messages:
            return
        hooks.observe_messages(messages, "committed")
        publish(messages)

def _publish_outboxed(app: Celery, messages: list[PendingMessage]) -> None:
    """The rows just committed: the outbox publishes them now, or leaves them to its relay."""
    outbox = outbox_of(app)
    try:
        outbox.after_commit([message.task_id for message in messages])
    except Exception:
        # The rows are committed: the relay will publish them.
        logger.exception("websauna_tasks: outbox fast path failed; %d message(s) left to the relay", len(messages))


class _QueueSavepoint:
    def __init__(self, queue: DispatchQueue, length: int):
        self.queue = queue
        self.length = length

    def rollback(self) -> None:
        self.queue._drop(self.length, "savepoint")


def schedule(tm: transaction.TransactionManager, message: PendingMessage) -> None:
    """Hold ``message`` until the current transaction of ``tm`` commits (unchecked: :func:`send` checks).

    Called from another after-commit hook of a transaction that has already
    committed, the condition is met: the message is sent at once rather than
    appended to a queue that was already published.
    """
    try:
        txn = tm.get()
    except transaction.interfaces.NoTransaction:
        raise transaction.interfaces.NoTransaction(
            f"cannot schedule {message.task.name} after commit: the transaction manager has no transaction "
            "(call it inside `with tm:` or a request handled by pyramid_tm, or pass tm=None to send now)"
        ) from None
    if txn.status == Status.COMMITTED:
        hooks.observe_messages([message], "committed")
        publish([message])
        return
    if txn.status not in (Status.ACTIVE, Status.DOOMED):
        raise transaction.interfaces.TransactionFailedError(
            f"cannot schedule {message.task.name}: the transaction's status is {txn.status!r}, "
            "so the message could never be sent"
        )
    try:
        queue = txn.data(_QUEUE_KEY)
    except KeyError:
        queue = DispatchQueue(tm)
        txn.addAfterCommitHook(queue.after_commit)
        txn.set_data(_QUEUE_KEY, queue)
    try:
        publisher_of(message.task.app).hold(tm, message)
    except BaseException:
        message.dropped()
        raise
    if not queue.joined:
        txn.join(queue)
        queue.joined = True
    queue.messages.append(message)


def _active(tm: t.Any) -> bool:
    # get() would begin a transaction on an implicit manager: look, don't touch.
    inner = getattr(tm, "manager", tm)
    txn = getattr(inner, "_txn", None)
    return txn is not None and txn.status in (Status.ACTIVE, Status.DOOMED)


def transaction_to_wait_for(transactional: bool | None, tm: t.Any = None) -> t.Any:
    """The transaction manager whose commit a message should wait for, or None to send now.

    ``transactional``: True requires an active transaction, False sends now,
    None waits when a transaction is active (djangae's rule inside
    ``atomic()``). Without ``tm``, the current request's ``tm`` (a task's
    request in a worker, pyramid_tm's in a view) and then the thread's
    ``transaction.manager`` are looked at.
    """
    if transactional is False:
        return None
    if tm is not None:
        candidates = [tm]
    else:
        request = get_current_request()
        candidates = [getattr(request, "tm", None), transaction.manager]
    for candidate in candidates:
        if candidate is not None and _active(candidate):
            return candidate
    if transactional:
        raise transaction.interfaces.NoTransaction(
            "_transactional=True: no transaction is active to wait for "
            "(pass the transaction manager, e.g. request.tm, call it inside `with tm:`, or leave it out)")
    return None


class EagerTaskError(Exception):
    """An eager task failed after the commit; ``__cause__`` is its exception.

    Raised by the eager tween in place of the task's own exception: that one
    may be retryable (a TransientError), and pyramid_retry would then replay a
    view whose transaction has already committed.
    """


def _run_eagerly(messages: list[PendingMessage]) -> None:
    for message in messages:
        try:
            message.task.send_now(message.args, message.kwargs, task_id=message.task_id, throw=True, **message.options)
        except Exception as exc:
            logger.exception("websauna_tasks: eager task failed after commit: %s", message.describe())
            errors = eager_errors.get()
            if errors is not None:
                error = EagerTaskError(f"eager task failed after commit: {message.describe()}: {exc!r}")
                error.__cause__ = exc
                errors.append(error)
