"""The ``@task`` decorator and the task base classes."""
from __future__ import annotations

import functools
import importlib
import logging
import random
import time
import typing as t

import celery
import transaction
import venusian
from celery.utils import uuid
from pyramid.exceptions import ConfigurationError
from pyramid.request import Request
from pyramid.threadlocal import get_current_registry
from transaction.interfaces import TransientError

from .dispatch import PendingMessage, schedule
from .registry import ICeleryApp, get_celery
from .request import current_task_request, task_request

logger = logging.getLogger(__name__)

#: Setting: default number of attempts for :class:`RetryableTransactionTask`.
RETRY_ATTEMPTS_KEY = "websauna_tasks.retry_attempts"
DEFAULT_RETRY_ATTEMPTS = 3

_MISSING: t.Any = object()


class WebsaunaTask(celery.Task):
    """Base of every websauna_tasks task: each run gets its own Pyramid request.

    The request is made when the run starts (worker or eager), is available
    as :meth:`get_request` and is closed when the run ends, which closes its
    database session.
    """

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        registry = getattr(self.app, "pyramid_registry", None)
        if registry is None:
            # A plain Celery app without includeme: behave like celery.Task.
            return super().__call__(*args, **kwargs)
        with task_request(registry) as request:
            return self.run_in_request(request, args, kwargs)

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        """Run the body; subclasses wrap this in a transaction."""
        return celery.Task.__call__(self, *args, **kwargs)

    def get_request(self) -> Request:
        """The Pyramid request of the current run."""
        request = current_task_request()
        if request is None:
            raise RuntimeError(
                f"{self.name}: get_request() is only available while the task runs "
                "(in a worker or in eager mode), not when it is called to be scheduled"
            )
        return request

    def send_now(self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any) -> celery.result.AsyncResult:
        """Publish immediately, bypassing any transaction."""
        return celery.Task.apply_async(self, args, kwargs, **options)

    #: When True, apply_async() without ``tm`` is an error (ScheduleOnCommitTask).
    require_tm = False

    def apply_async(
        self,
        args: t.Any = None,
        kwargs: t.Any = None,
        task_id: str | None = None,
        producer: t.Any = None,
        link: t.Any = None,
        link_error: t.Any = None,
        shadow: str | None = None,
        *,
        tm: transaction.TransactionManager | None = _MISSING,
        **options: t.Any,
    ) -> celery.result.AsyncResult:
        """Send after ``tm`` commits when ``tm`` is given; ``tm=None`` sends now."""
        for name, value in (("link", link), ("link_error", link_error), ("shadow", shadow)):
            if value is not None:
                options[name] = value
        if tm is _MISSING and (producer is not None or "parent_id" in options or not self.require_tm):
            # producer=: Celery beat. parent_id: the worker sending the next
            # step of a chain or a link callback once the previous task has
            # finished (and, for transactional tasks, committed).
            return self.send_now(args, kwargs, task_id=task_id, producer=producer, **options)
        if tm is None:
            return self.send_now(args, kwargs, task_id=task_id, producer=producer, **options)
        if tm is _MISSING:
            raise TypeError(
                f"{self.name}.apply_async() needs the transaction manager to send after commit: "
                f"pass tm=request.tm (or tm=None to send immediately)"
            )
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        if self.typing:
            # Fail in the caller, not silently after the commit.
            self._check_arguments(args, kwargs)
        task_id = task_id or uuid()
        # A producer given with tm (Celery's group passes one to each member)
        # is not kept: the message is published after the commit, through
        # the producer of that publishing round.
        schedule(tm, PendingMessage(self, args, kwargs, options, task_id))
        return self.AsyncResult(task_id)

    def _check_arguments(self, args: tuple, kwargs: dict) -> None:
        check = getattr(self, "__header__", None)
        if check is None:
            return
        try:
            check(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}: {exc}") from None

    def signature_from_request(self, request: t.Any = None, args: t.Any = None, kwargs: t.Any = None,
                               queue: t.Any = None, **extra_options: t.Any) -> t.Any:
        # Task.retry() republishes through this signature while the current
        # run is still going: that must go out now, not wait for a commit.
        signature = super().signature_from_request(request, args, kwargs, queue, **extra_options)
        signature.options["tm"] = None
        return signature

    subtask_from_request = signature_from_request


class ScheduleOnCommitTask(WebsaunaTask):
    """``apply_async(..., tm=request.tm)`` sends the message after ``tm`` commits.

    Nothing is sent when the transaction aborts, is doomed, fails to commit,
    or when a savepoint enclosing the call is rolled back. ``tm=None`` sends
    now; leaving ``tm`` out is an error (it would silently send before the
    commit). Celery beat (which passes ``producer=``) and Celery's own
    retries need no ``tm``.
    """

    require_tm = True


class TransactionalTask(ScheduleOnCommitTask):
    """The body runs in the request's transaction: commit on return, abort on raise."""

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        with request.tm:
            return celery.Task.__call__(self, *args, **kwargs)


class RetryableTransactionTask(TransactionalTask):
    """Like :class:`TransactionalTask`, re-running the body on transient conflicts.

    PostgreSQL serialization failures and deadlocks (SQLSTATE class 40) and
    :class:`transaction.interfaces.TransientError` start a new transaction
    after a short jittered pause, ``retry_attempts`` times in all.
    """

    #: Attempts in all; None means the ``websauna_tasks.retry_attempts`` setting (default 3).
    retry_attempts: int | None = None
    #: First back-off in seconds; doubled each attempt, with full jitter.
    retry_backoff_base: float = 0.02
    retry_backoff_max: float = 1.0

    def get_retry_attempts(self, request: Request) -> int:
        if self.retry_attempts is not None:
            return int(self.retry_attempts)
        return int(request.registry.settings.get(RETRY_ATTEMPTS_KEY, DEFAULT_RETRY_ATTEMPTS))

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        tm = request.tm
        attempts = max(1, self.get_retry_attempts(request))
        for attempt in range(1, attempts + 1):
            tm.begin()
            try:
                result = celery.Task.__call__(self, *args, **kwargs)
                tm.commit()
                return result
            except Exception as exc:
                transient = is_transient(tm, exc)
                tm.abort()
                if not transient or attempt == attempts:
                    raise
                delay = random.uniform(0, min(self.retry_backoff_max, self.retry_backoff_base * 2 ** (attempt - 1)))
                logger.info("%s: transient conflict on attempt %d/%d (%s), retrying in %.3fs",
                            self.name, attempt, attempts, type(exc).__name__, delay)
                self.on_conflict_retry(attempt, exc)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def on_conflict_retry(self, attempt: int, exc: BaseException) -> None:
        """Called before each re-run; a hook for metrics."""


def is_transient(tm: transaction.TransactionManager, exc: BaseException) -> bool:
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


class TaskProxy:
    """What ``@task`` returns: the function until scanned, then the Celery task's front.

    Attribute access (``apply_async``, ``delay``, ``name``, ``s``...) goes to
    the Celery task bound by ``config.scan()``; before that it raises an error
    telling what is missing instead of an obscure AttributeError.

    When several Pyramid apps in one process scan the same module, each gets
    its own Celery task; the proxy answers with the task of the app whose
    registry is current (inside its requests and task runs), else with the
    one bound last.
    """

    def __init__(self, func: t.Callable[..., t.Any], options: dict[str, t.Any]):
        functools.update_wrapper(self, func)
        self._func = func
        self._options = options
        self._celery_task: celery.Task | None = None
        self._by_app: dict[int, celery.Task] = {}

    @property
    def celery_task(self) -> celery.Task:
        if self._celery_task is None:
            raise RuntimeError(
                f"task {self._func.__module__}.{self._func.__qualname__} is not registered with a Celery app yet: "
                f"call config.include('websauna_tasks') and config.scan() on its module first"
            )
        if len(self._by_app) > 1:
            app = get_current_registry().queryUtility(ICeleryApp)
            bound = self._by_app.get(id(app)) if app is not None else None
            if bound is not None and bound.app is app:
                return bound
        return self._celery_task

    def bind_to_app(self, app: celery.Celery) -> celery.Task:
        options = dict(self._options)
        options.setdefault("base", ScheduleOnCommitTask)
        # shared=False: Celery would otherwise add the task to every app
        # created later in the process; lazy=False: bind now, not on first use.
        self._celery_task = app.task(self._func, shared=False, lazy=False, **options)
        self._by_app = {key: bound for key, bound in self._by_app.items() if bound.app is not app}
        self._by_app[id(app)] = self._celery_task
        return self._celery_task

    def __getattr__(self, name: str) -> t.Any:
        if name.startswith("__") or name.startswith("_by_app") or name.startswith("_celery_task"):
            raise AttributeError(name)
        return getattr(self.celery_task, name)

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return self.celery_task(*args, **kwargs)

    def __reduce__(self) -> t.Any:
        # Pickle (and deepcopy) by reference: the proxy is a module global.
        return (_import_global, (self._func.__module__, self._func.__qualname__))

    def __repr__(self) -> str:
        state = self._celery_task.name if self._celery_task is not None else "not scanned"
        return f"<websauna_tasks task {self._func.__qualname__} ({state})>"


def _import_global(module: str, qualname: str) -> t.Any:
    target: t.Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def task(*args: t.Any, **options: t.Any) -> t.Any:
    """Declare a Celery task found by ``config.scan()``.

    ``@task`` and ``@task(base=..., bind=True, name=..., queue=...)`` both
    work; every option goes to ``celery.Celery.task``. The default base is
    :class:`ScheduleOnCommitTask`.
    """
    def decorate(func: t.Callable[..., t.Any], depth: int = 1) -> TaskProxy:
        proxy = TaskProxy(func, options)

        def on_scan(scanner: t.Any, name: str, ob: TaskProxy) -> None:
            config = getattr(scanner, "config", None)
            if config is None:
                raise ConfigurationError("websauna_tasks.task: scanned without a Pyramid Configurator")
            ob.bind_to_app(get_celery(config.registry))

        # Category "pyramid": a plain config.scan() only runs that category.
        # depth: venusian must see the frame of the module that declares the task.
        venusian.attach(proxy, on_scan, category="pyramid", depth=depth)
        return proxy

    if len(args) == 1 and callable(args[0]) and not options:
        return decorate(args[0], depth=2)
    if args:
        raise TypeError("task() takes keyword options only, e.g. @task(base=TransactionalTask, bind=True)")
    return decorate
