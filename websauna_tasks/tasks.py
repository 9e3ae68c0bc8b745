"""The ``@task`` decorator and the task base classes."""
from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib
import inspect
import logging
import threading
import typing as t

import celery
import transaction
import venusian
from celery._state import _task_stack
from celery.exceptions import Reject, Retry
from pyramid.exceptions import ConfigurationError
from pyramid.request import Request
from pyramid.threadlocal import get_current_registry
from pyramid.threadlocal import manager as threadlocal_manager

from . import async_dispatch, dispatch
from .cancel import cancelled_message
from .dispatch import transaction_to_wait_for
from .events import notify_task_finished
from .idempotency import check_idempotent_class, claim_run
from .observability import hooks
from .outages import retry_after_outage
from .outbox import note_failed_run
from .progress import end_progress, report_progress
from .queues import mark_gave_up, run_in_queue
from .registry import ICeleryApp, get_celery
from .request import current_task_request, task_request
from .retry import DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, Retrying
from .retry import is_transient as is_transient  # its home before retry.py
from .schedule import periodic_entry
from .settings import DEFAULT_RETRY_ATTEMPTS as DEFAULT_RETRY_ATTEMPTS
from .settings import RETRY_ATTEMPTS_KEY as RETRY_ATTEMPTS_KEY
from .settings import get_task_settings
from .state import find_state

logger = logging.getLogger(__name__)

# RETRY_ATTEMPTS_KEY (imported above from settings.py): default number of attempts for
# RetryableTransactionTask (DEFAULT_RETRY_ATTEMPTS).

_MISSING: t.Any = object()


def _run_to_completion(coroutine: t.Coroutine[t.Any, t.Any, t.Any]) -> t.Any:
    """Run an ``async def`` task body to its end and return its result.

    A fresh event loop per run, closed afterwards (rather than one loop kept
    per thread): whatever the body leaves behind (tasks it spawned, async
    generators) is cancelled and closed when the run ends, as after a sync
    body, nothing bound to a loop survives into the next run or across a
    prefork fork, and a loop costs well under a millisecond to create and
    close (about 0.07 ms measured), little next to a task's database round
    trips. A long-lived async client must therefore be made inside the
    body, not cached in a module global.

    When the calling thread already runs a loop (eager mode called from
    async code, a test under pytest-asyncio), a second loop cannot run in
    that thread, and the caller is synchronous, so it cannot await either:
    the body runs in a helper thread while the caller waits. That thread
    gets a copy of the caller's context variables (the task request of
    ``get_request()`` lives in one), Pyramid's thread locals and Celery's
    (``current_task``, the task's ``self.request``).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_in_new_loop(coroutine)
    return _run_in_helper_thread(coroutine)


def _run_in_new_loop(coroutine: t.Coroutine[t.Any, t.Any, t.Any]) -> t.Any:
    runner = getattr(asyncio, "Runner", None)
    if runner is None:  # Python 3.10
        return asyncio.run(coroutine)
    # loop_factory: unlike asyncio.run(), the Runner then leaves the thread's
    # current event loop alone (asyncio.run() resets it to None on exit).
    with runner(loop_factory=asyncio.new_event_loop) as loop_runner:
        return loop_runner.run(coroutine)


def _run_in_helper_thread(coroutine: t.Coroutine[t.Any, t.Any, t.Any]) -> t.Any:
    context = contextvars.copy_context()
    pyramid_locals = threadlocal_manager.get()
    # Celery keeps the running task and its request on thread-local stacks
    # (_task_stack is what celery.current_task reads); the same objects are
    # pushed in the helper thread, the caller being blocked meanwhile.
    current = _task_stack.top
    celery_request = current.request_stack.top if current is not None else None
    outcome: dict[str, t.Any] = {}

    def target() -> None:
        threadlocal_manager.push(pyramid_locals)
        if current is not None:
            _task_stack.push(current)
            if celery_request is not None:
                current.request_stack.push(celery_request)
        try:
            outcome["result"] = context.run(_run_in_new_loop, coroutine)
        except BaseException as exc:  # handed to the waiting caller, which raises it
            outcome["error"] = exc
        finally:
            if current is not None:
                if celery_request is not None:
                    current.request_stack.pop()
                _task_stack.pop()
            threadlocal_manager.pop()

    thread = threading.Thread(target=target, name="websauna_tasks-async-body", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        error = outcome.pop("error")
        try:
            raise error
        finally:
            del error  # no reference cycle through the traceback
    return outcome["result"]


def _synchronous_run(body: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
    """A sync ``run`` around an ``async def`` body."""
    @functools.wraps(body)
    def run(*args: t.Any, **kwargs: t.Any) -> t.Any:
        return _run_to_completion(body(*args, **kwargs))

    return run


def _call_body(task: celery.Task, args: tuple, kwargs: dict) -> t.Any:
    """``celery.Task.__call__``, whose result is never a coroutine.

    ``async def`` bodies are already made synchronous at class creation (see
    ``WebsaunaTask.__init_subclass__``). A coroutine can still come back from
    a sync ``run`` that returns one (``return fetch(url)`` without await, or
    a wrapper such as Celery's ``pydantic=True`` around an async function):
    it is run here, since Celery could neither store nor send it.

    Inside a run framed by ``WebsaunaTask._run_in_context`` the run already
    has a Celery context of its own (the worker's, or one pushed for a direct
    call) and is the current task, so ``run`` is called as Celery's worker
    calls a task without a ``__call__`` of its own: without
    ``celery.Task.__call__``'s copy of the whole context, which was the
    costliest step of a no-op run (about 7 us).
    """
    context = task.request_stack.top
    if context is not None and getattr(context, "request", None) is not None:
        result = task.run(*args, **kwargs)
    else:
        result = celery.Task.__call__(task, *args, **kwargs)
    if inspect.iscoroutine(result):
        result = _run_to_completion(result)
    return result


class WebsaunaTask(celery.Task):
    """Base of every websauna_tasks task: each run gets its own Pyramid request.

    The request is made when the run starts (worker or eager), is available
    as :meth:`get_request` and is closed when the run ends, which closes its
    database session.
    """

    #: True when the body (``run``) was written as ``async def``.
    async_body: bool = False
    #: ``@task(idempotent=True)``: skip a redelivered run whose task id already
    #: committed (TransactionalTask and subclasses only; websauna_tasks.idempotency).
    idempotent: bool = False

    def __init_subclass__(cls, **kwargs: t.Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("idempotent"):
            check_idempotent_class(cls, TransactionalTask)
        # Celery's app.task() makes a subclass per decorated function with
        # the function as ``run`` (a staticmethod unless bind=True); class
        # based tasks define ``run`` themselves. An ``async def`` run is
        # replaced here by a sync one that runs the coroutine to its end.
        # It has to be this layer, not the callers of run: Celery's request
        # context (``self.request``) is popped when run() returns, and
        # autoretry_for wraps run() and would otherwise see a coroutine
        # instead of the body's exception.
        run = cls.__dict__.get("run")
        if isinstance(run, staticmethod) and inspect.iscoroutinefunction(run.__func__):
            cls.run = staticmethod(_synchronous_run(run.__func__))
            cls.async_body = True
        elif inspect.iscoroutinefunction(run):
            cls.run = _synchronous_run(run)
            cls.async_body = True

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        state = find_state(self.app)
        if state is None:
            # A plain Celery app without includeme: behave like celery.Task.
            return _call_body(self, args, kwargs)
        observer = state.observer
        if observer is None and state.queues is None:
            return self._run_with_request(state.registry, args, kwargs)
        run = functools.partial(self._run_with_request, state.registry, args, kwargs)
        if observer is not None:
            # Metrics and tracing watch the run from outside its request (observability/hooks.py).
            run = functools.partial(observer.run, self, run)
        if state.queues is not None:
            # Declared queues: rate, concurrency and attempts gate the run.
            return run_in_queue(self, run)
        return run()

    def _run_with_request(self, registry: t.Any, args: tuple, kwargs: dict) -> t.Any:
        try:
            with task_request(registry) as request:
                try:
                    result = self._run_in_context(request, args, kwargs)
                except BaseException as exc:
                    notify_task_finished(self, request, exc=exc)
                    raise
                notify_task_finished(self, request, result)
                return result
        finally:
            # Before Celery stores the result: a held progress figure must not be written over it (progress.py).
            end_progress(self)

    def _run_in_context(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        """The body with ``request`` on Celery's context (``self.request.request``)."""
        context = self.request_stack.top
        if context is None or getattr(context, "request", None) is not None:
            # Called directly (task(...)): no Celery context to carry the request; or called directly
            # from inside a run of this task, whose context is that run's. A context of our own
            # (a copy of the current one, as celery.Task.__call__ makes, keeping an outer run's headers),
            # and the task current.
            own = {"headers": {}} if context is None else {}
            self.push_request(request=request, args=args, kwargs=kwargs, **own)
            _task_stack.push(self)
            try:
                return self.run_in_request(request, args, kwargs)
            finally:
                _task_stack.pop()
                self.pop_request()
        # Websauna's ``self.request.request``, on the worker's context of this run, which the body then
        # sees as it is (_call_body). With headers None a copy of it (a retry's, push_request's) would
        # take every attribute Celery does not know, the request included, for custom message headers,
        # which a retry would then send. None and {} mean the same to Celery.
        context.request = request
        if context.headers is None:
            context.headers = {}
        return self.run_in_request(request, args, kwargs)

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        """Run the body; subclasses wrap this in a transaction.

        An ``async def`` body has completed when this returns: a
        transaction around it commits after the coroutine's end.
        """
        return _call_body(self, args, kwargs)

    def get_request(self) -> Request:
        """The Pyramid request of the current run."""
        request = current_task_request()
        if request is None:
            raise RuntimeError(
                f"{self.name}: get_request() is only available while the task runs "
                "(in a worker or in eager mode), not when it is called to be scheduled"
            )
        return request

    def is_cancelled(self) -> bool:
        """Whether this run's task id was cancelled (``websauna_tasks.cancel``): poll it to stop cooperatively."""
        state = find_state(self.app)
        task_id = self.request.id
        return bool(task_id) and state is not None and cancelled_message(state.registry, task_id)

    def set_progress(self, done: float, total: float, note: str | None = None) -> bool:
        """Report ``done`` of ``total`` for ``task_progress``; throttled, True when written (progress.py)."""
        return report_progress(self, done, total, note)

    def retry(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        """Celery's ``retry``; an error it raises because the task's retries ran out stays final.

        A declared queue's attempts (``websauna_tasks.queues``) must not
        re-run what the task's own ``max_retries``/``autoretry_for`` gave up on.
        """
        try:
            return super().retry(*args, **kwargs)
        except (Retry, Reject):
            raise
        except Exception as exc:
            mark_gave_up(exc)
            raise

    def send_now(self, args: t.Any = None, kwargs: t.Any = None, **options: t.Any) -> celery.result.AsyncResult:
        """Publish immediately, bypassing any transaction and the checks of :meth:`apply_async`.

        The message goes to the app's publisher (``dispatch.publisher_of``):
        Celery's ``apply_async`` by default, a test client's capture under test.
        """
        return dispatch.send_now(self, args, kwargs, options)

    #: The send_now above: a subclass that replaces it has every message pass
    #: through its own (the pipeline's fast sender compares the two).
    plain_send_now = send_now

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
        """Send after ``tm`` commits when ``tm`` is given; ``tm=None`` sends now.

        ``unique_name="..."``: while a task of that name is pending, send
        nothing and return the pending task's result (``raise_if_enqueued=True``
        raises :class:`~websauna_tasks.names.AlreadyEnqueued` instead).
        """
        for name, value in (("link", link), ("link_error", link_error), ("shadow", shadow)):
            if value is not None:
                options[name] = value
        unique_name = options.pop("unique_name", None)
        raise_if_enqueued = options.pop("raise_if_enqueued", False)
        if tm is _MISSING:
            # producer=: Celery beat. parent_id: the worker sending the next
            # step of a chain or a link callback once the previous task has
            # finished (and, for transactional tasks, committed).
            if producer is not None or "parent_id" in options or not self.require_tm:
                tm = None
            else:
                tm = dispatch.MISSING
        # The checks, the name claim and the way out: websauna_tasks.dispatch.
        return dispatch.send(self, args, kwargs, options, tm=tm, task_id=task_id, producer=producer,
                             unique_name=unique_name, raise_if_enqueued=raise_if_enqueued,
                             check_call=self._check_arguments if self.typing else None)

    def defer(self, *args: t.Any, **kwargs: t.Any) -> str:
        """Procrastinate's call shape: ``task.defer(*args, **kwargs)`` returns the task id.

        Sent after the commit when a transaction is active (the current
        request's ``tm``, or the thread's ``transaction.manager``), at once
        otherwise. For options, use :meth:`apply_async`.
        """
        return self.apply_async(args, kwargs, tm=transaction_to_wait_for(None)).id

    #: Taiga's name for the sync call (``sample_task.defer_sync(1, 2)``), where ``defer`` is the async one.
    defer_sync = defer

    def defer_async(self, *args: t.Any, **kwargs: t.Any) -> t.Coroutine[t.Any, t.Any, str]:
        """``await task.defer_async(*args, **kwargs)``: :meth:`defer` from a coroutine, returns the task id.

        The transaction is the one active at the call; a message sent now is
        published off the event loop (websauna_tasks/async_dispatch.py).
        RuntimeError at the call when no event loop is running.
        """
        return async_dispatch.defer_task(self, args, kwargs)

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
    """The body runs in the request's transaction: commit on return, abort on raise.

    At-least-once (docs/RELIABILITY.md): the message is acknowledged after
    the run (``acks_late``) and put back when the worker process dies
    mid-run (``reject_on_worker_lost``), so a run whose transaction never
    committed is run again. ``idempotent=True`` makes a redelivery of a run
    that did commit a no-op.
    """

    acks_late = True
    reject_on_worker_lost = True

    def _run_in_context(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        try:
            return super()._run_in_context(request, args, kwargs)
        except Exception as exc:
            # Lost or refused database connection: raises Celery's Retry, the
            # run is sent again later (websauna_tasks.outages).
            retry_after_outage(self, exc)
            raise

    def on_failure(self, exc: Exception, task_id: str, args: t.Any, kwargs: t.Any, einfo: t.Any) -> None:
        if self.idempotent and not self.request.is_eager:
            # Failed for good: the outbox must not take its missing done-row for a lost message.
            note_failed_run(self, task_id)
        super().on_failure(exc, task_id, args, kwargs, einfo)

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        with request.tm:
            if self.idempotent and not claim_run(request, self):
                return None
            return _call_body(self, args, kwargs)


class RetryableTransactionTask(TransactionalTask):
    """Like :class:`TransactionalTask`, re-running the body on transient conflicts.

    PostgreSQL serialization failures and deadlocks (SQLSTATE class 40) and
    :class:`transaction.interfaces.TransientError` start a new transaction
    after a short jittered pause, ``retry_attempts`` times in all.
    """

    #: Attempts in all; None means the ``websauna_tasks.retry_attempts`` setting (default 3).
    retry_attempts: int | None = None
    #: First back-off in seconds; doubled each attempt, with full jitter.
    retry_backoff_base: float = DEFAULT_BACKOFF_BASE
    retry_backoff_max: float = DEFAULT_BACKOFF_MAX

    def get_retry_attempts(self, request: Request) -> int:
        if self.retry_attempts is not None:
            return int(self.retry_attempts)
        return get_task_settings(request.registry).retry_attempts

    def run_in_request(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        # The loop of websauna_tasks.retryable (retry.py): one notion of transient, one back-off.
        retrying = Retrying(request.tm, attempts=self.get_retry_attempts(request),
                            backoff_base=self.retry_backoff_base, backoff_max=self.retry_backoff_max,
                            on_retry=self._conflict_retry, name=self.name)
        return retrying.run(self._attempt, request, args, kwargs)

    def _conflict_retry(self, attempt: int, exc: BaseException) -> None:
        if hooks.watching:
            observer = hooks.observer_of(self.app)
            if observer is not None:
                hooks.safely(observer.conflict_retried, self, attempt)
        self.on_conflict_retry(attempt, exc)

    def _attempt(self, request: Request, args: tuple, kwargs: dict) -> t.Any:
        if self.idempotent and not claim_run(request, self):
            return None
        # A fresh coroutine per attempt: _call_body calls the body anew.
        return _call_body(self, args, kwargs)

    def on_conflict_retry(self, attempt: int, exc: BaseException) -> None:
        """Called before each re-run; a hook for metrics."""


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

    def __init__(self, func: t.Callable[..., t.Any], options: dict[str, t.Any],
                 periodic: dict[str, t.Any] | None = None):
        functools.update_wrapper(self, func)
        self._func = func
        self._options = options
        #: ``periodic``, ``args``, ``kwargs``, ``options`` of @task(periodic=...), else None.
        self._periodic = periodic
        self._celery_task: celery.Task | None = None
        self._by_app: dict[int, celery.Task] = {}

    @property
    def declaration(self) -> str:
        """``module.qualname`` of the decorated function, as error messages name it."""
        return f"{self._func.__module__}.{self._func.__qualname__}"

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
        # The name Celery will give the task (its own rule), known before
        # binding so that a clash is refused before the app is changed.
        name = options.get("name") or app.gen_task_name(self._func.__name__, self._func.__module__)
        owners = _periodic_owners(app)
        entry = None
        if self._periodic is not None:
            where = f"@task {self.declaration} (task {name!r})"
            entry = periodic_entry(name, where=where, **self._periodic)
            existing = (app.conf.beat_schedule or {}).get(name)
            if existing is not None and name not in owners:
                task_name = existing.get("task") if isinstance(existing, dict) else None
                raise ConfigurationError(
                    f"{where}: its periodic schedule would be the beat_schedule entry {name!r}, but the settings "
                    f"(websauna.celery_config or celery.beat_schedule) already have an entry {name!r} "
                    f"(task {task_name!r}); rename that entry or give the task another name="
                )
        other = owners.get(name)
        if other is not None and other != self.declaration:
            # Also when this one is not periodic: Celery would hand it the
            # other function's task, and beat would run one body for two.
            raise ConfigurationError(
                f"@task {self.declaration} and @task {other} (periodic) are both named {name!r}; a periodic "
                f"task's beat_schedule entry takes the task's name, so give one of them another name="
            )
        # shared=False: Celery would otherwise add the task to every app
        # created later in the process; lazy=False: bind now, not on first use.
        celery_task = app.task(self._func, shared=False, lazy=False, **options)
        if entry is not None:
            self._add_periodic_entry(app, celery_task, entry, owners)
        self._celery_task = celery_task
        self._by_app = {key: bound for key, bound in self._by_app.items() if bound.app is not app}
        self._by_app[id(app)] = self._celery_task
        return self._celery_task

    def _add_periodic_entry(self, app: celery.Celery, celery_task: celery.Task, entry: dict[str, t.Any],
                            owners: dict[str, str]) -> None:
        name = entry["task"]
        where = f"@task {self.declaration} (task {name!r})"
        # Celery returns the task already registered under a name instead of
        # making a new one: beat would then run that other function.
        bound = f"{type(celery_task).__module__}.{getattr(celery_task, '__qualname__', type(celery_task).__name__)}"
        if bound != self.declaration:
            raise ConfigurationError(
                f"{where}: periodic, but the name {name!r} is already taken by {bound} in this Celery app, "
                "which beat would run instead; give one of them another name="
            )
        # Checked now rather than in the worker at every tick, as the INI
        # entries' schedules are.
        if celery_task.typing:
            try:
                celery_task._check_arguments(tuple(entry.get("args", ())), dict(entry.get("kwargs", {})))
            except TypeError as exc:
                raise ConfigurationError(
                    f"{where}: periodic_args/periodic_kwargs do not fit the task's signature: {exc}"
                ) from None
        # A new dict rather than an update in place: the app's dict stays
        # its own even if it came from somewhere shared.
        app.conf.beat_schedule = {**(app.conf.beat_schedule or {}), name: entry}
        owners[name] = self.declaration

    def __getattr__(self, name: str) -> t.Any:
        if name.startswith("__") or name in ("_by_app", "_celery_task", "_periodic", "_func", "_options"):
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


def _periodic_owners(app: celery.Celery) -> dict[str, str]:
    """Entry name -> ``module.qualname`` of the @task that put it in this app's beat_schedule.

    Kept in the app's state (state.py), so two apps built in one process (tests do)
    never see each other's entries, and a name already owned by the same
    function (its module scanned again into the same app) is no clash. An
    entry of the beat_schedule that is not in here came from the settings.
    """
    state = find_state(app)
    # A plain Celery app (no includeme) has no settings entries to clash with.
    return state.periodic_owners if state is not None else {}


def _import_global(module: str, qualname: str) -> t.Any:
    target: t.Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


#: ``@task`` options that are ours, not Celery's: the task's beat schedule entry.
PERIODIC_OPTIONS = ("periodic", "periodic_args", "periodic_kwargs", "periodic_options")


def task(*args: t.Any, **options: t.Any) -> t.Any:
    """Declare a Celery task found by ``config.scan()``.

    ``@task`` and ``@task(base=..., bind=True, name=..., queue=...)`` both
    work; every option goes to ``celery.Celery.task``. The default base is
    :class:`ScheduleOnCommitTask`. The body may be ``async def``.

    ``periodic=`` (a five-field cron string, a ``timedelta``, seconds, a
    ``crontab(...)`` or ``schedule(...)``) also adds the task to beat's
    schedule, under the task's name, when ``config.scan()`` binds it;
    ``periodic_args``, ``periodic_kwargs`` and ``periodic_options`` (e.g.
    ``{"expires": 60}``) are what beat sends it with. These stay ours: Celery
    never sees them.
    """
    periodic: dict[str, t.Any] | None = None
    given = {key: options.pop(key) for key in PERIODIC_OPTIONS if key in options}
    if given.get("periodic") is not None:
        periodic = {"periodic": given.pop("periodic")}
        for key, value in given.items():
            periodic[key.removeprefix("periodic_")] = value
    else:
        companions = sorted(key for key, value in given.items() if key != "periodic" and value is not None)
        if companions:
            # A schedule forgotten or misspelt: refused where it is written.
            raise TypeError(f"task(): {', '.join(companions)} without periodic= (the schedule) has no effect")

    def decorate(func: t.Callable[..., t.Any], depth: int = 1) -> TaskProxy:
        proxy = TaskProxy(func, options, periodic)

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
