"""A Pyramid app whose views register ``run_after_response`` callbacks.

Every callback appends to ``app.registry[RECORD]`` (a plain list), so a test
reads what ran, and in which order, after its request.
"""
from __future__ import annotations

import threading

import transaction
from pyramid.config import Configurator
from pyramid.response import Response
from transaction.interfaces import IDataManager, TransientError
from zope.interface import implementer

from websauna_tasks import run_after_response

RECORD = "after_response_test.record"
#: threading.Event objects a view's callback waits on or sets (test_after_response's waitress test).
EVENTS = "after_response_test.events"
#: A threading.Barrier both concurrent requests meet at, so they are in flight together.
BARRIER = "after_response_test.barrier"


class Handled(Exception):
    """Raised by views; the app's exception view turns it into a 500 page."""


class VoteFailed(Exception):
    """Raised by :class:`FailingVote` while the transaction commits."""


def make_app(*, tm: bool = True, retry: bool = False, include: bool = True, **settings: str):
    settings = {"websauna.celery_config": repr({"broker_url": "memory://"}), **settings}
    config = Configurator(settings=settings)
    if tm:
        config.include("pyramid_tm")
    if retry:
        config.include("pyramid_retry")
    if include:
        config.include("websauna_tasks")
    config.registry[RECORD] = []
    config.registry[EVENTS] = {}
    for name, view in VIEWS.items():
        config.add_route(name, f"/{name}")
        config.add_view(view, route_name=name)
    config.add_exception_view(lambda exc, request: Response(f"handled {type(exc).__name__}", status=500),
                              context=Handled)
    config.add_exception_view(lambda exc, request: Response("commit failed", status=500), context=VoteFailed)
    if retry and settings.get("after_response_test.render_transient"):
        # Rendered, yet pyramid_retry still throws this response away and retries.
        config.add_exception_view(lambda exc, request: Response("transient", status=503), context=TransientError)
    return config.make_wsgi_app()


def record_of(request) -> list:
    return request.registry[RECORD]


def appender(request, entry: object):
    record = record_of(request)
    return lambda: record.append(entry)


def forms(request):
    """Every way to register, in one view; the view's own steps are recorded too."""
    record = record_of(request)

    def plain():
        record.append("function")

    returned = run_after_response(plain)

    @run_after_response
    def decorated():
        record.append("decorator")

    @run_after_response(always=True)
    def decorated_always():
        record.append("decorator always")

    run_after_response(appender(request, "explicit request"), request=request)
    record.append(("returned unchanged", returned is plain, decorated.__name__, decorated_always.__name__))
    record.append("view returned")
    return Response("forms")


def failing_callback(request):
    record = record_of(request)
    run_after_response(appender(request, "first"))

    def broken_callback():
        raise ValueError("callback broke")

    run_after_response(broken_callback)
    run_after_response(appender(request, "third"))
    record.append("view returned")
    return Response("ok")


def view_raises(request):
    run_after_response(appender(request, "plain"))
    run_after_response(appender(request, "always"), always=True)
    raise RuntimeError("view failed")


def view_raises_handled(request):
    run_after_response(appender(request, "plain"))
    run_after_response(appender(request, "always"), always=True)
    raise Handled()


def doomed(request):
    run_after_response(appender(request, "plain"))
    run_after_response(appender(request, "always"), always=True)
    request.tm.doom()
    return Response("doomed")


@implementer(IDataManager)
class FailingVote:
    """A data manager that refuses the commit in its vote, as a database would on a conflict."""

    def __init__(self, manager: transaction.TransactionManager):
        self.transaction_manager = manager

    def abort(self, txn):
        pass

    def tpc_begin(self, txn):
        pass

    def commit(self, txn):
        pass

    def tpc_vote(self, txn):
        raise VoteFailed("vote refused")

    def tpc_finish(self, txn):
        pass

    def tpc_abort(self, txn):
        pass

    def sortKey(self):
        return "after_response_test.failing_vote"


def commit_fails(request):
    run_after_response(appender(request, "plain"))
    run_after_response(appender(request, "always"), always=True)
    request.tm.get().join(FailingVote(request.tm))
    return Response("will not commit")


def two_transactions(request):
    """The view commits its own transaction, then the next one is aborted by a doom."""
    run_after_response(appender(request, "first transaction"))
    request.tm.commit()
    request.tm.begin()
    run_after_response(appender(request, "second transaction"))
    request.tm.doom()
    return Response("two")


def nothing(request):
    return Response("nothing")


def too_late(request):
    record = record_of(request)

    def register_again():
        try:
            run_after_response(appender(request, "never"))
        except RuntimeError as exc:
            record.append(f"RuntimeError: {exc}")

    run_after_response(register_again)
    return Response("ok")


def from_thread(request):
    """A thread the view starts: without request= there is no current request there."""
    record = record_of(request)

    def work():
        for label, kwargs in (("implicit", {}), ("passed request", {"request": request})):
            try:
                run_after_response(appender(request, label), **kwargs)
            except RuntimeError as exc:
                record.append(f"{label}: RuntimeError: {exc}")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if request.params.get("doom"):
        request.tm.doom()
    return Response("threads")


def thread_locals(request):
    from pyramid.threadlocal import get_current_registry, get_current_request

    record = record_of(request)
    run_after_response(lambda: record.append((get_current_request() is request,
                                              get_current_registry() is request.registry)))
    return Response("ok")


def closing_body(request):
    record = record_of(request)

    class Body:
        def __iter__(self):
            yield b"part one, "
            yield b"part two"

        def close(self):
            record.append("body closed")

    run_after_response(appender(request, "callback"))
    return Response(app_iter=Body(), content_length=len(b"part one, part two"))


def concurrent(request):
    """Registers, waits until the other request has registered too, registers again."""
    name = request.params["name"]
    record = record_of(request)

    def entry(step):
        return lambda: record.append((name, step, threading.current_thread().name))

    run_after_response(entry(1))
    request.registry[BARRIER].wait()
    run_after_response(entry(2))
    return Response(name)


def flaky(request):
    attempt = request.environ["retry.attempt"]
    run_after_response(appender(request, f"plain {attempt}"))
    run_after_response(appender(request, f"always {attempt}"), always=True)
    if request.params.get("fail") == "always" or attempt == 0:
        raise TransientError(f"attempt {attempt} conflicts")
    return Response(f"attempt {attempt}")


def slow_callback(request):
    """The callback tells the test it runs, then blocks until the test lets it go."""
    events = request.registry[EVENTS]

    def blocked():
        events["started"].set()
        events["released"] = events["release"].wait(10)
        events["finished"].set()

    run_after_response(blocked)
    return Response("x" * 100_000)


VIEWS = {
    "forms": forms,
    "failing-callback": failing_callback,
    "raises": view_raises,
    "raises-handled": view_raises_handled,
    "doomed": doomed,
    "commit-fails": commit_fails,
    "two-transactions": two_transactions,
    "nothing": nothing,
    "too-late": too_late,
    "from-thread": from_thread,
    "thread-locals": thread_locals,
    "closing-body": closing_body,
    "concurrent": concurrent,
    "flaky": flaky,
    "slow-callback": slow_callback,
}
