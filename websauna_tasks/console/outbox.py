"""The outbox: unsent rows with their age, rows sent again or given up on, and "send now".

"Send now" goes through the outbox's own publishing path
(``Outbox.publish_pending`` with the row's id, as the fast path and the
relay call it): the row is claimed, published and marked sent in one
transaction, so a relay running at the same moment skips it rather than
sending it twice. "Send all" is ``Outbox.drain``, the relay's loop.
"""
from __future__ import annotations

import typing as t

from pyramid.httpexceptions import HTTPBadRequest, HTTPSeeOther, HTTPServiceUnavailable

from ..outbox import find_outbox, outbox_table
from ._common import RENDERER, Pager, app_of, ask, failure, page, preview, route, task_id_param, unconfirmed

if t.TYPE_CHECKING:
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

#: What the page lists: rows not yet handed to the broker, or rows the redelivery has sent again.
SHOWS = ("unsent", "redelivered")


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("outbox"), f"{console.prefix}/outbox")
    config.add_route(route("outbox_send"), f"{console.prefix}/outbox/send")
    config.add_view(list_view, route_name=route("outbox"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"outbox{RENDERER}")
    config.add_view(send_view, route_name=route("outbox_send"), request_method="POST", require_csrf=True,
                    permission=console.permission, renderer=f"confirm{RENDERER}")


def list_view(request: Request) -> dict[str, t.Any]:
    import sqlalchemy as sa

    app = app_of(request)
    show = request.params.get("show", "unsent")
    if show not in SHOWS:
        raise HTTPBadRequest("show must be unsent or redelivered")
    values: dict[str, t.Any] = {"show": show, "rows": [], "pager": None, "error": "", "off": False,
                                "sent": _count(request, "sent"), "status": None}
    outbox = find_outbox(app)
    if outbox is None:
        values["off"] = True
        return page(request, "outbox", "Outbox", **values)
    table = outbox_table
    where = [table.c.app == outbox.app_name]
    if show == "unsent":
        where.append(table.c.sent_at.is_(None))
        order = table.c.created_at
    else:
        where.append(table.c.redeliveries > 0)
        order = table.c.sent_at.desc()
    try:
        engine = outbox.relay_engine()
        values["status"] = outbox.status()
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()
            pager = Pager.of(request, total)
            rows = conn.execute(sa.select(table.c.id, table.c.task_name, table.c.args, table.c.kwargs,
                                          table.c.created_at, table.c.sent_at, table.c.redeliveries)
                                .where(*where).order_by(order).offset(pager.offset).limit(pager.size)).all()
        values["pager"] = pager
        limit = outbox.redeliverer.max_redeliveries
        values["rows"] = [{"id": row.id, "task": row.task_name, "args": preview(f"{row.args} {row.kwargs}", 160),
                           "created": row.created_at, "sent": row.sent_at, "redeliveries": row.redeliveries,
                           "given_up": limit > 0 and row.redeliveries >= limit} for row in rows]
    except HTTPBadRequest:
        raise
    except Exception as exc:
        values["error"] = f"the outbox table could not be read: {failure(exc)}"
    return page(request, "outbox", "Outbox", **values)


def _count(request: Request, key: str) -> int | None:
    raw = request.params.get(key, "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 7 else None


def send_view(request: Request) -> t.Any:
    """POST id=<row id>: publish that row now; all=yes: every unsent row, after a confirmation."""
    app = app_of(request)
    outbox = find_outbox(app)
    if outbox is None:
        raise HTTPBadRequest("the outbox is off")
    if request.POST.get("all") == "yes" and unconfirmed(request):
        status = outbox.status()
        return ask(request, "outbox", f"Send all {status.unsent} unsent row(s) now?", action="send",
                   all_unsent=status.unsent, back=request.route_path(route("outbox")),
                   target=request.route_path(route("outbox_send")), field="all")
    row_id = None if request.POST.get("all") == "yes" else task_id_param(request.POST.get("id"))
    try:
        sent = outbox.drain() if row_id is None else outbox.publish_pending(ids=[row_id])
    except Exception as exc:
        # publish_pending rolled back: the rows stay unsent for the relay, and the operator learns why.
        raise HTTPServiceUnavailable(f"nothing was sent: {failure(exc)}") from None
    return HTTPSeeOther(request.route_path(route("outbox"), _query={"sent": sent}))
