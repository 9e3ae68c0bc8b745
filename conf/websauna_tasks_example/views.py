"""The example's pages: post a message, watch its task mark it processed."""
from __future__ import annotations

import datetime

from kombu.utils.url import maybe_sanitize_url
from pyramid.httpexceptions import HTTPNotFound, HTTPSeeOther
from pyramid.request import Request
from pyramid.response import Response
from pyramid.view import view_config
from sqlalchemy import select

from . import pages
from .models import Heartbeat, Message, utcnow
from .tasks import fail_on_purpose, process_message

#: Rows shown on the page.
LIMIT = 20
#: The page reloads itself while a message younger than this is still pending.
REFRESH_WINDOW = datetime.timedelta(seconds=20)


def render_home(request: Request, error: str = "") -> Response:
    dbsession = request.dbsession
    messages = list(dbsession.scalars(select(Message).order_by(Message.id.desc()).limit(LIMIT)))
    recent = utcnow() - REFRESH_WINDOW
    html = pages.home_page(
        messages=messages,
        heartbeat=dbsession.get(Heartbeat, 1),
        eager=bool(request.celery.conf.task_always_eager),
        broker=maybe_sanitize_url(request.celery.conf.broker_url or ""),
        post_url=request.route_url("post_message"),
        fail_url=request.route_url("fail"),
        home_url=request.route_url("home"),
        error=error,
        refresh=any(not m.processed and m.created_at >= recent for m in messages),
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
    # Sent only when this request's transaction commits: the worker will find the row.
    result = process_message.apply_async(args=(message.id,), tm=request.tm)
    message.scheduled_task_id = result.id
    return HTTPSeeOther(request.route_url("home"))


@view_config(route_name="fail", request_method="POST")
def fail(request: Request) -> Response:
    fail_on_purpose.apply_async(tm=request.tm)
    return HTTPSeeOther(request.route_url("home"))


@view_config(route_name="message", request_method="GET")
def message_detail(request: Request) -> Response:
    try:
        message = request.dbsession.get(Message, int(request.matchdict["id"]))
    except ValueError:
        message = None
    if message is None:
        raise HTTPNotFound()
    return Response(pages.message_page(message, request.route_url("home")))
