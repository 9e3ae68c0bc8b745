"""The example's pages: post a message, watch its task mark it processed."""
from __future__ import annotations

import collections
import datetime
import logging

from celery.backends.base import DisabledBackend
from celery.result import AsyncResult
from kombu.utils.url import maybe_sanitize_url
from pyramid.httpexceptions import HTTPNotFound, HTTPSeeOther
from pyramid.request import Request
from pyramid.response import Response
from pyramid.view import view_config
from sqlalchemy import select

from websauna_tasks import AlreadyEnqueued, defer, run_after_response

from . import pages
from .deferred import count_words
from .models import (
    Heartbeat,
    Message,
    MessageStats,
    TaskRun,
    WordCount,
    WordCountRequest,
    after_response_log,
    utcnow,
)
from .tasks import fail_on_purpose, process_message

logger = logging.getLogger(__name__)

#: Rows shown on the page.
LIMIT = 20
#: Click requests shown per message.
REQUEST_LIMIT = 5
#: The page reloads itself while a message younger than this is still pending.
REFRESH_WINDOW = datetime.timedelta(seconds=20)
#: defer(count_words, ..., _countdown=...): long enough to click twice while the first task waits.
COUNT_WORDS_DELAY = 3

def backend_url(request: Request) -> str | None:
    """The result backend's URL without its password; None when Celery has none."""
    celery = request.celery
    if isinstance(celery.backend, DisabledBackend):
        return None
    return maybe_sanitize_url(str(celery.conf.result_backend))


def console_url(request: Request) -> str | None:
    """The operator console's overview, when the app mounted it."""
    try:
        return request.route_url("websauna_tasks.console.overview")
    except KeyError:
        return None


def render_home(request: Request, error: str = "") -> Response:
    dbsession = request.dbsession
    messages = list(dbsession.scalars(select(Message).order_by(Message.id.desc()).limit(LIMIT)))
    ids = [m.id for m in messages]
    counts = {c.message_id: c for c in dbsession.scalars(select(WordCount).where(WordCount.message_id.in_(ids)))}
    requests: dict[int, list[WordCountRequest]] = collections.defaultdict(list)
    for item in dbsession.scalars(select(WordCountRequest).where(WordCountRequest.message_id.in_(ids))
                                  .order_by(WordCountRequest.id)):
        requests[item.message_id].append(item)

    heartbeat = dbsession.get(Heartbeat, 1)
    stats = dbsession.get(MessageStats, 1)
    shown = {m.scheduled_task_id for m in messages} | {m.processed_by_task_id for m in messages}
    shown |= {c.task_id for c in counts.values()} | {r.task_id for rs in requests.values() for r in rs}
    shown |= {row.last_task_id for row in (heartbeat, stats) if row is not None}
    shown.discard(None)
    ran_by = {run.task_id: f"{run.hostname}, pid {run.pid}"
              for run in dbsession.scalars(select(TaskRun).where(TaskRun.task_id.in_(shown)))}
    task_url = pages.TaskLinks(lambda task_id: request.route_url("task", id=task_id), ran_by)

    celery_conf = request.celery.conf
    eager = bool(celery_conf.task_always_eager)
    recent = utcnow() - REFRESH_WINDOW
    rows = []
    refresh = False
    for message in messages:
        count = counts.get(message.id)
        clicks = requests[message.id]
        rows.append(pages.message_row(message, pages.words_cell(
            count, clicks[-REQUEST_LIMIT:], url=request.route_url("count_words", id=message.id),
            delay=None if eager else COUNT_WORDS_DELAY, task_url=task_url), task_url))
        refresh = refresh or (not message.processed and message.created_at >= recent)
        if clicks and (count is None or count.task_id != clicks[-1].task_id):
            refresh = refresh or clicks[-1].requested_at >= recent
    html = pages.home_page(
        rows=rows,
        heartbeat=heartbeat,
        stats=stats,
        after_response=after_response_log(request.registry),
        eager=eager,
        broker=maybe_sanitize_url(celery_conf.broker_url or ""),
        backend=backend_url(request),
        store_eager=bool(celery_conf.task_store_eager_result),
        post_url=request.route_url("post_message"),
        fail_url=request.route_url("fail"),
        home_url=request.route_url("home"),
        task_url=task_url,
        error=error,
        refresh=refresh,
        console_url=console_url(request),
    )
    return Response(html, status=400 if error else 200)


@view_config(route_name="home", request_method="GET")
def home(request: Request) -> Response:
    return render_home(request)


@view_config(route_name="post_message", request_method="POST")
def post_message(request: Request) -> Response:
    text = request.POST.get("text", "").strip()
    if not text:
        return render_home(request, error="Write a message first.")
    message = Message(text=text[:200])
    request.dbsession.add(message)
    # The task gets the id, never the object: flush to have it now.
    request.dbsession.flush()
    message_id = message.id
    # Sent only when this request's transaction commits: the worker will find the row.
    result = process_message.apply_async(args=(message_id,), tm=request.tm)
    message.scheduled_task_id = result.id

    # Runs in this web process once the redirect has been sent, and only if the transaction
    # committed. Best effort: nothing retries it, nothing stores it but memory and the log.
    log = after_response_log(request.registry)

    @run_after_response
    def response_sent() -> None:
        logger.info("response sent for message %d", message_id)
        log.add(f"response sent for message {message_id}")

    return HTTPSeeOther(request.route_url("home"))


@view_config(route_name="count_words", request_method="POST")
def count_words_later(request: Request) -> Response:
    message_id = int(request.matchdict["id"])
    if request.dbsession.get(Message, message_id) is None:
        raise HTTPNotFound()
    try:
        # Inside the request, defer() is transactional: sent when this request commits.
        # _name: while a task of this name is pending, no second one is sent.
        task_id = defer(count_words, message_id, _name=f"example.count_words-{message_id}",
                        _countdown=COUNT_WORDS_DELAY, _raise_if_enqueued=True)
        reused = False
    except AlreadyEnqueued as pending:
        # Without _raise_if_enqueued, defer() would return this same id without a word.
        task_id, reused = pending.task_id, True
    request.dbsession.add(WordCountRequest(message_id=message_id, task_id=task_id, reused=reused))
    return HTTPSeeOther(request.route_url("home"))


@view_config(route_name="fail", request_method="POST")
def fail(request: Request) -> Response:
    result = fail_on_purpose.apply_async(tm=request.tm)
    # Its page shows PENDING until the worker has run it, then FAILURE with the error.
    return HTTPSeeOther(request.route_url("task", id=result.id))


@view_config(route_name="task", request_method="GET")
def task_detail(request: Request) -> Response:
    task_id = request.matchdict["id"]
    backend = backend_url(request)
    eager = bool(request.celery.conf.task_always_eager)
    home_url = request.route_url("home")
    if backend is None:
        return Response(pages.task_page(task_id, backend=None, eager=eager, home_url=home_url))
    # request.celery explicitly; a bare AsyncResult(task_id) would find the same app.
    result = AsyncResult(task_id, app=request.celery)
    state = result.state
    return Response(pages.task_page(
        task_id, backend=backend, eager=eager, home_url=home_url, state=state, ready=result.ready(),
        # The task's name is stored only with result_extended.
        name=result.name, value=result.result, traceback=result.traceback, date_done=result.date_done,
    ))


@view_config(route_name="message", request_method="GET")
def message_detail(request: Request) -> Response:
    try:
        message = request.dbsession.get(Message, int(request.matchdict["id"]))
    except ValueError:
        message = None
    if message is None:
        raise HTTPNotFound()
    return Response(pages.message_page(message, request.route_url("home")))
