"""Transactions run again on a transient conflict: one loop for ``RetryableTransactionTask`` and ``retryable``.

``retryable(tm=...)`` is Websauna's ``websauna.system.model.retry.retryable``:
a decorator whose function runs in a transaction of its own, begun and
committed around each call and run again, after a jittered back-off, when it
fails with a transient error (a PostgreSQL serialization failure or deadlock,
``transaction.interfaces.TransientError``). ``RetryableTransactionTask`` runs
its body through the same :class:`Retrying`, so both agree on what is
transient, how long to wait and how attempts are counted.
"""
from __future__ import annotations

import functools
import logging
import random
import time
import typing as t

import transaction
from pyramid.threadlocal import get_current_registry
from transaction.interfaces import AlreadyInTransaction, TransientError

from .request import get_current_request
from .request import transaction_in_progress as transaction_in_progress  # its home before request.py
from .settings import get_task_settings

logger = logging.getLogger(__name__)

#: First back-off in seconds; doubled each attempt, with full jitter, up to DEFAULT_BACKOFF_MAX.
DEFAULT_BACKOFF_BASE = 0.02
DEFAULT_BACKOFF_MAX = 1.0

F = t.TypeVar("F", bound=t.Callable[..., t.Any])


class TransactionInProgress(AlreadyInTransaction):
    """``retryable`` was called while its transaction manager already had a transaction.

    A subclass of ``transaction.interfaces.AlreadyInTransaction``, which an
    explicit manager raises on ``begin()`` in the same situation.
    """


def is_transient(tm: t.Any, exc: BaseException) -> bool:
    """True for errors that a fresh transaction may not hit again."""
    if isinstance(exc, TransientError):
        return True
    try:
        if tm._retryable(type(exc), exc):  # asks zope.sqlalchemy's should_retry
            return True
    except Exception:
        pass
    seen = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for candidate in (error, getattr(error, "orig", None)):
            code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
            if isinstance(code, str) and code.startswith("40"):
                return True
        error = error.__cause__ or error.__context__
    return False


def default_attempts() -> int:
    """``websauna_tasks.retry_attempts`` of the current request's registry (task or web), else the default."""
    request = get_current_request()
    registry = getattr(request, "registry", None)
    if registry is None:
        registry = get_current_registry()
    return get_task_settings(registry).retry_attempts


_PENDING, _DONE, _RETRY = range(3)


class Attempt:
    """One transaction of a :class:`Retrying` loop: ``with attempt:`` begins it and commits or aborts it.

    A transient error (raised in the block or by the commit) is swallowed
    when attempts are left, and the loop goes on to the next attempt; any
    other error, or one on the last attempt, is raised after the abort.
    """

    __slots__ = ("_retrying", "_tm", "number", "last", "state", "error")

    def __init__(self, retrying: Retrying, number: int, last: bool):
        self._retrying = retrying
        self._tm: t.Any = None
        self.number = number
        self.last = last
        self.state = _PENDING
        self.error: BaseException | None = None

    def __enter__(self) -> transaction.Transaction:
        retrying = self._retrying
        tm = retrying.tm_now()
        if transaction_in_progress(tm):
            raise TransactionInProgress(
                f"{retrying.name}: its transaction manager already has a transaction in progress, and "
                "retryable runs the function in a transaction of its own (it would have to end that one). "
                "Call it where no transaction is open: in the body of a WebsaunaTask or ScheduleOnCommitTask "
                "rather than a TransactionalTask, or in web code outside pyramid_tm's transaction; "
                "or call the function without retryable to make it part of the open transaction"
            )
        self.state = _DONE  # until a transient failure says otherwise
        self._tm = tm
        return tm.begin()

    def __exit__(self, exc_type: t.Any, exc: BaseException | None, tb: t.Any) -> bool:
        tm, self._tm = self._tm, None
        if exc is None:
            try:
                tm.commit()
            except Exception as error:
                if not self._may_retry(tm, error):
                    raise
            return False
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: no retry
            tm.abort()
            return False
        return self._may_retry(tm, exc)

    def _may_retry(self, tm: t.Any, error: BaseException) -> bool:
        # Asked before the abort: zope.sqlalchemy's should_retry looks at the live transaction.
        transient = is_transient(tm, error)
        tm.abort()
        if not transient or self.last:
            return False
        self.state = _RETRY
        self.error = error
        return True


class Retrying:
    """What :func:`retryable` returns: a decorator, and an iterable of attempts.

    ::

        @retryable(tm=request.tm)
        def step(asset_id):
            ...

        for attempt in retryable(tm=request.tm):
            with attempt:
                ...
    """

    def __init__(self, tm: t.Any = None, *, attempts: int | None = None,
                 backoff_base: float = DEFAULT_BACKOFF_BASE, backoff_max: float = DEFAULT_BACKOFF_MAX,
                 on_retry: t.Callable[[int, BaseException], None] | None = None, name: str = "retryable"):
        self.tm = tm
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.on_retry = on_retry
        self.name = name

    def tm_now(self) -> t.Any:
        """The manager given, else the current request's ``tm`` (task or web), else ``transaction.manager``."""
        if self.tm is not None:
            return self.tm
        request = get_current_request()
        tm = getattr(request, "tm", None) if request is not None else None
        return tm if tm is not None else transaction.manager

    def __iter__(self) -> t.Iterator[Attempt]:
        attempts = max(1, self.attempts if self.attempts is not None else default_attempts())
        for number in range(1, attempts + 1):
            attempt = Attempt(self, number, number == attempts)
            yield attempt
            if attempt.state != _RETRY:
                return
            error, attempt.error = attempt.error, None
            delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (number - 1)))
            logger.info("%s: transient conflict on attempt %d/%d (%s), retrying in %.3fs",
                        self.name, number, attempts, type(error).__name__, delay)
            if self.on_retry is not None:
                self.on_retry(number, error)
            del error  # no reference cycle through its traceback while sleeping
            time.sleep(delay)

    def run(self, fn: t.Callable[..., t.Any], *args: t.Any, **kwargs: t.Any) -> t.Any:
        """``fn(*args, **kwargs)`` in a transaction, attempted again on a transient conflict."""
        result = None
        for attempt in self:
            with attempt:
                result = fn(*args, **kwargs)
        return result

    def __call__(self, fn: F) -> F:
        # Named after the function in the log line and in errors.
        retrying = Retrying(self.tm, attempts=self.attempts, backoff_base=self.backoff_base,
                            backoff_max=self.backoff_max, on_retry=self.on_retry,
                            name=getattr(fn, "__qualname__", repr(fn)))

        @functools.wraps(fn)
        def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
            return retrying.run(fn, *args, **kwargs)

        return t.cast(F, run)


def retryable(fn: t.Callable[..., t.Any] | None = None, *, tm: transaction.TransactionManager | None = None,
              attempts: int | None = None, backoff_base: float = DEFAULT_BACKOFF_BASE,
              backoff_max: float = DEFAULT_BACKOFF_MAX,
              on_retry: t.Callable[[int, BaseException], None] | None = None) -> t.Any:
    """Run a function in a transaction of its own, again on a transient conflict.

    ``@retryable(tm=request.tm)`` (Websauna's form) decorates a function:
    each call begins a transaction of ``tm``, commits it when the function
    returns and aborts it when it raises. A transient error (PostgreSQL
    serialization failure or deadlock, ``TransientError``), raised by the
    function or by the commit, aborts and calls it again after a jittered
    back-off, ``attempts`` times in all (default: the
    ``websauna_tasks.retry_attempts`` setting, 3); then the error is raised.
    The same loop runs ``RetryableTransactionTask`` bodies.

    Without a function it returns a :class:`Retrying`, also iterable for a
    block of code::

        for attempt in retryable(tm=request.tm):
            with attempt:
                request.dbsession.get(Counter, 1).value += 1

    ``tm=None`` means the current request's ``tm`` (task or web), else
    ``transaction.manager``. ``tm`` must have no transaction in progress when
    the call starts (:class:`TransactionInProgress` otherwise), as in Websauna.
    """
    retrying = Retrying(tm, attempts=attempts, backoff_base=backoff_base, backoff_max=backoff_max,
                        on_retry=on_retry)
    return retrying(fn) if fn is not None else retrying
