"""Declared queues: rate, concurrency, attempts and back-off, as Cloud Tasks queues have them.

``websauna_tasks.queues`` is a Python-literal list of dicts, parsed safely
(:func:`websauna_tasks.config.parse_literal`) once, in ``includeme``, into a
frozen :class:`QueuesConfig` kept on the registry and on the Celery app.
From there:

- the declared names become Celery ``task_queues`` (with the app's default
  queue), so routing by ``queue=`` and ``ws-celery INI -- worker -Q name``
  are Celery's own;
- ``apply_async(queue=...)`` and ``defer(..., _queue=...)`` refuse a queue
  that is not declared (:class:`UndeclaredQueue`), in the caller, unless
  ``websauna_tasks.allow_undeclared_queues`` is true;
- in the worker, :func:`run_in_queue` wraps each run of a task that came
  from a declared queue: it waits for the queue's rate and concurrency
  (kept in Redis, because Celery's ``rate_limit`` is per worker process
  and per task type, and Celery has no concurrency limit across workers),
  and re-sends a failed run with Celery's ``Task.retry`` and the queue's
  back-off.

Everything about *why* these choices were made is in ``docs/queues.md``.
"""
from __future__ import annotations

import logging
import random
import threading
import time
import types
import typing as t
import uuid
from dataclasses import dataclass, field

from celery.exceptions import Ignore, Reject, Retry
from pyramid.exceptions import ConfigurationError
from pyramid.registry import Registry

from .declared_queues import QueueConfig as QueueConfig
from .declared_queues import backoff_seconds as backoff_seconds
from .declared_queues import parse_queues as parse_queues
from .observability import hooks
from .settings import ALLOW_UNDECLARED_KEY as ALLOW_UNDECLARED_KEY
from .settings import DEFAULT_QUEUE_WAIT_SECONDS as DEFAULT_WAIT_SECONDS  # noqa: F401
from .settings import LIMITS_REDIS_URL_KEY as LIMITS_REDIS_URL_KEY
from .settings import QUEUE_WAIT_SECONDS_KEY as WAIT_SECONDS_KEY  # noqa: F401
from .settings import QUEUES_KEY as QUEUES_KEY
from .settings import REDIS_SCHEMES, get_task_settings
from .state import app_state, find_state
from .threads import BackgroundLoop

if t.TYPE_CHECKING:
    from celery import Celery, Task

logger = logging.getLogger(__name__)

# Settings (declared and parsed in settings.py, imported above under their old names): QUEUES_KEY, the
# declared queues, a Python-literal list of dicts; ALLOW_UNDECLARED_KEY, when true, queues that are not
# declared may be used too; LIMITS_REDIS_URL_KEY, Redis holding the rate and concurrency state (the
# broker, when it is Redis); WAIT_SECONDS_KEY, seconds a worker process waits for a slot before it
# re-queues the task (1).

#: Message header with the time (epoch seconds) the first attempt started.
FIRST_RUN_HEADER = "websauna_tasks_first_run"

#: A concurrency slot is a lease: a worker killed mid-run frees it after this long.
LEASE_SECONDS = 60.0

_REGISTRY_KEY = "websauna_tasks.queues_config"
# Set on an exception that Task.retry() raised because the task's own retries ran out.
_GAVE_UP_MARK = "_websauna_tasks_retries_exhausted"

class UndeclaredQueue(ValueError):
    """A task was sent to a queue that ``websauna_tasks.queues`` does not declare."""

    def __init__(self, queue: str, allowed: t.Iterable[str]):
        names = ", ".join(sorted(allowed)) or "none"
        super().__init__(
            f"queue {queue!r} is not declared in {QUEUES_KEY} (declared: {names}); declare it, "
            f"or set {ALLOW_UNDECLARED_KEY} = true")
        self.queue = queue


@dataclass(frozen=True)
class QueuesConfig:
    """What ``includeme`` parsed: the declared queues and how undeclared ones are treated."""

    queues: t.Mapping[str, QueueConfig]
    #: True when ``websauna_tasks.queues`` is set: other queues are then refused.
    enforced: bool = False
    allow_undeclared: bool = False
    #: Queue names a task may be sent to: declared, the default queue, the app's own task_queues.
    allowed: frozenset[str] = frozenset()
    wait_seconds: float = DEFAULT_WAIT_SECONDS
    #: Where rate and concurrency are kept; None when no queue has limits (or in eager mode).
    limits: RedisLimits | None = field(default=None, compare=False)

    def check(self, queue: str | None) -> None:
        """Raise :class:`UndeclaredQueue` unless a task may be sent to ``queue`` (None: the default)."""
        if queue is None or not self.enforced or self.allow_undeclared or queue in self.allowed:
            return
        raise UndeclaredQueue(queue, self.allowed)

    def policy_for(self, queue: str | None) -> QueueConfig | None:
        """The declared queue when it has limits or retries to apply, else None."""
        declared = self.queues.get(queue) if queue is not None else None
        if declared is None or not (declared.has_limits or declared.retries):
            return None
        return declared


# -- wiring into the Celery app --------------------------------------------------------------



def _limits_url(url: str, app: Celery, limited: list[str]) -> str:
    if url:  # checked to be a Redis URL by the settings layer
        return url
    broker = str(app.conf.broker_url or "")
    if broker.startswith(REDIS_SCHEMES):
        return broker
    raise ConfigurationError(
        f"queues {', '.join(map(repr, limited))} have rate_per_second or max_concurrent, which are kept in Redis "
        f"so that they hold across all workers; the broker ({broker.split('://')[0] or 'none'}) is not Redis: "
        f"set {LIMITS_REDIS_URL_KEY} = redis://...")


#: kombu's Redis transport default: a message not acknowledged within it is delivered again.
REDIS_VISIBILITY_TIMEOUT = 3600


def _check_visibility_timeout(app: Celery, declared: tuple[QueueConfig, ...]) -> None:
    # A retry waiting for its countdown is held unacknowledged by a worker;
    # past the visibility timeout Redis hands it to another worker as well.
    if not str(app.conf.broker_url or "").startswith(REDIS_SCHEMES) or app.conf.task_always_eager:
        return
    options = app.conf.broker_transport_options or {}
    timeout = float(options.get("visibility_timeout", REDIS_VISIBILITY_TIMEOUT))
    for queue in declared:
        if queue.retries and queue.max_backoff_seconds >= timeout:
            raise ConfigurationError(
                f"{QUEUES_KEY}: queue {queue.name!r}: max_backoff_seconds ({queue.max_backoff_seconds:g}) is not "
                f"shorter than the Redis broker's visibility_timeout ({timeout:g}), so a retry would run twice; "
                "lower it, or raise broker_transport_options['visibility_timeout']")


def _celery_queues(app: Celery, declared: tuple[QueueConfig, ...]) -> dict[str, t.Any]:
    """The app's ``task_queues`` with the declared queues and the default queue added."""
    conf = app.conf
    existing = conf.task_queues or {}
    queues: dict[str, t.Any] = dict(existing) if isinstance(existing, t.Mapping) else {q.name: q for q in existing}
    default = conf.task_default_queue
    if default and default not in queues:
        # What Celery declares for it when task_queues is empty.
        queues[default] = {"exchange": conf.task_default_exchange or default,
                           "exchange_type": conf.task_default_exchange_type,
                           "routing_key": conf.task_default_routing_key or default}
    for queue in declared:
        # A direct exchange named like the queue, bound by the queue's
        # name: the routing key a worker sees is the queue's name.
        queues.setdefault(queue.name, {"exchange": queue.name, "exchange_type": "direct",
                                       "routing_key": queue.name})
    return queues


def configure_queues(registry: Registry, app: Celery) -> QueuesConfig:
    """Hand the parsed queue settings (settings.py) to the Celery app (called by ``includeme``)."""
    settings = get_task_settings(registry)
    enforced = settings.queues is not None
    declared = settings.queues or ()
    _check_visibility_timeout(app, declared)
    allow_undeclared = settings.allow_undeclared_queues
    wait_seconds = settings.queue_wait_seconds
    limited = [queue.name for queue in declared if queue.has_limits]
    limits = None
    # Eager mode runs tasks in the calling process, with no worker to limit.
    if limited and not app.conf.task_always_eager:
        limits = RedisLimits(_limits_url(settings.limits_redis_url, app, limited), f"websauna_tasks:queue:{app.main}:")
    allowed: frozenset[str] = frozenset()
    if enforced:
        celery_queues = _celery_queues(app, declared)
        app.conf.task_queues = celery_queues
        allowed = frozenset(celery_queues)
    config = QueuesConfig(
        queues=types.MappingProxyType({queue.name: queue for queue in declared}),
        enforced=enforced, allow_undeclared=allow_undeclared, allowed=allowed,
        wait_seconds=wait_seconds, limits=limits,
    )
    registry[_REGISTRY_KEY] = config
    app_state(app).queues = config if enforced else None
    return config


def get_queues(registry: Registry) -> QueuesConfig:
    """The parsed queue settings of an app that included websauna_tasks."""
    config = registry.get(_REGISTRY_KEY)
    if config is None:
        raise ConfigurationError("no queue settings on this registry: config.include('websauna_tasks') first")
    return config


def queue_name(queue: t.Any) -> str | None:
    """The name in a ``queue=`` option: a string or a kombu ``Queue``."""
    if queue is None or isinstance(queue, str):
        return queue
    return getattr(queue, "name", None)


def enforced_queues(app: Celery) -> QueuesConfig | None:
    """The declared queues ``app`` enforces; None when none are declared, or for a plain Celery app."""
    state = find_state(app)
    return state.queues if state is not None else None


def check_queue(app: Celery, queue: t.Any) -> None:
    """In the caller: refuse a queue that is not declared (nothing to check when none are)."""
    config = enforced_queues(app)
    if config is not None:
        config.check(queue_name(queue))


# -- limits in Redis ---------------------------------------------------------------------------

# The scripts read Redis's clock, so the workers of every machine agree on "now".
_NOW_MS = "local clock = redis.call('TIME') local now = clock[1] * 1000 + clock[2] / 1000 "

# Rate: each start reserves the next free instant (GCRA with no burst): starts are
# at least 1/rate apart, across all processes. A caller that would have to wait
# longer than it may (ARGV[2]) reserves nothing and learns how long it was.
_RESERVE_START = _NOW_MS + """
local at = tonumber(redis.call('GET', KEYS[1]) or '0')
if at < now then at = now end
local wait = at - now
if wait > tonumber(ARGV[2]) then return {0, tostring(wait)} end
local next_at = at + tonumber(ARGV[1])
redis.call('SET', KEYS[1], tostring(next_at), 'PX', math.ceil(next_at - now) + 1000)
return {1, tostring(wait)}
"""

# Concurrency: a sorted set of leases scored by their expiry; expired leases
# (their worker was killed) are dropped before counting.
_TAKE_SLOT = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 2))
return 1
"""

_RENEW_SLOT = _NOW_MS + """
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 2))
return 1
"""


class RedisLimits:
    """Rate and concurrency state of the declared queues, shared by all workers through Redis.

    The client is made on first use, so each worker process (after fork)
    gets its own connections.
    """

    def __init__(self, url: str, prefix: str):
        self.url = url
        self.prefix = prefix
        self._client: t.Any = None
        self._scripts: dict[str, t.Any] = {}
        self._lock = threading.Lock()

    def client(self) -> t.Any:
        with self._lock:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(self.url)
            return self._client

    def _script(self, source: str) -> t.Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client().register_script(source)
        return script

    def key(self, queue: str, what: str) -> str:
        return f"{self.prefix}{queue}:{what}"

    def reserve_start(self, queue: str, rate_per_second: float, max_wait: float) -> tuple[bool, float]:
        """Reserve a start within ``max_wait`` seconds: (reserved, seconds until that start)."""
        reserved, wait_ms = self._script(_RESERVE_START)(
            keys=[self.key(queue, "rate")], args=[repr(1000.0 / rate_per_second), repr(max_wait * 1000.0)])
        return bool(int(reserved)), float(wait_ms) / 1000.0

    def take_slot(self, queue: str, limit: int, lease_seconds: float = LEASE_SECONDS) -> Lease | None:
        """A lease on one of ``limit`` slots, or None when all are taken."""
        token = uuid.uuid4().hex
        key = self.key(queue, "running")
        if not int(self._script(_TAKE_SLOT)(keys=[key], args=[limit, repr(lease_seconds * 1000.0), token])):
            return None
        return Lease(self, key, token, lease_seconds)

    def renew(self, lease: Lease) -> bool:
        return bool(int(self._script(_RENEW_SLOT)(keys=[lease.key], args=[repr(lease.seconds * 1000.0),
                                                                            lease.token])))

    def release(self, lease: Lease) -> None:
        self.client().zrem(lease.key, lease.token)


@dataclass(eq=False)
class Lease:
    """One held concurrency slot, renewed by the process's keeper until released."""

    limits: RedisLimits
    key: str
    token: str
    seconds: float

    def release(self) -> None:
        _keeper.drop(self)
        self.limits.release(self)


class _LeaseKeeper(BackgroundLoop):
    """A thread per process renewing the slots its runs hold.

    Without renewal a run longer than the lease would lose its slot and let
    one more run start; with it, only a process that stops renewing (killed,
    frozen) loses its slots, once their lease has run out.
    """

    thread_name = "websauna_tasks-leases"

    def __init__(self) -> None:
        super().__init__()
        self.leases: set[Lease] = set()
        self.lock = threading.Lock()

    def hold(self, lease: Lease) -> None:
        with self.lock:
            self.leases.add(lease)
        # A thread does not survive fork: a pool child starts its own.
        self.ensure_running()
        # The thread may be sleeping for a longer lease than this one.
        self.wake()

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.leases.discard(lease)

    def run(self) -> None:
        while not self.stopping.is_set():
            with self.lock:
                held = list(self.leases)
            interval = min((lease.seconds for lease in held), default=LEASE_SECONDS) / 3
            if self.wait(interval):
                continue
            for lease in held:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        with self.lock:
            if lease not in self.leases:
                return
        try:
            if not lease.limits.renew(lease):
                logger.warning("websauna_tasks: the concurrency slot of %s expired before it was renewed; "
                               "one more task may run at once", lease.key)
        except Exception:
            logger.exception("websauna_tasks: could not renew the concurrency slot of %s", lease.key)


_keeper = _LeaseKeeper()


def hold_slot(limits: RedisLimits, queue: str, limit: int, lease_seconds: float = LEASE_SECONDS) -> Lease | None:
    """Take a slot and keep it renewed until ``lease.release()``; None when all are taken."""
    lease = limits.take_slot(queue, limit, lease_seconds)
    if lease is not None:
        _keeper.hold(lease)
    return lease


# -- the worker side -----------------------------------------------------------------------------

def policy_of_run(task: Task) -> tuple[QueuesConfig, QueueConfig] | None:
    """The declared queue this worker run came from, when it has something to apply."""
    config = enforced_queues(task.app)
    if config is None:
        return None
    request = task.request
    info = request.delivery_info
    # Eager runs and direct calls did not come from a queue.
    if not info or request.is_eager or info.get("is_eager"):
        return None
    queue = config.policy_for(info.get("routing_key"))
    return (config, queue) if queue is not None else None


def run_in_queue(task: Task, body: t.Callable[[], t.Any]) -> t.Any:
    """Run ``body`` (one run of ``task``) under the rules of the queue it came from."""
    found = policy_of_run(task)
    if found is None:
        return body()
    config, queue = found
    lease = _observed_wait(task, config, queue) if hooks.watching else _wait_for_turn(task, config, queue)
    try:
        return _attempt(task, queue, body)
    finally:
        if lease is not None:
            lease.release()


def _observed_wait(task: Task, config: QueuesConfig, queue: QueueConfig) -> Lease | None:
    """:func:`_wait_for_turn`, timed for the app's observer (the queue-limiter wait metric)."""
    observer = hooks.observer_of(task.app)
    if observer is None:
        return _wait_for_turn(task, config, queue)
    started = time.monotonic()
    try:
        lease = _wait_for_turn(task, config, queue)
    except Retry:
        hooks.safely(observer.queue_waited, queue.name, time.monotonic() - started, "requeued")
        raise
    hooks.safely(observer.queue_waited, queue.name, time.monotonic() - started, "ran")
    return lease


def _wait_for_turn(task: Task, config: QueuesConfig, queue: QueueConfig) -> Lease | None:
    """Hold a concurrency slot and the next start allowed by the rate, or re-queue the task."""
    limits = config.limits
    if limits is None:
        return None
    deadline = time.monotonic() + config.wait_seconds
    lease = None
    if queue.max_concurrent is not None:
        lease = _wait_for_slot(limits, queue, deadline)
        if lease is None:
            _requeue(task, max(0.1, config.wait_seconds * random.uniform(0.5, 1.5)),
                     f"queue {queue.name!r}: all {queue.max_concurrent} slots are taken")
    try:
        if queue.rate_per_second is not None:
            remaining = max(0.0, deadline - time.monotonic())
            reserved, wait = limits.reserve_start(queue.name, queue.rate_per_second, remaining)
            if not reserved:
                # Back when about the wait's worth of earlier starts has gone by.
                _requeue(task, max(0.1, wait - remaining) * random.uniform(1.0, 1.2),
                         f"queue {queue.name!r}: rate of {queue.rate_per_second:g}/s reached")
            time.sleep(wait)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return lease


def _wait_for_slot(limits: RedisLimits, queue: QueueConfig, deadline: float) -> Lease | None:
    while True:
        lease = hold_slot(limits, queue.name, t.cast(int, queue.max_concurrent))
        if lease is not None or time.monotonic() >= deadline:
            return lease
        # Polling: a slot frees when some run ends, and nothing tells us when.
        time.sleep(min(random.uniform(0.02, 0.1), max(0.0, deadline - time.monotonic())))


def _requeue(task: Task, countdown: float, why: str) -> t.NoReturn:
    """Send this run again later without counting an attempt (``retries`` stays as it is)."""
    request = task.request
    signature = task.signature_from_request(request, None, None, countdown=countdown, retries=request.retries)
    signature.apply_async()
    raise Retry(f"{why}; sent again in {countdown:.2f}s (not an attempt)", when=countdown, sig=signature)


def _first_run_of(request: t.Any) -> float | None:
    # A worker flattens message headers into the request; .headers keeps them too.
    value = getattr(request, FIRST_RUN_HEADER, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(FIRST_RUN_HEADER)
    return float(value) if isinstance(value, (int, float)) else None


def _attempt(task: Task, queue: QueueConfig, body: t.Callable[[], t.Any]) -> t.Any:
    request = task.request
    first_run = _first_run_of(request) or time.time()
    try:
        return body()
    except (Retry, Reject, Ignore):
        raise
    except Exception as exc:
        delay = _retry_delay(task, queue, exc, first_run)
        if delay is None:
            raise
        _retry(task, queue, exc, delay, first_run)


def _retry_delay(task: Task, queue: QueueConfig, exc: Exception, first_run: float) -> float | None:
    # The task's own retry rules have decided: its max_retries ran out, or
    # the error is one it says must never be retried.
    if getattr(exc, _GAVE_UP_MARK, False) or isinstance(exc, tuple(getattr(task, "dont_autoretry_for", ()) or ())):
        return None
    return queue.next_attempt_in(task.request.retries + 1, time.time() - first_run)


def _retry(task: Task, queue: QueueConfig, exc: Exception, delay: float, first_run: float) -> t.NoReturn:
    request = task.request
    attempt = request.retries + 1
    logger.info("%s[%s]: attempt %d of %s on queue %r failed (%r); next attempt in %.2fs", task.name,
                request.id, attempt, "unlimited" if queue.max_attempts == -1 else queue.max_attempts,
                queue.name, exc, delay)
    headers = {**(request.headers or {}), FIRST_RUN_HEADER: first_run}
    retry_with_limit(task, exc, delay, request.retries + 1, headers=headers)


def retry_with_limit(task: Task, exc: Exception, countdown: float, max_retries: int,
                     headers: dict[str, t.Any] | None = None) -> t.NoReturn:
    """``raise task.retry(...)`` with a limit decided by the caller, leaving the task's own limit as it was.

    Task.retry() refuses past the task's max_retries (3 by default) and
    remembers an explicit limit on the task object: the caller has decided
    already, so it passes one that allows this retry and puts back whatever
    was there for the task's own later retry() calls.
    """
    previous = task.__dict__.get("override_max_retries", _ABSENT)
    options: dict[str, t.Any] = {"headers": headers} if headers is not None else {}
    try:
        raise task.retry(exc=exc, countdown=countdown, max_retries=max_retries, **options)
    finally:
        if previous is _ABSENT:
            task.__dict__.pop("override_max_retries", None)
        else:
            task.override_max_retries = previous


_ABSENT: t.Any = object()


def mark_gave_up(exc: BaseException) -> None:
    """Note on ``exc`` that the task's own retries ran out: the queue must not retry it."""
    try:
        setattr(exc, _GAVE_UP_MARK, True)
    except (AttributeError, TypeError):  # an exception type without a __dict__
        pass
