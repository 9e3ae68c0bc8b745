"""Writing task messages to the broker: the plain publish of the send pipeline.

:mod:`websauna_tasks.dispatch` decides what is sent and when; this module
only writes. One producer for a round of messages. Where kombu can batch
(Redis), each chunk of :data:`CHUNK_SIZE` messages goes out in one
pipeline, one round trip, written by kombu's own transport code; elsewhere
(RabbitMQ) kombu publishes message by message as usual. Messages whose
options are plain are built by :class:`_PlainSender` (Celery's send_task
with the per-app work done once per round instead of once per message); the
others go through the task's ``send_now`` (Celery's full ``apply_async``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import typing as t
import weakref
from dataclasses import dataclass, field

import celery
import celery.app.base
import celery.app.task
from celery import signals
from celery.utils.collections import lpmerge
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from kombu import Queue
from kombu import serialization as kombu_serialization
from kombu.common import Broadcast
from kombu.utils import json as kombu_json

from .payload import plain_json

if t.TYPE_CHECKING:
    from celery import Celery, Task


logger = logging.getLogger(__name__)


@dataclass
class PendingMessage:
    """One task message on its way out: built by the send pipeline (dispatch.py), written here."""

    task: Task
    args: tuple | list
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


def write(app: Celery, messages: list[PendingMessage], strict: bool = False) -> None:
    """Publish ``messages`` of ``app``, in order.

    After a commit (``strict`` False) nobody can be told of a failure: a
    message that fails is logged with its details and dropped, and the rest
    are still sent. The outbox relay (``strict`` True) needs the opposite:
    all of them go in one round and any failure raises, so that none of its
    rows is marked sent.
    """
    if strict:
        with app.producer_or_acquire() as producer:
            sender = _PlainSender.for_producer(app, producer)
            with batch(producer, len(messages)):
                for message in messages:
                    _send(producer, sender, message, batched=len(messages) > 1)
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


#: The header of a message whose arguments are stored as a row
#: (claim_check.py, which knows it as PAYLOAD_HEADER): the writer must
#: recognise such a message without reaching up to the claim check.
STORED_ARGUMENTS_HEADER = "websauna_tasks_payload"


def _send(producer: t.Any, sender: _PlainSender | None, message: PendingMessage, batched: bool) -> None:
    if sender is not None and sender.send(producer, message, batched=batched):
        return
    task = message.task
    headers = message.options.get("headers")
    if isinstance(headers, dict) and STORED_ARGUMENTS_HEADER in headers:
        # Its arguments are in the database and the message's are empty:
        # Celery's apply_async would refuse them against the signature.
        send_unchecked(task, message.task_id, producer, message.options)
        return
    # A task of another base (an outbox row of a plain Celery task) has no send_now.
    send_now = getattr(task, "send_now", None) or task.apply_async
    send_now(message.args, message.kwargs, task_id=message.task_id, producer=producer, **message.options)


def send_unchecked(task: Task, task_id: str, producer: t.Any, options: dict[str, t.Any]) -> t.Any:
    """Publish a message with empty arguments: Celery's ``apply_async`` without its signature check.

    A stored payload's message (claim_check.py) carries no arguments; the
    send pipeline has checked the real ones. The rest is what
    ``apply_async`` does before its ``send_task``: the task's execution
    options, its ``ignore_result`` and priority, its shadow name.
    """
    options = {**task._get_exec_options(), **options}
    options.setdefault("ignore_result", task.ignore_result)
    if task.priority:
        options.setdefault("priority", task.priority)
    shadow = options.pop("shadow", None) or task.shadow_name((), {}, options)
    return task.app.send_task(task.name, (), {}, task_id=task_id, producer=producer, result_cls=task.AsyncResult,
                              shadow=shadow, task_type=task, **options)


#: Messages sent in one broker round trip when the transport can batch;
#: bounds the memory a huge transaction holds in one Redis pipeline.
CHUNK_SIZE = 1000


def _publish_chunk(producer: t.Any, sender: _PlainSender | None, chunk: list[PendingMessage]) -> None:
    buffered: list[PendingMessage] = []
    try:
        with batch(producer, len(chunk)):
            for message in chunk:
                try:
                    _send(producer, sender, message, batched=len(chunk) > 1)
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


def batch(producer: t.Any, size: int) -> t.ContextManager[t.Any]:
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
    them). Without task routes, the options, route and queue of a task's
    messages that carry no options of their own (headers aside) are worked
    out once a round; a body of plain values is written as JSON here, with
    the text kombu's JSON would write. It is only used when nothing can
    observe the difference: batching transport, task protocol 2, no
    task-sent events, no publish signal receivers, nothing wrapping or
    replacing ``apply_async``/``send_task``, and the task does not override
    ``send_now``.
    """

    def __init__(self, app: Celery, defaults: _AppDefaults):
        self.defaults = defaults
        self.amqp = amqp = app.amqp
        self.router = amqp.router
        self.backend = app.backend
        self.reply_to = app.thread_oid
        self.parent = app.current_worker_task
        self.inherit_priority = bool(self.parent) and app.conf.task_inherit_parent_priority
        self.declared: set[str] = set()
        # What as_task_v2 and the router would look up for every message: a
        # setting read through Celery's ConfigurationView costs about 3 us,
        # more than building the rest of the message.
        self.maxlevels = app.conf.task_repr_maxlevels
        self.argsrepr_maxsize = amqp.argsrepr_maxsize
        self.kwargsrepr_maxsize = amqp.kwargsrepr_maxsize
        self.origin = _origin()
        # The router's answer with no task_routes: the message's own queue, else the default one.
        self.default_destination = (
            None if self.router.routes else self.router.expand_destination(app.conf.task_default_queue))
        # kombu's JSON writes plain values exactly as the json module's C
        # encoder does, through a serializer registry and a new encoder per
        # call (twice the time): encode those here while "json" is kombu's own.
        codec = getattr(kombu_serialization.registry, "_encoders", {}).get("json")
        self.json_codec = codec if codec is not None and codec.encoder is kombu_json.dumps else None
        #: _plan of each task's messages without options of their own, for this round.
        self.plans: dict[t.Any, tuple | None] = {}

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
        own = message.options
        args, kwargs = message.args, message.kwargs
        if self.default_destination is not None and (not own or (len(own) == 1 and "headers" in own)):
            # Without routes, a message with no options of its own (but
            # headers, which no step below reads) goes where every such
            # message of its task goes: plan it once a round.
            try:
                plan = self.plans[task]
            except KeyError:
                plan = self.plans[task] = self._plan(task, {}, (), {})
        else:
            plan = self._plan(task, own, args, kwargs)
        if plan is None:
            return False
        options, queue, shadow, extra_headers, ignore_result, add_to_parent, retry, policy = plan
        shadow = shadow or task.shadow_name(args, kwargs, own)

        root_id = parent_id = None
        priority = options.get("priority")
        parent = self.parent
        if parent:
            root_id = parent.request.root_id or parent.request.id
            parent_id = parent.request.id
            if self.inherit_priority and "priority" not in options:
                priority = parent.request.delivery_info.get("priority")

        headers, properties, body, _sent_event = self.amqp.create_task_message(
            message.task_id, task.name, args, kwargs,
            reply_to=self.reply_to, time_limit=options.get("time_limit"),
            soft_time_limit=options.get("soft_time_limit"),
            root_id=root_id, parent_id=parent_id, shadow=shadow, ignore_result=ignore_result,
            argsrepr=_repr(args, self.argsrepr_maxsize, self.maxlevels),
            kwargsrepr=_repr(kwargs, self.kwargsrepr_maxsize, self.maxlevels), origin=self.origin,
        )
        if extra_headers is None:  # those of a message planned once a round; a routed one's are in its plan
            extra_headers = own.get("headers")
        if extra_headers:
            headers.update(extra_headers)

        if queue.name not in self.declared:
            # Celery declares the queue with every message; kombu remembers
            # declared entities per connection, so once per commit suffices,
            # and none when the connection has declared it already.
            if not _declared(producer, queue):
                producer.maybe_declare(queue, retry=retry, **policy)
            self.declared.add(queue.name)
        if not ignore_result:
            self.backend.on_task_call(producer, message.task_id)
        defaults = self.defaults
        serializer = options.get("serializer") or defaults.serializer
        content_type = content_encoding = None
        if serializer == "json" and self.json_codec is not None:
            text = plain_json(body)
            if text is not None:
                body, content_type, content_encoding = text, self.json_codec.content_type, \
                    self.json_codec.content_encoding
        # In a batch, publish only buffers and cannot meet a broker error
        # (the round trip is the flush): wrapping it in kombu's retry would
        # only cost time.
        producer.publish(
            body, exchange="", routing_key=queue.name, serializer=serializer,
            content_type=content_type, content_encoding=content_encoding,
            compression=options.get("compression") or defaults.compression,
            delivery_mode=options.get("delivery_mode") or queue.exchange.delivery_mode or defaults.delivery_mode,
            priority=priority, headers=headers,
            retry=retry and not batched, retry_policy=policy, **properties,
        )
        if parent and add_to_parent:
            result = task.AsyncResult(message.task_id)
            result.ignored = ignore_result
            parent.add_trail(result)
        return True

    def _plan(self, task: Task, own: dict, args: tuple, kwargs: dict) -> tuple | None:
        """Where and how ``task``'s message with options ``own`` goes; None when the fast path cannot send it.

        (routed options, queue, shadow, headers, ignore_result, add_to_parent, retry, retry policy)
        """
        if not self._plain_task(task):
            return None
        options = dict(task._get_exec_options())
        options.update(own)
        options.setdefault("ignore_result", task.ignore_result)
        if not _plain(options):
            return None
        shadow = options.pop("shadow", None)
        add_to_parent = options.pop("add_to_parent", True)
        ignore_result = options.pop("ignore_result")
        retry = options.pop("retry", None)
        retry_policy = options.pop("retry_policy", None)
        options = self._route(options, task, args, kwargs)
        queue = options.get("queue")
        if not self._direct(queue, options) or not _plain(options, routed=True):
            return None
        defaults = self.defaults
        retry = defaults.retry if retry is None else retry
        policy = dict(defaults.retry_policy, **retry_policy) if retry_policy else defaults.retry_policy
        return options, queue, shadow, options.get("headers"), ignore_result, add_to_parent, retry, policy

    def _route(self, options: dict, task: Task, args: tuple, kwargs: dict) -> dict:
        destination = self.default_destination
        if destination is None:
            return self.router.route(options, task.name, args, kwargs, task)
        # Router.route without routes, its default queue looked up once a round.
        options = self.router.expand_destination(options)
        if "queue" not in options:
            options = lpmerge(dict(destination), options)
        return options

    @staticmethod
    def _plain_task(task: Task) -> bool:
        cls = type(task)
        # WebsaunaTask keeps its own send_now as plain_send_now: a class (or
        # a test double) that replaces send_now wants every message to pass
        # through it, and so does a task of any other base.
        return (
            getattr(cls, "send_now", None) is getattr(cls, "plain_send_now", False)
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


def _declared(producer: t.Any, queue: Queue) -> bool:
    """True when kombu's ``maybe_declare`` of ``queue`` would return at once: its connection declared it.

    kombu finds that out only after binding a copy of the queue to the
    channel and wrapping the call in its retry: about 20 us, a tenth of a
    commit that sends one task. The test is kombu's own (``_maybe_declare``).
    """
    if not queue.can_cache_declaration:
        return False
    declared = getattr(producer.connection, "declared_entities", None)
    return declared is not None and hash(queue) in declared


_origins: dict[int, str] = {}


def _origin() -> str:
    """as_task_v2's ``origin`` header, ``anon_nodename()``: a name of this process and host, kept per process id."""
    pid = os.getpid()
    origin = _origins.get(pid)
    if origin is None:
        _origins.clear()  # a forked child: its parent's name is not its own
        origin = _origins[pid] = anon_nodename()
    return origin


#: Scalars whose saferepr is their repr (exact types: a subclass may repr otherwise).
_REPR_SCALARS = frozenset({int, float, bool, type(None)})


def _repr(value: t.Any, maxsize: int, maxlevels: int) -> str:
    """Celery's ``saferepr(value, maxsize, maxlevels=maxlevels)``, the ``argsrepr``/``kwargsrepr`` headers.

    saferepr walks a token stream (about 3 us for ``(1,)``); for a flat
    tuple, list or dict of numbers and plain strings, well within
    ``maxsize``, it writes exactly what ``repr`` writes, which costs a tenth.
    Anything else goes to saferepr.
    """
    kind = type(value)
    if (kind is tuple or kind is list or kind is dict) and (not maxlevels or maxlevels >= 1) and len(value) < 64:
        items: t.Iterable[t.Any] = value
        if kind is dict:
            items = [*value, *value.values()]
        if all(type(item) in _REPR_SCALARS or _plain_text(item) for item in items):
            text = repr(value)
            if len(text) < maxsize:
                return text
    return saferepr(value, maxsize, maxlevels=maxlevels)


def _plain_text(item: t.Any) -> bool:
    # saferepr quotes a string as '...' escaping only the quote; repr writes
    # the same unless the string holds a quote, a backslash or a character
    # it escapes (not printable).
    return type(item) is str and "'" not in item and "\\" not in item and item.isprintable()


def _celerys_own(func: t.Any, module: t.Any) -> bool:
    # Tracing integrations (Sentry, ddtrace) and test doubles wrap or
    # replace these to see or change every message: then they must run.
    code = getattr(func, "__code__", None)
    return code is not None and not hasattr(func, "__wrapped__") and code.co_filename == module.__file__


# -- a message back on a queue, as it came (a dead letter's requeue) ---------------------------------------------

#: Envelope properties that travel as AMQP message properties; kombu's own bookkeeping
#: (delivery_tag, delivery_info, body_encoding) is the transport's to make again.
_REPUBLISHED_PROPERTIES = ("correlation_id", "reply_to", "priority", "delivery_mode", "expiration", "message_id",
                           "type", "app_id")


def republish(app: Celery, envelope: t.Mapping[str, t.Any], queue_name: str) -> None:
    """Publish the message of kombu's ``envelope`` (body, headers, content type, properties) to ``queue_name``.

    The body goes as its bytes, not re-serialized: a compressed body stays
    compressed, with its ``compression`` header. The queue is the app's own
    declaration of it when it has one (exchange, routing key, arguments), so
    that the declare on the way matches what workers declared; otherwise
    the one Celery would create for a queue of that name.
    """
    import base64

    properties = envelope.get("properties") or {}
    body = envelope.get("body")
    if isinstance(body, str) and properties.get("body_encoding") == "base64":
        body = base64.b64decode(body)
    elif isinstance(body, str):
        body = body.encode(envelope.get("content-encoding") or "utf-8")
    elif body is None:
        body = b""
    queues = app.amqp.queues
    queue = queues.get(queue_name) or queues.new_missing(queue_name)
    extra = {key: properties[key] for key in _REPUBLISHED_PROPERTIES if properties.get(key) is not None}
    headers = envelope.get("headers")
    with app.producer_or_acquire() as producer:
        producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key or queue_name,
                         declare=[queue], headers=dict(headers) if isinstance(headers, dict) else {},
                         content_type=envelope.get("content-type") or "application/json",
                         content_encoding=envelope.get("content-encoding") or "utf-8", retry=True, **extra)
