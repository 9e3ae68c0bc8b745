"""Name claims: which task holds each name, for how much longer, and a release action.

Read from the store ``names.get_name_store`` chose (Redis keys under the
app's prefix, rows of ``websauna_tasks_names``, or a worker-less memory
dict); released with ``names.release_name``, which frees a name only while
the same task still holds it, so a release that raced with the claim's
expiry cannot free someone else's.
"""
from __future__ import annotations

import time
import typing as t

from pyramid.httpexceptions import HTTPBadRequest, HTTPSeeOther

from ..cancel import cancel
from ..names import MemoryNameStore, RedisNameStore, SQLNameStore, get_name_store, names_table, release_name
from ._common import RENDERER, app_of, ask, failure, page, route, task_id_param, unconfirmed

if t.TYPE_CHECKING:
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

#: Claims listed at most: a SCAN of Redis keys stops there.
MAX_CLAIMS = 500


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("names"), f"{console.prefix}/names")
    config.add_route(route("names_release"), f"{console.prefix}/names/release")
    config.add_view(list_view, route_name=route("names"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"names{RENDERER}")
    config.add_view(release_view, route_name=route("names_release"), request_method="POST", require_csrf=True,
                    permission=console.permission, renderer=f"confirm{RENDERER}")
    config.add_route(route("names_cancel"), f"{console.prefix}/names/cancel")
    config.add_view(cancel_view, route_name=route("names_cancel"), request_method="POST", require_csrf=True,
                    permission=console.permission, renderer=f"confirm{RENDERER}")


def claims(store: t.Any, limit: int = MAX_CLAIMS) -> tuple[list[dict[str, t.Any]], bool]:
    """(claims sorted by name, whether there were more than ``limit``); time left in seconds, None for no expiry."""
    found: list[dict[str, t.Any]] = []
    if isinstance(store, RedisNameStore):
        keys = []
        for key in store.client.scan_iter(match=_glob(store.prefix) + "*", count=1000):
            keys.append(key)
            if len(keys) > limit:
                break
        pipe = store.client.pipeline(transaction=False)
        for key in keys[:limit]:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute()
        for key, holder, ttl in zip(keys, replies[::2], replies[1::2]):
            if holder is not None:
                found.append({"name": key.decode()[len(store.prefix):], "task_id": holder.decode(),
                              "left": ttl / 1000 if ttl >= 0 else None})
        more = len(keys) > limit
    elif isinstance(store, SQLNameStore):
        import sqlalchemy as sa

        table = names_table
        now = time.time()
        with store.engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.name, table.c.task_id, table.c.expires_at).where(
                table.c.name.startswith(store.prefix, autoescape=True), table.c.expires_at > now
            ).order_by(table.c.name).limit(limit + 1)).all()
        found = [{"name": row.name[len(store.prefix):], "task_id": row.task_id, "left": row.expires_at - now}
                 for row in rows[:limit]]
        more = len(rows) > limit
    elif isinstance(store, MemoryNameStore):
        now = time.monotonic()
        with store.lock:
            held = list(store.claims.items())
        found = [{"name": name, "task_id": task_id, "left": until - now} for name, (task_id, until) in held
                 if until > now][:limit]
        more = len(held) > limit
    else:
        raise TypeError(f"a name store the console cannot list: {type(store).__name__}")
    return sorted(found, key=lambda claim: claim["name"]), more


def _glob(text: str) -> str:
    # The app's name is in the prefix and may hold glob characters.
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def list_view(request: Request) -> dict[str, t.Any]:
    app = app_of(request)
    values: dict[str, t.Any] = {"rows": [], "more": False, "error": "", "released": request.params.get("released")
                                == "1", "cancelled": request.params.get("cancelled") == "1", "limit": MAX_CLAIMS}
    try:
        values["rows"], values["more"] = claims(get_name_store(request.registry, app))
    except Exception as exc:
        values["error"] = f"the name claims could not be read: {failure(exc)}"
    return page(request, "names", "Name claims", **values)


def _claim(request: Request) -> dict[str, str]:
    """The name and holding task id a release or cancel form posts; 400 for what cannot be either."""
    name = request.POST.get("name")
    if not isinstance(name, str) or not name or len(name) > 200:
        raise HTTPBadRequest("name: not a task name")
    return {"name": name, "task_id": task_id_param(request.POST.get("task_id"), "task_id")}


def release_view(request: Request) -> t.Any:
    """POST name and task_id: confirmation first, then ``release_name``."""
    claim = _claim(request)
    if unconfirmed(request):
        return ask(request, "names", "Release this name?", action="release", claim=claim,
                   back=request.route_path(route("names")), target=request.route_path(route("names_release")))
    release_name(app_of(request), claim["name"], claim["task_id"])
    return HTTPSeeOther(request.route_path(route("names"), _query={"released": "1"}))


def cancel_view(request: Request) -> t.Any:
    """POST name and task_id: confirmation first, then the holder is cancelled and the name freed.

    The task id shown is the one cancelled, not whoever holds the name by
    the time the operator confirms: a claim that changed hands meanwhile is
    not cancelled by mistake.
    """
    claim = _claim(request)
    if unconfirmed(request):
        return ask(request, "names", "Cancel this task?", action="cancel", claim=claim,
                   back=request.route_path(route("names")), target=request.route_path(route("names_cancel")))
    cancel(claim["task_id"], request.registry)
    release_name(app_of(request), claim["name"], claim["task_id"])
    return HTTPSeeOther(request.route_path(route("names"), _query={"cancelled": "1"}))
