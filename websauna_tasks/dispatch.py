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

import contextlib
import contextvars
import logging
import typing as t
import weakref
from dataclasses import dataclass, field

import celery
import celery.app.base
import celery.app.task
import transaction
from celery import signals
from kombu import Queue
from kombu.common import Broadcast
from transaction._transaction import Status
from transaction.interfaces import ISavepointDataManager
from zope.interface import implementer

from .payload import check_payload, check_task_payload  # noqa: F401  (re-exported for tasks.py, defer.py)
from .request import get_current_request

if t.TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

_QUEUE_KEY = "websauna_tasks.dispatch_queue"
#: Attribute of a Celery app whose messages go through the transactional
#: outbox (websauna_tasks.outbox sets it when ``websauna_tasks.outbox`` is on).
OUTBOX_ATTRIBUTE = "websauna_tasks_outbox"

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
    #: Called when the message will never be sent (abort, failed commit,
    #: savepoint rollback): a claimed task name is released there.
    on_dropped: t.Callable[[], None] | None = None
    #: True once the message is a row of the outbox table, in the transaction:
    #: after the commit it is published from there, not from memory.
    outboxed: bool = False

    def dropped(self) -> None:
        if self.on_dropped is not None:
            try:
                self.on_dropped()
            except Exception:
                logger.exception("websauna_tasks: cleanup of a dropped message failed: %s", self.describe())

    def describe(self) -> str:
        return f"task {self.task.name} id {self.task_id} args {self.args!r} kwargs {self.kwargs!r}"


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
        self._drop(0)
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
        self._drop(0)

    def _drop(self, keep: int) -> None:
        dropped, self.messages[keep:] = self.messages[keep:], []
        for message in dropped:
            message.dropped()

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
            return
        if not messages:
            return
        outboxed = [message for message in messages if message.outboxed]
        if outboxed:
            _publish_outboxed(outboxed)
            messages = [message for message in messages if not message.outboxed]
        if messages:
            publish(messages)


def _publish_outboxed(messages: list[PendingMessage]) -> None:
    """The rows just committed: the outbox publishes them now, or leaves them to its relay."""
    by_app: dict[int, list[PendingMessage]] = {}
    for message in messages:
        by_app.setdefault(id(message.task.app), []).append(message)
    for app_messages in by_app.values():
        outbox = getattr(app_messages[0].task.app, OUTBOX_ATTRIBUTE, None)
        try:
            outbox.after_commit([message.task_id for message in app_messages])
        except Exception:
            # The rows are committed: the relay will publish them.
            logger.exception("websauna_tasks: outbox fast path failed; %d message(s) left to the relay",
                             len(app_messages))


class _QueueSavepoint:
    def __init__(self, queue: DispatchQueue, length: int):
        self.queue = queue
        self.length = length

    def rollback(self) -> None:
        self.queue._drop(self.length)


def schedule(tm: transaction.TransactionManager, message: PendingMessage) -> None:
    """Hold ``message`` until the current transaction of ``tm`` commits.

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
    outbox = getattr(message.task.app, OUTBOX_ATTRIBUTE, None)
    if outbox is not None and _sink is None and not message.task.app.conf.task_always_eager:
        # The row is written in this transaction, through its database
        # session: it commits, or is rolled back, with the request's writes.
        try:
            outbox.write(tm, message)
        except BaseException:
            message.dropped()
            raise
        message.outboxed = True
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


class MessageSink(t.Protocol):
    def capture(self, message: PendingMessage) -> None:
        """Keep ``message`` instead of sending it."""


# Set by websauna_tasks.testing's task client for the length of a test:
# every message that would reach the broker (after a commit, or sent now)
# goes there instead. One per process: tests run one at a time.
_sink: MessageSink | None = None


def set_message_sink(sink: MessageSink | None) -> MessageSink | None:
    """Divert all outgoing task messages to ``sink`` (None: send them again); returns the previous sink."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def has_sink() -> bool:
    return _sink is not None


def captured(message: PendingMessage) -> bool:
    """Hand ``message`` to the sink if one is set; False when it must really be sent."""
    sink = _sink
    if sink is None:
        return False
    sink.capture(message)
    return True


def publish(messages: list[PendingMessage]) -> None:
    """Send the messages of one committed transaction.

    One producer for all of them. Where kombu can batch (Redis), each chunk of
    :data:`CHUNK_SIZE` messages goes out in one pipeline, one round trip,
    written by kombu's own transport code; elsewhere (RabbitMQ) kombu
    publishes message by message as usual. Messages whose options are plain
    are built by :class:`_PlainSender` (Celery's send_task with the per-app
    work done once per commit instead of once per message); the others go
    through Celery's full ``apply_async``. A message that fails is logged
    with its details and the rest are still sent.

    One transaction may hold tasks of several Celery apps (two Pyramid apps
    in one process): each app's messages go to its own broker.
    """
    if _sink is not None:
        for message in messages:
            captured(message)
        return
    by_app: dict[int, list[PendingMessage]] = {}
    for message in messages:
        by_app.setdefault(id(message.task.app), []).append(message)
    for app_messages in by_app.values():
        _publish_for_app(app_messages[0].task.app, app_messages)


def _publish_for_app(app: Celery, messages: list[PendingMessage]) -> None:
    if app.conf.task_always_eager:
        _run_eagerly(messages)
        return
    try:
        with app.producer_or_acquire() as producer:
            sender = _PlainSender.for_producer(app, producer)
            for start in range(0, len(messages), CHUNK_SIZE):
                _publish_chunk(producer, sender, messages[start:start + CHUNK_SIZE])
    except Exception:
        # Acquiring the producer or reading the app's settings failed
        # (_publish_chunk logs its own errors): none of these were sent.
        for message in messages:
            logger.exception("websauna_tasks: could not publish after commit: %s", message.describe())
            message.dropped()


#: Messages sent in one broker round trip when the transport can batch;
#: bounds the memory a huge transaction holds in one Redis pipeline.
CHUNK_SIZE = 1000


def _publish_chunk(producer: t.Any, sender: _PlainSender | None, chunk: list[PendingMessage]) -> None:
    buffered: list[PendingMessage] = []
    try:
        with _batch(producer, len(chunk)):
            for message in chunk:
                try:
                    if sender is None or not sender.send(producer, message, batched=len(chunk) > 1):
                        message.task.send_now(message.args, message.kwargs, task_id=message.task_id,
                                              producer=producer, **message.options)
                    buffered.append(message)
                except Exception:
                    logger.exception("websauna_tasks: could not publish after commit: %s", message.describe())
                    message.dropped()
    except Exception:
        # The pipeline failed as a whole: Redis may have run part of it, so
        # each message is reported as possibly lost, not certainly lost.
        for message in buffered:
            logger.exception("websauna_tasks: broker round trip failed after commit, "
                             "this message may not have been published: %s", message.describe())


def _batch(producer: t.Any, size: int) -> t.ContextManager[t.Any]:
    # Producer.batch() is new in kombu 5.7; it publishes immediately on
    # transports that cannot batch, so it is safe to use everywhere. A lone
    # message skips it: setting up a pipeline costs more than it saves.
    batch = getattr(producer, "batch", None)
    if batch is None or size < 2:
        return contextlib.nullcontext()
    # kombu flushes on its own past max_size commands; we want one flush per
    # chunk, and a message may add a PEXPIRE per priority step to its LPUSH.
    return batch(max_size=size * 8)


# Options _PlainSender knows how to honour, when not None; any other option
# (countdown, eta, expires, link, exchange, routing_key, stamped_headers...)
# sends the message through Celery's full apply_async instead.
_PLAIN_OPTIONS = frozenset({
    "queue", "priority", "serializer", "compression", "delivery_mode", "time_limit", "soft_time_limit",
    "ignore_result", "shadow", "headers", "retry", "retry_policy", "add_to_parent",
})


class _PlainSender:
    """What ``Task.apply_async`` -> ``Celery.send_task`` -> ``send_task_message`` do for a plain message.

    Celery reads a dozen settings, the router and the current worker task for
    every message and declares the queue each time; sending a thousand
    messages after one commit spends most of its time there. This reads them
    once, builds each message with ``app.amqp.create_task_message`` and hands
    it to ``producer.publish``, so the bytes on the broker are the ones
    Celery would have written (tests/test_dispatch_transports.py compares
    them). It is only used when nothing can observe the difference: batching
    transport, task protocol 2, no task-sent events, no publish signal
    receivers, nothing wrapping or replacing ``apply_async``/``send_task``,
    and the task does not override ``send_now``.
    """

    def __init__(self, app: Celery, defaults: _AppDefaults):
        self.defaults = defaults
        self.amqp = app.amqp
        self.router = app.amqp.router
        self.backend = app.backend
        self.reply_to = app.thread_oid
        self.parent = app.current_worker_task
        self.inherit_priority = bool(self.parent) and app.conf.task_inherit_parent_priority
        self.declared: set[str] = set()

    @classmethod
    def for_producer(cls, app: Celery, producer: t.Any) -> _PlainSender | None:
        if not getattr(producer, "supports_batch_publish", False):
            return None
        defaults = _AppDefaults.of(app)
        if defaults.protocol != 2 or app.conf.task_send_sent_event:
            return None
        if any(signal.receivers for signal in
               (signals.before_task_publish, signals.after_task_publish, signals.task_sent)):
            return None
        if (not _celerys_own(celery.Task.apply_async, celery.app.task)
                or not _celerys_own(type(app).send_task, celery.app.base) or "send_task" in vars(app)):
            return None
        return cls(app, defaults)

    def send(self, producer: t.Any, message: PendingMessage, batched: bool) -> bool:
        """Publish ``message`` and return True, or return False having done nothing."""
        task = message.task
        if not self._plain_task(task):
            return False
        options = dict(task._get_exec_options())
        options.update(message.options)
        options.setdefault("ignore_result", task.ignore_result)
        if not _plain(options):
            return False
        args, kwargs = message.args, message.kwargs
        shadow = options.pop("shadow", None) or task.shadow_name(args, kwargs, message.options)
        add_to_parent = options.pop("add_to_parent", True)
        ignore_result = options.pop("ignore_result")
        retry = options.pop("retry", None)
        retry_policy = options.pop("retry_policy", None)
        options = self.router.route(options, task.name, args, kwargs, task)
        queue = options.get("queue")
        if not self._direct(queue, options) or not _plain(options, routed=True):
            return False

        root_id = parent_id = None
        parent = self.parent
        if parent:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
            if self.inherit_priority:
                options.setdefault("priority", parent.request.delivery_info.get("priority"))

        headers, properties, body, _sent_event = self.amqp.create_task_message(
            message.task_id, task.name, args, kwargs,
            reply_to=self.reply_to, time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"),
            root_id=root_id, parent_id=parent_id, shadow=shadow, ignore_result=ignore_result,
        )
        extra_headers = options.get("headers")
        if extra_headers:
            headers.update(extra_headers)

        defaults = self.defaults
        retry = defaults.retry if retry is None else retry
        policy = dict(defaults.retry_policy, **retry_policy) if retry_policy else defaults.retry_policy
        if queue.name not in self.declared:
            # Celery declares the queue with every message; kombu remembers
            # declared entities per connection, so once per commit suffices.
            producer.maybe_declare(queue, retry=retry, **policy)
            self.declared.add(queue.name)
        if not ignore_result:
            self.backend.on_task_call(producer, message.task_id)
        # In a batch, publish only buffers and cannot meet a broker error
        # (the round trip is the flush): wrapping it in kombu's retry would
        # only cost time.
        producer.publish(
            body, exchange="", routing_key=queue.name,
            serializer=options.get("serializer") or defaults.serializer,
            compression=options.get("compression") or defaults.compression,
            delivery_mode=options.get("delivery_mode") or queue.exchange.delivery_mode or defaults.delivery_mode,
            priority=options.get("priority"), headers=headers,
            retry=retry and not batched, retry_policy=policy, **properties,
        )
        if parent and add_to_parent:
            result = task.AsyncResult(message.task_id)
            result.ignored = ignore_result
            parent.add_trail(result)
        return True

    @staticmethod
    def _plain_task(task: Task) -> bool:
        send_now = getattr(type(task), "send_now", None)
        return (
            getattr(send_now, "__qualname__", None) == "WebsaunaTask.send_now"
            and getattr(send_now, "__module__", None) == "websauna_tasks.tasks"
            and not task.__v2_compat__
            and getattr(task, "_dump_pydantic_arguments", None) is None
            and not (task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit)
        )

    @staticmethod
    def _direct(queue: t.Any, options: dict) -> bool:
        # send_task_message turns a direct exchange without both an exchange
        # and a routing key into the anonymous exchange: the routing key is
        # the queue name, which is all the Redis transport needs.
        if not isinstance(queue, Queue) or isinstance(queue, Broadcast) or options.get("exchange_type"):
            return False
        if queue.exchange is None or queue.exchange.type != "direct":
            return False
        return not (options.get("exchange") and options.get("routing_key"))


@dataclass(frozen=True)
class _AppDefaults:
    """Publishing settings of an app, read on its first publish and kept.

    Celery's own ``send_task_message`` reads these once per app too (it is a
    cached closure), so a change of settings after the first publish has the
    same (lack of) effect on both paths; reading them per commit would cost
    more than a single message's publish is allowed to.
    """

    protocol: int
    serializer: str
    compression: str | None
    delivery_mode: t.Any
    retry: bool
    retry_policy: dict

    @classmethod
    def of(cls, app: Celery) -> _AppDefaults:
        defaults = _app_defaults.get(app)
        if defaults is None:
            conf = app.conf
            defaults = _app_defaults[app] = cls(
                conf.task_protocol, conf.task_serializer, conf.task_compression,
                conf.task_default_delivery_mode, conf.task_publish_retry, conf.task_publish_retry_policy,
            )
        return defaults


_app_defaults: weakref.WeakKeyDictionary[Celery, _AppDefaults] = weakref.WeakKeyDictionary()


def _plain(options: dict, routed: bool = False) -> bool:
    allowed = _PLAIN_OPTIONS | {"exchange", "routing_key", "immediate", "mandatory"} if routed else _PLAIN_OPTIONS
    return all(value is None or key in allowed for key, value in options.items())


def _celerys_own(func: t.Any, module: t.Any) -> bool:
    # Tracing integrations (Sentry, ddtrace) and test doubles wrap or
    # replace these to see or change every message: then they must run.
    code = getattr(func, "__code__", None)
    return code is not None and not hasattr(func, "__wrapped__") and code.co_filename == module.__file__


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
