"""``await task.defer_async(...)`` and ``await defer_async(fn, ...)``: the send pipeline from a coroutine.

There is no async send path: a coroutine's message goes through
:func:`dispatch.send <websauna_tasks.dispatch.send>` like any other, with the
same checks, names, queues and on-commit rule. What differs is *where* the
blocking part runs.

Which transaction a coroutine is in. The rule is the sync one
(:func:`~websauna_tasks.dispatch.transaction_to_wait_for`): the current
request's ``tm``, else the thread's ``transaction.manager``. The request of a
task run is a context variable, so every coroutine of an ``async def`` body,
and every ``asyncio`` task it starts (a task copies the context it was
created in), sees its own run's request. Pyramid's web request and
``transaction.manager`` are thread locals: every coroutine on the loop's
thread shares them, so a coroutine that holds ``with transaction.manager:``
across an ``await`` lends its transaction to whatever other coroutine defers
meanwhile. Hence the transaction is decided when ``defer_async`` is *called*
(before anything is awaited), and a coroutine that shares its loop with
others should pass its own manager (``_tm=`` of :func:`defer_async`, or
``apply_async(tm=...)``).

Where the work runs:

- a message that waits for a commit is checked and held on the loop's thread,
  when awaited: ``transaction.manager`` answers per thread, and nothing is
  published before the commit, so there is no broker write to wait for (the
  outbox's row, when the outbox is on, is written through the transaction's
  own session, as the rest of that transaction's writes are);
- a message sent now runs the whole of ``dispatch.send`` (the payload's JSON
  encoding, the name's claim in Redis, the broker write) in one publisher
  thread per process, and the coroutine awaits its result. One thread rather
  than ``asyncio.to_thread`` per message: ``bench/async_dispatch.py``
  measured both (docs/defer.md#async-defer_async).

A refusal (``TypeError``, ``ValueError``, :class:`~websauna_tasks.PayloadTooLarge`,
``AlreadyEnqueued``...) is raised from the ``await``. Calling ``defer_async``
where no event loop runs is a ``RuntimeError`` at the call, not a coroutine
that is never awaited and silently sends nothing.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import typing as t

from .dispatch import transaction_to_wait_for
from .threads import BackgroundLoop

if t.TYPE_CHECKING:
    from celery import Task

__all__ = ["running_loop", "off_loop", "defer_task", "PublisherThread"]

logger = logging.getLogger(__name__)

T = t.TypeVar("T")


def running_loop(what: str, instead: str) -> asyncio.AbstractEventLoop:
    """The running event loop, or a RuntimeError saying that ``what`` needs one and to call ``instead``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            f"{what} needs a running event loop: call it inside `async def` and await it "
            f"(in sync code call {instead})") from None


class PublisherThread(BackgroundLoop):
    """Runs blocking sends in the order they came, one at a time, and settles each one's future on its loop."""

    thread_name = "websauna_tasks-async-publisher"

    def __init__(self) -> None:
        super().__init__()
        self.jobs: queue.SimpleQueue[t.Any] = queue.SimpleQueue()

    def forked(self) -> None:
        # The parent's jobs belong to the parent's loops: a child never settles them.
        self.jobs = queue.SimpleQueue()

    def submit(self, loop: asyncio.AbstractEventLoop, fn: t.Callable[..., T], *args: t.Any,
               **kwargs: t.Any) -> asyncio.Future[T]:
        self.ensure_running()
        future: asyncio.Future[T] = loop.create_future()
        # The caller's context travels with the call: a task run's request and
        # an OpenTelemetry span are context variables the send reads.
        self.jobs.put((loop, future, contextvars.copy_context(), fn, args, kwargs))
        return future

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                loop, future, context, fn, args, kwargs = self.jobs.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                result, error = context.run(fn, *args, **kwargs), None
            except BaseException as exc:  # handed to the awaiting coroutine, whatever it is
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                # The loop closed while its send ran: nobody is left to tell.
                logger.warning("websauna_tasks: an async send finished after its event loop closed (error: %r)",
                               error)


def _settle(future: asyncio.Future[t.Any], result: t.Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_publisher = PublisherThread()


def off_loop(loop: asyncio.AbstractEventLoop, fn: t.Callable[..., T], *args: t.Any,
             **kwargs: t.Any) -> asyncio.Future[T]:
    """``fn(*args, **kwargs)`` in the publisher thread; await the returned future for its result or error.

    Cancelling the await does not take back a send already handed over.
    """
    return _publisher.submit(loop, fn, *args, **kwargs)


def defer_task(task: Task, args: tuple, kwargs: dict[str, t.Any]) -> t.Coroutine[t.Any, t.Any, str]:
    """``task.defer_async(*args, **kwargs)``: the loop and the transaction are looked up now, the send when awaited."""
    loop = running_loop(f"{task.name}.defer_async()", f"{task.name}.defer() or .defer_sync()")
    return _defer_task(loop, task, args, kwargs, transaction_to_wait_for(None))


async def _defer_task(loop: asyncio.AbstractEventLoop, task: Task, args: tuple, kwargs: dict[str, t.Any],
                      tm: t.Any) -> str:
    if tm is not None:
        return task.apply_async(args, kwargs, tm=tm).id
    result = await off_loop(loop, task.apply_async, args, kwargs, tm=None)
    return result.id
