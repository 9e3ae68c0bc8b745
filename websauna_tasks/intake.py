"""The worker's one gate: every message is checked before a task body can run.

A worker takes messages from a broker that anybody with its address can
write to, and Celery lets some malformed messages escape its own handlers:
a body that is not the ``[args, kwargs, embed]`` triple raises while the
request is built, and the consumer then logs "Unrecoverable error" and the
worker exits. The message goes back to the queue and stops the next worker
too. So every message passes :class:`IntakeStep`'s gate first, in the
consumer, before Celery's strategy builds a request:

1. a body kombu could not read (a broken envelope the Redis transport
   quarantined, see redis_transport.py) is refused;
2. a compressed body is inflated with a bound (:func:`install_bounded_decoders`):
   inflation stops at ``websauna_tasks.max_message_bytes`` rather than
   building a body of hundreds of MB;
3. the headers must name the task and id as strings;
4. the decoded body must be at most ``max_message_bytes`` long, have the
   shape of Celery's task protocol, and nest at most
   :data:`MAX_BODY_DEPTH` deep, so the pool's pickling only ever sees
   payloads of a bounded depth;
5. a deferred call (``websauna_tasks.deferred``) must name a function that
   ``defer()`` itself would send (:func:`~websauna_tasks.defer.resolve_deferred`);
6. the arguments must fit the task's signature (``signature_mismatch``);
7. a stored payload (``websauna_tasks_payload`` header, claim_check.py) is
   loaded into the message before 4's body and 6's signature checks see the
   arguments; a missing or unreadable one is a dead letter
   (``payload_missing``, ``malformed``), and one whose database cannot be
   read now is given back under 8's grace before it is
   (``payload_unavailable``);
8. a task this worker does not know is given back to the broker for
   ``websauna_tasks.unknown_task_grace_seconds`` before it is a dead letter:
   in a rolling deploy a newer worker knows it (rolling.py).

A message that passes but whose id was cancelled (cancel.py) is acknowledged
as revoked and does not run either.

A message that fails goes to the dead letters (deadletters/) with a reason,
and is acknowledged: it never runs and never comes back. Whatever else goes
wrong while Celery takes the message in is caught the same way, so nothing
arriving through the broker can end the worker process. Messages that pass
are handed to Celery unchanged. Celery's own refusals (unknown task, content
type not accepted, undecodable body) are copied to the dead letters by the
same step before Celery drops them.
"""
from __future__ import annotations

import bz2
import logging
import lzma
import math
import typing as t
import zlib
from collections import OrderedDict

import kombu.compression
from celery import bootsteps
from celery.backends.base import DisabledBackend
from celery.utils.time import maybe_iso8601

from .cancel import skip_cancelled
from .claim_check import PAYLOAD_HEADER, claim_check_of
from .deadletters import DeadLetters, dead_letter, get_dead_letters
from .defer import DEFERRED_TASK_NAME, DeferNotAllowed, allowed_prefixes, resolve_deferred
from .observability import hooks
from .payload import MAX_NESTING_DEPTH, nesting_exceeds
from .redis_transport import QUARANTINE_HEADER
from .rolling import UnknownTasks, signature_problem
from .settings import MAX_MESSAGE_KEY, get_task_settings
from .state import app_state, find_state

if t.TYPE_CHECKING:
    from celery import Celery
    from pyramid.registry import Registry

logger = logging.getLogger(__name__)

#: Deepest body accepted: the arguments' bound, plus the triple, the argument
#: list and the signatures a chain or a group embeds around them.
MAX_BODY_DEPTH = MAX_NESTING_DEPTH + 8


class MessageTooLarge(ValueError):
    """A message body (decoded, or inflated from its compression) is longer than the intake allows."""


class MessageRefused(Exception):
    """The result of a task whose message the worker's intake refused; the message is in the dead letters."""


class Intake:
    """One app's gate: its limits, where refused messages go, and the checks."""

    def __init__(self, app: Celery, registry: Registry, max_bytes: int):
        self.app = app
        self.registry = registry
        self.max_bytes = max_bytes
        # Verdicts on deferred paths: the same few functions arrive again and
        # again, and resolving one imports and inspects.
        self._deferred: OrderedDict[str, str | None] = OrderedDict()
        #: None: an unknown task goes to the dead letters at once, through Celery's own refusal.
        self.unknown: UnknownTasks | None = None
        self._tasks: t.Any = None

    @property
    def tasks(self) -> t.Any:
        """The app's task registry, read once: ``app.tasks`` takes two locks on every read (a cached_property)."""
        tasks = self._tasks
        if tasks is None:
            # The registry Celery keeps for the app's life: tasks registered later are added to this same dict.
            tasks = self._tasks = self.app.tasks
        return tasks

    @property
    def letters(self) -> DeadLetters:
        return get_dead_letters(self.app)

    def problem(self, message: t.Any) -> tuple[str, str] | None:
        """``(kind, reason)`` when ``message`` must not run, None when Celery may take it."""
        headers = message.headers
        if not isinstance(headers, dict):
            return None  # Celery's on_unknown_message copes, and the step copies it aside
        unreadable = headers.get(QUARANTINE_HEADER)
        if unreadable is not None:
            return "unreadable", f"the broker entry is not a kombu message: {unreadable}"
        body = message.body
        if self.max_bytes and body is not None and len(body) > self.max_bytes:
            return "too_large", (f"the body is {len(body)} bytes, more than {MAX_MESSAGE_KEY} = {self.max_bytes}")
        name = headers.get("task")
        if name is None:
            return None  # protocol 1, or no task at all: Celery's handlers decide
        if not isinstance(name, str):
            return "malformed", f"the task header is a {type(name).__name__}, not a string"
        problem = headers_problem(headers)
        if problem is not None:
            return "malformed", problem
        tasks = self.tasks
        if PAYLOAD_HEADER in headers and (name in tasks or name == DEFERRED_TASK_NAME):
            # A stored payload (claim_check.py), loaded before the checks below see the arguments; an
            # unknown task's message is given back as it came, small.
            problem = self.load_payload(message, headers)
            if problem is not None:
                return problem
            body = message.body
        try:
            payload = message.decode()
        except Exception:
            return None  # Celery refuses it with its own reason (content type, decode error)
        problem = body_problem(payload, body)
        if problem is not None:
            return "malformed", problem
        if name == DEFERRED_TASK_NAME:
            return self._deferred_problem(payload[0], payload[1])
        task = tasks.get(name)
        if task is not None:
            mismatch = signature_problem(task, payload[0], payload[1])
            if mismatch is not None:
                return "signature_mismatch", mismatch
        return None

    def load_payload(self, message: t.Any, headers: dict[str, t.Any]) -> tuple[str, str] | None:
        """Put a message's stored arguments into it (claim_check.py); ``(kind, reason)`` when they cannot be."""
        stored = claim_check_of(self.app)
        if stored is None:
            return "payload_missing", ("the message's arguments are stored in a database, and this worker has "
                                       "none (sqlalchemy.url)")
        return stored.load_into(message, headers)

    def _deferred_problem(self, args: list, kwargs: dict) -> tuple[str, str] | None:
        call = list(args) + [kwargs[key] for key in ("path", "args", "kwargs") if key in kwargs]
        if len(call) != 3:
            return "refused_deferred", "a deferred call needs a function path, a list and a dict"
        path, call_args, call_kwargs = call
        if not isinstance(path, str) or not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
            return "refused_deferred", "a deferred call needs a function path, a list and a dict"
        if path not in self._deferred:
            try:
                resolve_deferred(path, call_args, call_kwargs, allowed_prefixes(self.registry))
                verdict = None
            except DeferNotAllowed as exc:
                verdict = str(exc)
            self._deferred[path] = verdict
            if len(self._deferred) > 1024:
                self._deferred.popitem(last=False)
        verdict = self._deferred[path]
        return None if verdict is None else ("refused_deferred", verdict)

    def keep(self, message: t.Any, kind: str, exc: BaseException | None = None, *,
             reason: str | None = None) -> dict[str, t.Any]:
        """Copy ``message`` to the dead letters (and tell the app's observer); the entry kept."""
        entry = dead_letter(self.letters, message, kind, exc, reason=reason, max_bytes=self.max_bytes)
        if hooks.watching:
            observer = hooks.observer_of(self.app)
            if observer is not None:
                hooks.safely(observer.dead_lettered, kind)
        return entry

    def refuse(self, message: t.Any, kind: str, reason: str) -> None:
        """Copy ``message`` to the dead letters, acknowledge it so that it never comes back, and fail its result.

        The result is marked failed as Celery marks an unknown task's: a
        caller waiting on it gets the reason instead of a timeout.
        """
        entry = self.keep(message, kind, reason=reason)
        settle(message)
        task_id = entry.get("id")
        if task_id and not isinstance(self.app.backend, DisabledBackend):
            error = DeferNotAllowed(reason) if kind == "refused_deferred" else MessageRefused(f"{kind}: {reason}")
            try:
                self.app.backend.mark_as_failure(task_id, error)
            except Exception:
                logger.exception("websauna_tasks: could not mark refused message %s as failed", task_id)


_NO_LIMITS = [None, None]
#: Headers Celery's request takes as strings when they are set.
_STRING_HEADERS = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin")


def headers_problem(headers: dict[str, t.Any]) -> str | None:
    """Why protocol-2 headers would make Celery fail while it takes the message in, or None."""
    if not isinstance(headers.get("id"), str):
        return "the id header is missing or not a string"
    for key in ("eta", "expires"):
        value = headers.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            return f"the {key} header is a {type(value).__name__}, not an ISO 8601 time"
        try:
            maybe_iso8601(value)  # the parser Celery's request uses
        except (ValueError, TypeError, OverflowError):
            return f"the {key} header {value[:60]!r} is not an ISO 8601 time"
    retries = headers.get("retries")
    if retries is not None and (type(retries) is not int or retries < 0):
        return "the retries header is not a whole number"
    limits = headers.get("timelimit")
    # [None, None], what nearly every message carries, compared in C before the walk below.
    if limits is not None and limits != _NO_LIMITS and not (
            isinstance(limits, (list, tuple)) and len(limits) == 2
            and all(limit is None or (type(limit) in (int, float) and math.isfinite(limit) and limit >= 0)
                    for limit in limits)):
        return "the timelimit header is not a pair of [hard, soft] seconds"
    for key in _STRING_HEADERS:
        value = headers.get(key)
        if value is not None and not isinstance(value, str):
            return f"the {key} header is a {type(value).__name__}, not a string"
    return None


def body_problem(payload: t.Any, text: bytes | str | None = None) -> str | None:
    """Why a decoded protocol-2 body cannot be a task call, or None.

    ``text``, the body as it came, spares the walk of a body that has fewer
    brackets than the bound and so cannot nest deeper.
    """
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        return f"the body is not the [args, kwargs, embed] triple of the task protocol ({_shape(payload)})"
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        return f"args is a {type(args).__name__}, not a list"
    if not isinstance(kwargs, dict):
        return f"kwargs is a {type(kwargs).__name__}, not a dict"
    if kwargs and not all(isinstance(key, str) for key in kwargs):
        return "a keyword of kwargs is not a string"
    if embed is not None and not isinstance(embed, dict):
        return f"embed is a {type(embed).__name__}, not a dict"
    if _may_nest_deeper(text) and nesting_exceeds(payload, MAX_BODY_DEPTH):
        return f"the body nests more than {MAX_BODY_DEPTH} levels deep"
    return None


def _may_nest_deeper(text: bytes | str | None) -> bool:
    if isinstance(text, (bytes, bytearray)):
        return text.count(b"[") + text.count(b"{") > MAX_BODY_DEPTH
    if isinstance(text, str):
        return text.count("[") + text.count("{") > MAX_BODY_DEPTH
    return True


def _shape(value: t.Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def settle(message: t.Any) -> None:
    """Acknowledge ``message`` unless Celery already did; a failure is logged, not raised."""
    try:
        if not getattr(message, "acknowledged", True):
            message.ack()
    except Exception:
        logger.exception("websauna_tasks: could not acknowledge a refused message")


# -- bounded inflation --------------------------------------------------------------------------------------------

#: The limit the worker process's decoders use; one worker app per process.
_inflate_limit = 0


def _bounded(make: t.Callable[[], t.Any], name: str) -> t.Callable[[bytes], bytes]:
    def decode(body: bytes) -> bytes:
        limit = _inflate_limit
        decompressor = make()
        if not limit:
            out = decompressor.decompress(body)
        else:
            out = decompressor.decompress(body, limit + 1)
            if len(out) > limit:
                raise MessageTooLarge(f"the {name} body inflates to more than {MAX_MESSAGE_KEY} = {limit} bytes")
        if not decompressor.eof:
            raise MessageTooLarge(f"the {name} body is truncated or inflates beyond the limit")
        return out

    return decode


def _refused(name: str) -> t.Callable[[bytes], bytes]:
    def decode(body: bytes) -> bytes:
        raise MessageTooLarge(f"{name} bodies cannot be inflated within a bound here; use zlib, bzip2 or lzma")

    return decode


_BOUNDED_DECODERS: dict[str, t.Callable[[bytes], bytes]] = {
    "application/x-gzip": _bounded(zlib.decompressobj, "zlib"),
    "application/x-bz2": _bounded(bz2.BZ2Decompressor, "bzip2"),
    "application/x-lzma": _bounded(lzma.LZMADecompressor, "lzma"),
}


def install_bounded_decoders(limit: int) -> None:
    """Make kombu inflate every compression it knows within ``limit`` bytes, in this (worker) process.

    kombu inflates a compressed body while it builds the message, before any
    handler sees it: bounding the decoders is the only way to stop a small
    message that inflates to hundreds of MB. kombu's public ``register``
    replaces each decoder; encoders stay as they are.
    """
    global _inflate_limit
    _inflate_limit = limit
    for content_type in kombu.compression.encoders():
        encoder, content_type = kombu.compression.get_encoder(content_type)
        decoder = _BOUNDED_DECODERS.get(content_type) or _refused(content_type)
        kombu.compression.register(encoder, decoder, content_type)


# -- the consumer bootstep --------------------------------------------------------------------------------------

_CELERY_REFUSALS = (
    ("on_unknown_task", "unknown_task"),
    ("on_unknown_message", "unknown_message"),
    ("on_invalid_task", "invalid_task"),
    ("on_decode_error", "undecodable"),
)


class IntakeStep(bootsteps.Step):
    """Consumer bootstep: the gate before Celery's task handler, and copies of what Celery refuses."""

    name = "websauna_tasks.intake"

    def __init__(self, parent: t.Any, **kwargs: t.Any) -> None:
        super().__init__(parent, **kwargs)
        state = find_state(parent.app)
        intake = state.intake if state is not None else None
        if intake is None or getattr(parent, "_websauna_intake", False):
            return
        parent._websauna_intake = True
        install_bounded_decoders(intake.max_bytes)
        # Instance attributes: the event loop calls create_task_handler() and
        # the Tasks step hands on_decode_error to kombu after this runs.
        for attribute, kind in _CELERY_REFUSALS:
            setattr(parent, attribute, _copying(intake, getattr(parent, attribute), kind))
        parent.create_task_handler = _gated(intake, parent.create_task_handler, parent)


def _copying(intake: Intake, original: t.Callable[..., t.Any], kind: str) -> t.Callable[..., t.Any]:
    def handler(*args: t.Any) -> t.Any:
        if kind == "undecodable":
            message, exc = args
        elif kind == "unknown_message":
            message, exc = args[1], None
        else:
            message, exc = args[1], args[2]
        intake.keep(message, kind, exc)
        try:
            return original(*args)
        except Exception:
            # Celery's own handler failed on what it was built to refuse: the
            # copy is kept, and the message must not come back.
            logger.exception("websauna_tasks: Celery's handler for a refused message failed")
            settle(message)
            return None

    handler.__wrapped__ = original  # type: ignore[attr-defined]
    return handler


def _gated(intake: Intake, create: t.Callable[..., t.Callable[[t.Any], t.Any]],
           consumer: t.Any = None) -> t.Callable[..., t.Any]:
    def create_task_handler(*args: t.Any, **kwargs: t.Any) -> t.Callable[[t.Any], t.Any]:
        on_task_received = create(*args, **kwargs)

        def gate(message: t.Any) -> t.Any:
            try:
                problem = intake.problem(message)
            except Exception as exc:  # the checks themselves must not stop the worker either
                problem = "intake_error", f"checking the message failed: {type(exc).__name__}: {exc}"
            if problem is not None:
                if problem[0] == "payload_unavailable" and _waits(intake, consumer):
                    # The database is down for a while, not the message broken: rolling.py gives it back
                    # and loads it again later, under the grace of a deploy, before any dead letter.
                    try:
                        intake.unknown.wait_for_store(message, consumer, problem[1],  # type: ignore[union-attr]
                                                      lambda: gate(message))
                    except Exception as exc:
                        logger.exception("websauna_tasks: giving back message %s failed", _id_of(message))
                        intake.refuse(message, "intake_error", f"giving back a message whose stored arguments "
                                      f"cannot be read failed: {type(exc).__name__}: {exc}"[:1000])
                    return None
                intake.refuse(message, *problem)
                return None
            if skip_cancelled(intake.app, intake.registry, message):  # cancel.py: marks outlive workers
                return None
            name = _unknown_task(intake, message, consumer)
            if name is not None:
                try:
                    intake.unknown.take(message, name, consumer)  # type: ignore[union-attr]
                except Exception as exc:
                    logger.exception("websauna_tasks: giving back message %s failed", _id_of(message))
                    intake.refuse(message, "intake_error",
                                  f"giving back an unknown task failed: {type(exc).__name__}: {exc}"[:1000])
                return None
            try:
                return on_task_received(message)
            except Exception as exc:
                logger.exception("websauna_tasks: taking in message %s failed", _id_of(message))
                intake.refuse(message, "intake_error",
                              f"the worker could not take the message in: {type(exc).__name__}: {exc}"[:1000])
                return None

        gate.__wrapped__ = on_task_received  # type: ignore[attr-defined]
        return gate

    return create_task_handler


def _waits(intake: Intake, consumer: t.Any) -> bool:
    """True when this worker gives messages back under a grace (rolling.py) instead of dead-lettering them at once."""
    return intake.unknown is not None and consumer is not None and bool(intake.unknown.grace)


def _unknown_task(intake: Intake, message: t.Any, consumer: t.Any) -> str | None:
    """The name of ``message``'s task when the grace applies to it: a protocol-2 task this worker does not know."""
    if not _waits(intake, consumer):
        return None
    headers = message.headers
    name = headers.get("task") if isinstance(headers, dict) else None
    if not isinstance(name, str) or name in consumer.strategies:
        return None
    return name


def _id_of(message: t.Any) -> t.Any:
    headers = getattr(message, "headers", None)
    return headers.get("id") if isinstance(headers, dict) else None


def configure_intake(registry: Registry, app: Celery, max_bytes: int | None = None) -> Intake:
    """Build the app's gate and add :class:`IntakeStep` to its worker's consumer.

    ``max_bytes`` defaults to ``websauna_tasks.max_message_bytes`` (settings.py).
    """
    settings = get_task_settings(registry)
    if max_bytes is None:
        max_bytes = settings.max_message_bytes
    intake = Intake(app, registry, max_bytes)
    intake.unknown = UnknownTasks(app, settings.unknown_task_grace_seconds, settings.unknown_task_retry_seconds,
                                  intake.refuse)
    app_state(app).intake = intake
    app.steps["consumer"].add(IntakeStep)
    return intake
