"""``run_after_response``: run a callback in the web process once the client has its response.

For work that may be lost without harm (counting an API call, warming a cache)
a Celery task is more than needed, but doing it in the view makes the client
wait for it. Pyramid's finished callbacks do not help: the router runs them as
soon as the tweens return, before the WSGI server has written a byte of the
body. The one moment a WSGI application learns that its response has been
written is the ``close()`` call on the iterable it returned: PEP 3333 has the
server (and every middleware in between) call it after the last chunk, whether
the write succeeded or not. So :func:`after_response_tween_factory` swaps the
response's ``app_iter`` for an iterable that hands the body through unchanged
and whose ``close()`` first closes the original body (a file, a generator) and
then runs the callbacks.

The tween sits under INGRESS and over pyramid_tm (and the eager-error tween),
so when the response reaches it the request's transaction has been committed
or aborted, and which callbacks are due is already known. Whether a
transaction committed is learnt from an after-commit hook on it: ``transaction``
calls those with the commit's status, and does not call them at all on abort,
which covers a raising view, a doomed transaction and a vetoed commit alike.

Callbacks live on the request object the tween saw, never in the environ:
pyramid_retry reuses the environ for every attempt but builds a new request,
so a failed attempt's callbacks go away with its request.
"""
from __future__ import annotations

import logging
import threading
import typing as t

from pyramid.request import Request
from pyramid.response import Response
from pyramid.threadlocal import RequestContext, get_current_request
from pyramid.tweens import MAIN
from pyramid_retry import is_error_retryable
from pyramid_tm import is_tm_active
from transaction.interfaces import NoTransaction

if t.TYPE_CHECKING:
    from pyramid.registry import Registry

logger = logging.getLogger(__name__)

Handler = t.Callable[[Request], Response]
Callback = t.Callable[[], object]
F = t.TypeVar("F", bound=Callback)

#: ``over`` for :func:`after_response_tween_factory` (``under`` is INGRESS). Naming
#: pyramid_tm is what guarantees the transaction is finished when the tween
#: sees the response; MAIN keeps the constraint valid when neither is present.
AFTER_RESPONSE_OVER = ("pyramid_tm.tm_tween_factory", "websauna_tasks.tweens.eager_errors_tween_factory", MAIN)

_STATE_ATTR = "_websauna_tasks_after_response"

_NO_TWEEN = (
    "run_after_response() needs the websauna_tasks tween, and this request did not pass through it: "
    "add config.include('websauna_tasks') to the application (with an explicit pyramid.tweens setting, "
    "list websauna_tasks.after_response.after_response_tween_factory first, above pyramid_tm)"
)
_OUTSIDE = (
    "run_after_response() was called outside a Pyramid request, so there is no response to wait for: "
    "call it while a view (or code it calls) runs, or pass the view's request as request="
)
_OTHER_THREAD = (
    "run_after_response() was called from another thread than the request's, and the request's transaction "
    "manager is thread-local (transaction.manager, pyramid_tm's default), so the request's transaction cannot be "
    "seen from here: register in the request's thread (e.g. after joining this one), or give requests their "
    "own manager with the setting tm.manager_hook = pyramid_tm.explicit_manager"
)
_TOO_LATE = (
    "run_after_response() is too late for this request: its response has already left the "
    "websauna_tasks tween; register callbacks while the view runs"
)


class _CommitOutcome:
    """After-commit hook of one transaction; remembers whether the commit succeeded."""

    __slots__ = ("committed",)

    def __init__(self) -> None:
        # Stays False on abort: transaction calls after-commit hooks only from commit().
        self.committed = False

    def __call__(self, status: bool) -> None:
        self.committed = status


class _Pending(t.NamedTuple):
    callback: Callback
    always: bool
    # None: registered with no transaction to wait for.
    outcome: _CommitOutcome | None


class _RequestCallbacks:
    """What one request registered; lives on that request only."""

    def __init__(self) -> None:
        self.pending: list[_Pending] = []
        self.sealed = False
        # The view runs in the tween's thread; see _active_transaction.
        self.thread = threading.get_ident()
        # One hook per transaction, however many callbacks join it. The strong
        # reference also keeps the identity check below sound.
        self._transaction: object | None = None
        self._outcome: _CommitOutcome | None = None

    def add(self, callback: Callback, always: bool, txn: t.Any | None) -> None:
        if txn is not None and txn is not self._transaction:
            self._transaction, self._outcome = txn, _CommitOutcome()
            txn.addAfterCommitHook(self._outcome)
        self.pending.append(_Pending(callback, always, self._outcome if txn is not None else None))

    def seal(self) -> list[_Pending]:
        self.sealed = True
        pending, self.pending = self.pending, []
        self._transaction = self._outcome = None
        return pending


@t.overload
def run_after_response(fn: F, *, request: Request | None = None, always: bool = False) -> F: ...


@t.overload
def run_after_response(
    fn: None = None, *, request: Request | None = None, always: bool = False
) -> t.Callable[[F], F]: ...


def run_after_response(
    fn: F | None = None, *, request: Request | None = None, always: bool = False
) -> F | t.Callable[[F], F]:
    """Call ``fn()`` in this process after the response has been sent to the client.

    ``run_after_response(fn)``, ``@run_after_response`` and
    ``@run_after_response(always=True)`` register at once and give ``fn`` back
    unchanged. Callbacks run in registration order; one that raises is logged
    and the others still run. Without ``always=True`` a callback is skipped
    when the request's transaction did not commit (or, with no transaction,
    when the request ended with an exception). ``request`` defaults to
    Pyramid's current request; outside a request this raises RuntimeError.
    """
    if fn is None:
        def register(func: F) -> F:
            return run_after_response(func, request=request, always=always)

        return register
    if not callable(fn):
        raise TypeError(f"run_after_response() needs a callable taking no arguments, got {fn!r}")
    if request is None:
        request = get_current_request()
        if request is None:
            raise RuntimeError(_OUTSIDE)
    state: _RequestCallbacks | None = getattr(request, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(_NO_TWEEN)
    if state.sealed:
        raise RuntimeError(_TOO_LATE)
    state.add(fn, always, _active_transaction(request, state))
    return fn


def _active_transaction(request: Request, state: _RequestCallbacks) -> t.Any | None:
    # Only a transaction pyramid_tm will finish counts: with the default
    # thread-local manager, tm.get() outside pyramid_tm would make a new
    # transaction that nobody commits, and the callback would never run.
    if not is_tm_active(request):
        return None
    manager = request.tm
    if isinstance(manager, threading.local) and threading.get_ident() != state.thread:
        # Same trap from a thread the view started: its get() is a new
        # transaction, not the request's. Refuse rather than never run.
        raise RuntimeError(_OTHER_THREAD)
    try:
        return manager.get()
    except NoTransaction:
        # Explicit manager, and the view ended the transaction without beginning another.
        return None


def after_response_tween_factory(handler: Handler, registry: Registry) -> Handler:
    def after_response_tween(request: Request) -> Response:
        state = _RequestCallbacks()
        setattr(request, _STATE_ATTR, state)
        try:
            response = handler(request)
        except Exception as exc:
            pending = state.seal()
            # A retried attempt is thrown away whole; the next attempt runs the
            # view again and registers its own callbacks.
            if not is_error_retryable(request, exc):
                # There is no response of ours to wait for (the server writes
                # its own error page), so ``always`` callbacks run now.
                _run_callbacks(request, [p.callback for p in pending if p.always])
            raise
        except BaseException:
            state.seal()
            raise
        pending = state.seal()
        failed = getattr(request, "exception", None) is not None
        due = [p.callback for p in pending if _is_due(p, failed)]
        if due:
            # Only now, so that a response without callbacks keeps its own
            # app_iter (e.g. waitress sends a wsgi.file_wrapper without copying).
            _run_on_close(response, request, due)
        return response

    return after_response_tween


def _is_due(pending: _Pending, request_failed: bool) -> bool:
    if pending.always:
        return True
    if pending.outcome is not None:
        return pending.outcome.committed
    return not request_failed


def _run_on_close(response: Response, request: Request, callbacks: list[Callback]) -> None:
    length = getattr(response, "content_length", None)
    response.app_iter = _CloseThenRun(response.app_iter, request, callbacks)
    # WebOb's app_iter setter drops Content-Length. Without it waitress sends
    # chunked and writes the final chunk after close(), so the client would
    # wait for the callbacks after all.
    if length is not None:
        response.content_length = length


class _CloseThenRun:
    """The response body as the server sees it; ``close()`` is our signal."""

    def __init__(self, app_iter: t.Iterable[bytes], request: Request, callbacks: list[Callback]):
        self._app_iter = app_iter
        self._request: Request | None = request
        self._callbacks = callbacks

    def __iter__(self) -> t.Iterator[bytes]:
        return iter(self._app_iter)

    def close(self) -> None:
        # Taken before running: a second close() (a middleware and the server
        # both closing) must not run anything twice.
        callbacks, self._callbacks = self._callbacks, []
        request, self._request = self._request, None
        try:
            close = getattr(self._app_iter, "close", None)
            if close is not None:
                close()
        finally:
            if request is not None:
                _run_callbacks(request, callbacks)


def _run_callbacks(request: Request, callbacks: list[Callback]) -> None:
    if not callbacks:
        return
    # The server calls close() after the router has popped the request's
    # thread locals; code in a callback that reaches for get_current_request()
    # or get_current_registry() should still find this request's.
    context = RequestContext(request)
    context.begin()
    try:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("run_after_response callback %s failed", _describe(callback))
    finally:
        context.end()


def _describe(callback: Callback) -> str:
    qualname = getattr(callback, "__qualname__", None)
    module = getattr(callback, "__module__", None)
    if qualname and module:
        return f"{module}.{qualname}"
    return repr(callback)
