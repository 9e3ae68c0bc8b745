"""Test helpers, also loaded as a pytest plugin (entry point ``websauna_tasks``).

- ``wait_for(predicate, timeout=30)``: poll until an effect appears.
- :class:`TaskClient`: captures every task message the code under test would
  send (``@task`` on-commit dispatch, ``send_now``, ``defer()``) and runs them
  in-process on demand, as a worker would.

Fixtures:

- ``task_client``: a :class:`TaskClient` active for one test.
- ``ws_celery_worker_factory``: start a real ``ws-celery INI -- worker``
  process for integration tests and stop it afterwards.

This module is imported when pytest starts (it is a plugin), before any
coverage measurement begins, so it imports the rest of ``websauna_tasks``
(and with it Celery, Pyramid and SQLAlchemy) only inside the functions that
need it: importing them here would hide their module-level lines from
coverage and slow down every pytest run of an environment where the
package is merely installed.
"""
from __future__ import annotations

import collections
import datetime as dt
import enum
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import typing as t
from dataclasses import dataclass, field

import pytest

if t.TYPE_CHECKING:
    from celery import Celery, Task

    from .dispatch import PendingMessage, Publisher

logger = logging.getLogger(__name__)

__all__ = [
    "wait_for",
    "TaskClient",
    "Job",
    "TaskFailedBehaviour",
    "TaskFailedError",
    "DrainLimitExceeded",
    "WorkerProcess",
    "task_client",
    "ws_celery_worker_factory",
]


def wait_for(predicate: t.Callable[[], t.Any], timeout: float = 30.0, interval: float = 0.1,
             describe: t.Callable[[], str] = lambda: "") -> t.Any:
    """Poll ``predicate()`` until it returns something truthy, and return that.

    For integration tests whose effect appears when a worker gets to it:
    fails with ``AssertionError`` (and ``describe()``, e.g. the worker's log)
    after ``timeout`` seconds rather than sleeping a fixed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s\n{describe()}".rstrip())
        time.sleep(interval)


# -- the task client -------------------------------------------------------------------------

class TaskFailedBehaviour(enum.Enum):
    """What a drain does with a job that raises (the names of djangae's ``TaskFailedBehaviour``).

    A string value works wherever a member does: ``failure_behaviour="retry"``.
    """

    #: Mark the job failed, stop the drain and raise :class:`TaskFailedError` (the default).
    RAISE_ERROR = "raise"
    #: Mark the job failed and go on with the other jobs.
    DO_NOTHING = "continue"
    #: Put the job back at the end of its queue, ``max_attempts`` runs in all; then as ``RAISE_ERROR``.
    RETRY_TASK = "retry"


class TaskFailedError(Exception):
    """A drained job raised; ``job`` is its record and ``original_exception`` (also ``__cause__``) the error."""

    def __init__(self, job: Job, message: str):
        super().__init__(message)
        self.job = job
        self.original_exception = job.error


class DrainLimitExceeded(RuntimeError):
    """One drain ran ``max_runs`` jobs and more were still pending: jobs that keep scheduling jobs."""


#: Job states, Procrastinate's names: ``todo`` (pending), ``doing`` (running now), and the finished two.
TODO, DOING, SUCCEEDED, FAILED = "todo", "doing", "succeeded", "failed"

_RECORD_FIELDS = ("id", "queue_name", "task_name", "args", "kwargs", "status", "scheduled_at", "attempts",
                  "function", "unique_name", "options", "captured_at", "result", "error", "traceback")


@dataclass(eq=False)
class Job:
    """One captured message and what became of it.

    Readable as attributes or, like Procrastinate's job rows, by key
    (``job["status"]``).
    """

    #: The task id: what ``apply_async(...).id`` and ``defer()`` returned, and ``self.request.id`` in the run.
    id: str
    #: The queue a worker would have taken it from (after routing; ``celery`` unless configured).
    queue_name: str
    task_name: str
    #: The task's arguments; for ``defer()`` the function's own arguments.
    args: tuple
    kwargs: dict
    #: When it may run: from ``countdown``/``eta`` (UTC), else the capture time.
    scheduled_at: dt.datetime
    #: When the message would have reached the broker (after the commit, for on-commit dispatch).
    captured_at: dt.datetime
    status: str = TODO
    #: Runs so far.
    attempts: int = 0
    #: ``module:qualname`` of the deferred function (``defer()`` jobs only).
    function: str | None = None
    #: The ``unique_name=`` / ``_name=`` the message claimed, if any.
    unique_name: str | None = None
    #: The message's options as the caller gave them (``queue``, ``countdown``, ``headers``...).
    options: dict = field(default_factory=dict)
    #: The return value of a succeeded run.
    result: t.Any = None
    #: The exception of the last failed run.
    error: BaseException | None = None
    #: The formatted traceback of the last failed run.
    traceback: str | None = field(default=None, repr=False)
    message: PendingMessage | None = field(default=None, repr=False)
    _order: int = field(default=0, repr=False)
    _also_default: bool = field(default=False, repr=False)

    def __getitem__(self, key: str) -> t.Any:
        if key not in _RECORD_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def in_queue(self, queue: str | None) -> bool:
        """True when ``queue`` names this job's queue; ``"default"`` also names the app's default queue."""
        return queue is None or queue == self.queue_name or (queue == "default" and self._also_default)

    def __repr__(self) -> str:
        what = self.function or self.task_name
        return f"<Job {what}[{self.id}] queue={self.queue_name} status={self.status} attempts={self.attempts}>"


class TaskClient:
    """Captures the task messages the code under test would send, and runs them on demand.

    While active (``with TaskClient() as client``, or the ``task_client``
    fixture) it is the publisher of the send pipeline (``dispatch``) for
    ``apps`` (default: every app without a publisher of its own, including
    apps built while it is active): a message reaches it exactly when it
    would have reached the broker, so an on-commit message appears only once
    its transaction commits and never after an abort. Eager apps
    (``task_always_eager``) are captured too instead of running.
    ``app.send_task()`` and tasks that are not websauna_tasks tasks bypass it.

    ``drain_pending_jobs()`` runs jobs with Celery's ``task.apply()``: the
    task's own ``__call__``, a fresh task request and transaction, and the
    ``task_prerun``/``task_postrun`` signals, as in a worker. What those runs
    schedule is captured and run in the same drain.
    """

    def __init__(self, failure_behaviour: TaskFailedBehaviour | str = TaskFailedBehaviour.RAISE_ERROR,
                 max_attempts: int = 5, max_runs: int = 1000, apps: t.Iterable[Celery] | None = None):
        #: What a drain does with a job that raises; a drain's own argument wins.
        self.failure_behaviour = TaskFailedBehaviour(failure_behaviour)
        #: Runs of one job in all under ``RETRY_TASK``.
        self.max_attempts = max_attempts
        #: Runs one drain may make before it raises :class:`DrainLimitExceeded`.
        self.max_runs = max_runs
        self._jobs: dict[str, Job] = {}
        # Messages may come from another thread (an async task body runs
        # in a helper thread when a loop is already running).
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        #: The Celery apps whose messages it captures; None: every app without a publisher of its own.
        self.apps: tuple[Celery, ...] | None = None if apps is None else tuple(apps)
        # What each covered app (None: the default) sent to before activate().
        self._previous: list[tuple[Celery | None, Publisher | None]] = []
        self._active = False
        self._draining = False

    # -- being the sink -------------------------------------------------------------------

    def activate(self) -> TaskClient:
        """Become the publisher of the apps it covers, remembering theirs for :meth:`deactivate`."""
        from .dispatch import CapturingPublisher, set_publisher

        if self._active:
            raise RuntimeError("this TaskClient is already active")
        publisher = CapturingPublisher(self)
        self._previous = [(app, set_publisher(publisher, app)) for app in (self.apps or (None,))]
        self._active = True
        return self

    def deactivate(self) -> None:
        """Put the previous publishers back, and free the names claimed by jobs that never ran."""
        from .dispatch import set_publisher

        if not self._active:
            return
        for app, previous in reversed(self._previous):
            set_publisher(previous, app)
        self._previous = []
        self._active = False
        self._release_names(self.pending_jobs)

    def __enter__(self) -> TaskClient:
        return self.activate()

    def __exit__(self, *exc_info: t.Any) -> None:
        self.deactivate()

    @property
    def active(self) -> bool:
        return self._active

    def capture(self, message: PendingMessage) -> None:
        """Keep ``message`` as a pending job (called by its ``CapturingPublisher`` instead of publishing)."""
        job = _job_of(message)
        with self._lock:
            earlier = self._jobs.pop(job.id, None)
            if earlier is not None:
                # The same id sent again (a redelivery, a retry by hand):
                # one record per id, its runs counted on.
                job.attempts = earlier.attempts
            job._order = next(self._counter)
            self._jobs[job.id] = job

    # -- looking -----------------------------------------------------------------------------

    @property
    def jobs(self) -> dict[str, Job]:
        """Every job by id, in capture order (a copy: changing it changes nothing here)."""
        with self._lock:
            return dict(self._jobs)

    @property
    def pending_jobs(self) -> list[Job]:
        """Jobs waiting to run (``todo``), in the order a drain takes them."""
        return sorted(self._with_status(TODO), key=lambda job: job._order)

    @property
    def finished_jobs(self) -> list[Job]:
        """Succeeded and failed jobs."""
        return self._with_status(SUCCEEDED, FAILED)

    @property
    def succeeded_jobs(self) -> list[Job]:
        return self._with_status(SUCCEEDED)

    @property
    def failed_jobs(self) -> list[Job]:
        return self._with_status(FAILED)

    def _with_status(self, *statuses: str) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if job.status in statuses]

    def pending_job_count(self, queue: str | None = "default") -> int:
        """Jobs waiting in ``queue``: ``"default"`` is the app's default queue, None every queue."""
        return sum(1 for job in self.pending_jobs if job.in_queue(queue))

    def reset(self) -> None:
        """Forget every job; the names claimed by pending ones are freed, since they will never run."""
        with self._lock:
            pending = [job for job in self._jobs.values() if job.status == TODO]
            self._jobs.clear()
        self._release_names(pending)

    # -- running -------------------------------------------------------------------------------

    def drain_pending_jobs(self, queue: str | None = "default", *,
                           failure_behaviour: TaskFailedBehaviour | str | None = None,
                           include_future: bool | None = None, now: dt.datetime | None = None,
                           max_runs: int | None = None) -> list[Job]:
        """Run the pending jobs of ``queue`` (None: all queues), and those they schedule, until none is left.

        Jobs run oldest first. By default every pending job runs, even one
        whose ``scheduled_at`` lies in the future, as the fake clients of
        The Blue Alliance and Procrastinate do; ``include_future=False``
        runs only jobs due by ``now`` (default: the current time; giving
        ``now`` implies ``include_future=False``). Returns the jobs run.
        """
        behaviour = TaskFailedBehaviour(self.failure_behaviour if failure_behaviour is None else failure_behaviour)
        limit = self.max_runs if max_runs is None else max_runs
        if now is not None and now.tzinfo is None:
            raise ValueError("drain_pending_jobs(now=...) needs an aware datetime, e.g. datetime.now(timezone.utc)")
        if include_future is None:
            include_future = now is None
        if self._draining:
            # A job draining the client would run jobs inside another
            # job's run, which no worker ever does.
            raise RuntimeError("drain_pending_jobs() was called from inside a job it is running")
        ran: dict[str, Job] = {}
        runs = 0
        self._draining = True
        try:
            while True:
                due = None if include_future else (now or dt.datetime.now(dt.timezone.utc))
                job = self._next_job(queue, due)
                if job is None:
                    return list(ran.values())
                if runs >= limit:
                    raise DrainLimitExceeded(self._limit_message(queue, limit))
                runs += 1
                ran[job.id] = job
                self._run(job, behaviour)
        finally:
            self._draining = False

    def run_pending_jobs(self, *, failure_behaviour: TaskFailedBehaviour | str | None = None,
                         include_future: bool | None = None, now: dt.datetime | None = None,
                         max_runs: int | None = None) -> list[Job]:
        """Drain every queue (Procrastinate's test manager's name)."""
        return self.drain_pending_jobs(None, failure_behaviour=failure_behaviour, include_future=include_future,
                                       now=now, max_runs=max_runs)

    def _next_job(self, queue: str | None, due: dt.datetime | None) -> Job | None:
        for job in self.pending_jobs:
            if job.in_queue(queue) and (due is None or job.scheduled_at <= due):
                return job
        return None

    def _limit_message(self, queue: str | None, limit: int) -> str:
        left = [job for job in self.pending_jobs if job.in_queue(queue)]
        common = collections.Counter(job.function or job.task_name for job in left).most_common(3)
        names = ", ".join(f"{name} x{count}" for name, count in common)
        where = "all queues" if queue is None else f"queue {queue!r}"
        return (f"drain_pending_jobs() ran {limit} jobs of {where} and {len(left)} are still pending ({names}): "
                "do jobs keep scheduling each other? Raise max_runs= if the work is really that long")

    def _run(self, job: Job, behaviour: TaskFailedBehaviour) -> None:
        from celery import states

        message = job.message
        assert message is not None
        task = message.task
        options = message.options
        job.status = DOING
        job.attempts += 1
        try:
            args, kwargs = _through_the_wire(task, options, message.args, message.kwargs)
        except Exception as exc:
            # A real send would have failed: never let a test pass on
            # arguments that cannot reach a worker.
            self._failed(job, exc, None, behaviour)
            return
        # What a worker would find in the message: headers (the claimed
        # task name lives there; task_postrun frees it after the run),
        # link callbacks and the rest of a chain. Options that only matter
        # to a broker or to the sending side (producer, throw, queue,
        # countdown, serializer...) have no meaning here.
        extra = {key: options[key] for key in ("link", "link_error", "ignore_result") if options.get(key) is not None}
        result = task.apply(args, kwargs, task_id=job.id, headers=options.get("headers"), throw=False, **extra)
        if result.state in (states.SUCCESS, states.IGNORED):
            job.status = SUCCEEDED
            job.result = result.result
            self._continue_chain(task, job, options.get("chain"), result.result)
            return
        error = result.result if isinstance(result.result, BaseException) else RuntimeError(
            f"{job.task_name} ended in state {result.state}: {result.result!r}")
        self._failed(job, error, result.traceback, behaviour)

    def _failed(self, job: Job, error: BaseException, traceback: str | None, behaviour: TaskFailedBehaviour) -> None:
        job.error = error
        job.traceback = traceback
        if behaviour is TaskFailedBehaviour.RETRY_TASK and job.attempts < self.max_attempts:
            # Back to the end of the line, as djangae does.
            with self._lock:
                job.status = TODO
                job._order = next(self._counter)
            return
        job.status = FAILED
        if behaviour is TaskFailedBehaviour.DO_NOTHING:
            return
        runs = f"all {job.attempts} attempts" if behaviour is TaskFailedBehaviour.RETRY_TASK else "its run"
        raise TaskFailedError(job, f"{job!r} failed on {runs}: {error!r}") from error

    @staticmethod
    def _continue_chain(task: Task, job: Job, chain: t.Any, retval: t.Any) -> None:
        # Celery's tracer sends the next step of a chain from the message,
        # but apply() does not carry the chain into its request: send it
        # here, as the worker does (its call has parent_id, so it is sent
        # now and so captured).
        if not chain:
            return
        from celery import signature

        steps = list(chain)
        signature(steps[-1], app=task.app).apply_async(
            (retval,), chain=steps[:-1], parent_id=job.id, root_id=job.id)

    def _release_names(self, jobs: t.Iterable[Job]) -> None:
        from .names import release_name

        for job in jobs:
            if job.unique_name and job.message is not None:
                try:
                    release_name(job.message.task.app, job.unique_name, job.id)
                except Exception:
                    logger.exception("websauna_tasks: could not free the task name of %r", job)


def _job_of(message: PendingMessage) -> Job:
    from .defer import DEFERRED_TASK_NAME
    from .names import NAME_HEADER

    task = message.task
    options = dict(message.options)
    captured_at = dt.datetime.now(dt.timezone.utc)
    queue_name, also_default = _queue_of(message)
    args, kwargs, function = message.args, message.kwargs, None
    if task.name == DEFERRED_TASK_NAME and len(args) == 3 and isinstance(args[0], str):
        # A deferred call is (path, args, kwargs) to the one runner task:
        # the record shows the function's own call.
        function, args, kwargs = args[0], tuple(args[1] or ()), dict(args[2] or {})
    return Job(
        id=message.task_id, queue_name=queue_name, task_name=task.name, args=tuple(args), kwargs=dict(kwargs),
        scheduled_at=_scheduled_at(task.app, options, captured_at), captured_at=captured_at, function=function,
        unique_name=(options.get("headers") or {}).get(NAME_HEADER), options=options, message=message,
        _also_default=also_default,
    )


def _through_the_wire(task: Task, options: dict[str, t.Any], args: tuple, kwargs: dict) -> tuple[t.Any, t.Any]:
    """The arguments as a worker receives them: encoded with the message's serializer and decoded.

    Tuples arrive as lists, and an argument the serializer cannot encode
    (or the app does not accept) fails here as it would on a real send.
    """
    from kombu.serialization import dumps, loads, prepare_accept_content

    app = task.app
    serializer = options.get("serializer") or task.serializer or app.conf.task_serializer
    content_type, encoding, payload = dumps([list(args), dict(kwargs)], serializer=serializer)
    accept = prepare_accept_content(app.conf.accept_content)
    decoded_args, decoded_kwargs = loads(payload, content_type, encoding, accept=accept)
    return tuple(decoded_args), decoded_kwargs


def _queue_of(message: PendingMessage) -> tuple[str, bool]:
    """The queue Celery would send ``message`` to, and whether that is the app's default queue.

    The task's own options (``@task(queue=...)``) under the call's, then
    Celery's router (``task_routes``), as ``Task.apply_async`` and
    ``send_task`` combine them.
    """
    task = message.task
    app = task.app
    options = {key: value for key, value in {**task._get_exec_options(), **message.options}.items()
               if value is not None}
    wanted = options.get("queue")
    try:
        routed = app.amqp.router.route(options, task.name, message.args, message.kwargs, task)
        queue = routed.get("queue")
    except Exception:
        # An undeclared queue with task_create_missing_queues off: a real
        # send would fail; the name asked for is the best answer here.
        queue = wanted
    name = getattr(queue, "name", queue) or app.conf.task_default_queue
    # "default" names the default queue unless the app has a queue of that
    # name, the rule defer(_queue="default") follows.
    also_default = name == app.conf.task_default_queue and "default" not in app.amqp.queues
    return str(name), also_default


def _scheduled_at(app: Celery, options: dict[str, t.Any], captured_at: dt.datetime) -> dt.datetime:
    from .reliability import read_eta

    countdown = options.get("countdown")
    if countdown is not None:
        return captured_at + dt.timedelta(seconds=float(countdown))
    # The worker's reading of the eta (a naive one included), as the send pipeline's.
    eta = read_eta(app, options.get("eta"))
    if eta is not None:
        return eta.astimezone(dt.timezone.utc)
    return captured_at


@pytest.fixture
def task_client() -> t.Iterator[TaskClient]:
    """A :class:`TaskClient` capturing every task message of the test.

    The previous publisher is put back at teardown, whether the test
    passed or failed, and names claimed by jobs that never ran are freed.
    """
    with TaskClient() as client:
        yield client


# -- a real worker ------------------------------------------------------------------------------

class WorkerProcess:
    """A ``ws-celery INI -- <command>`` subprocess with its output in a log file."""

    def __init__(self, ini: str, command: t.Sequence[str], log_path: str, env: dict[str, str] | None = None):
        self.ini = ini
        self.command = list(command)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        argv = [sys.executable, "-m", "websauna_tasks.cli", ini, "--", *self.command]
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as log:
            return log.read().decode("utf-8", "replace")

    def wait_for_output(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"ws-celery exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"ws-celery did not print {text!r} within {timeout}s:\n{self.output()[-4000:]}")

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting for it."""
        if self.process.poll() is None:
            # SIGTERM to the main process only, which stops its own pool.
            # Signalling the whole group kills pool children while one may
            # hold the pool's queue lock, and billiard's parent then hangs on
            # that lock at exit (or forks replacements and keeps working).
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int:
        """Warm shutdown, then SIGKILL to the whole group after ``timeout``."""
        self.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode


@pytest.fixture
def ws_celery_worker_factory(tmp_path: t.Any) -> t.Iterator[t.Callable[..., WorkerProcess]]:
    """Start ``ws-celery INI -- worker ...`` processes; all are stopped at teardown.

    ``factory(ini, "worker", "-c", "2")`` returns a :class:`WorkerProcess`
    once the worker reports it is ready.
    """
    started: list[WorkerProcess] = []

    def factory(ini: str, *command: str, ready: str | None = "ready.", env: dict[str, str] | None = None,
                timeout: float = 60.0) -> WorkerProcess:
        command = command or ("worker",)
        if command[0] == "worker" and ready == "ready." and not any(
                arg in ("-l", "--loglevel") or arg.startswith("--loglevel=") for arg in command):
            # Celery prints "ready." at INFO only.
            command = (*command, "-l", "info")
        log_path = str(tmp_path / f"ws-celery-{len(started)}.log")
        process = WorkerProcess(ini, command, log_path, env=env)
        started.append(process)
        if ready:
            process.wait_for_output(ready, timeout=timeout)
        return process

    yield factory
    # Signal all first so their shutdowns overlap, then wait for each.
    for process in started:
        process.terminate()
    for process in started:
        process.stop()
