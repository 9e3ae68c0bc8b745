"""Dead letters: the list, newest first, and requeue and drop, one at a time or in bulk.

Built on the public functions ``ws-celery INI -- dead-letters`` uses
(``list_dead_letters``, ``requeue_dead_letter``, ``drop_dead_letter``) and on
``page_dead_letters``: numbered pages on the Redis list, "older"/"newer"
links carrying a row's seq on the table (deadletters/_pages.py says why
each), so that any page costs about what the first does at 100,000 letters.

A drop, and any action on more than one letter, is shown back with the
letters it would touch and done only when that confirmation is posted.
"""
from __future__ import annotations

import typing as t

from pyramid.httpexceptions import HTTPBadRequest, HTTPSeeOther

from ..deadletter import (
    UNREADABLE_ENTRY,
    NoDeadLetterStore,
    drop_dead_letter,
    get_dead_letters,
    requeue_dead_letter,
)
from ..deadletters import BadCursor, page_dead_letters, seen
from ._common import (
    MAX_BULK,
    RENDERER,
    app_of,
    ask,
    failure,
    page,
    preview,
    route,
    task_id_param,
    unconfirmed,
    whole_number,
)

if t.TYPE_CHECKING:
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

ACTIONS = ("requeue", "drop")


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("dead_letters"), f"{console.prefix}/dead-letters")
    config.add_route(route("dead_letters_act"), f"{console.prefix}/dead-letters/act")
    config.add_view(list_view, route_name=route("dead_letters"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"dead_letters{RENDERER}")
    config.add_view(act_view, route_name=route("dead_letters_act"), request_method="POST", require_csrf=True,
                    permission=console.permission, renderer=f"confirm{RENDERER}")


def row(entry: dict[str, t.Any]) -> dict[str, t.Any]:
    """What a table row shows of a dead letter."""
    unreadable = entry.get("kind") == UNREADABLE_ENTRY
    first, last, times = seen(entry)
    message = entry.get("message")
    headers = message.get("headers") if isinstance(message, dict) else None
    args = (headers or {}).get("argsrepr") if isinstance(headers, dict) else None
    if args is None:
        args = entry.get("raw") if unreadable else entry.get("message_head")
    return {
        "id": str(entry.get("id") or ""),
        "kind": str(entry.get("kind") or ""),
        "task": str(entry.get("task") or ""),
        "queue": str(entry.get("queue") or ""),
        "reason": preview(entry.get("reason"), 300),
        "args": preview(args, 160),
        # Last seen is this entry's time; first seen and the count come back with a requeued message.
        "first_seen": first, "last_seen": last, "times": times,
        "requeueable": not unreadable and isinstance(message, dict) and bool(entry.get("queue")),
    }


def list_view(request: Request) -> dict[str, t.Any]:
    app = app_of(request)
    values: dict[str, t.Any] = {"rows": [], "letters": None, "error": "", "where": "", "done": _done(request)}
    cursors = {name: whole_number(request, name) for name in ("page", "before", "after")}
    try:
        values["where"] = get_dead_letters(app).where
        letters = page_dead_letters(app, page=cursors["page"] or 1, before=cursors["before"],
                                    after=cursors["after"])
    except NoDeadLetterStore as exc:
        values["error"] = str(exc)
    except BadCursor as exc:  # out of range, or before and after at once
        raise HTTPBadRequest(str(exc)) from None
    except Exception as exc:
        values["error"] = f"the dead letters could not be read: {failure(exc)}"
    else:
        values["letters"] = letters
        values["rows"] = [row(entry) for entry in letters.entries]
    return page(request, "dead_letters", "Dead letters", **values)


def _done(request: Request) -> dict[str, int]:
    """The counts an action redirects with: numbers only, so a forged link cannot put words on the page."""
    done = {}
    for key in ("requeued", "dropped", "missing", "refused"):
        raw = request.params.get(key, "")
        if raw.isascii() and raw.isdigit() and len(raw) < 7:
            done[key] = int(raw)
    return done


def _ids(request: Request) -> list[str]:
    # A row's own button (id) wins over checkboxes ticked elsewhere in the same form (ids).
    raw = request.POST.getall("id") or request.POST.getall("ids")
    if not raw:
        raise HTTPBadRequest("no dead letter chosen")
    if len(raw) > MAX_BULK:
        raise HTTPBadRequest(f"at most {MAX_BULK} dead letters at once")
    return list(dict.fromkeys(task_id_param(value) for value in raw))


def act_view(request: Request) -> t.Any:
    """POST action=requeue|drop with ids (or id): confirmation first for a drop or for several letters."""
    # A row's button says its action in the form's URL, the bulk buttons in the form.
    action = request.POST.get("action") or request.GET.get("action")
    if action not in ACTIONS:
        raise HTTPBadRequest("action must be requeue or drop")
    ids = _ids(request)
    app = app_of(request)
    if (action == "drop" or len(ids) > 1) and unconfirmed(request):
        found = []
        for task_id in ids:
            entries = get_dead_letters(app).find(task_id)
            found.append(row(entries[0]) if entries else {"id": task_id, "missing": True})
        return ask(request, "dead_letters", f"{action.capitalize()} {len(ids)} dead letter(s)?", action=action,
                   rows=found, back=request.route_path(route("dead_letters")),
                   target=request.route_path(route("dead_letters_act")))
    counts = {"requeued": 0, "dropped": 0, "missing": 0, "refused": 0}
    for task_id in ids:
        if action == "drop":
            counts["dropped" if drop_dead_letter(app, task_id) else "missing"] += 1
            continue
        try:
            if requeue_dead_letter(app, task_id):
                counts["requeued"] += 1
            else:
                # Still there: an unreadable entry or one that keeps no whole message, which only a drop removes.
                counts["refused" if get_dead_letters(app).find(task_id) else "missing"] += 1
        except ValueError:  # no queue recorded, or an undeclared queue (UndeclaredQueue is a ValueError)
            counts["refused"] += 1
    query = {key: value for key, value in counts.items() if value}
    return HTTPSeeOther(request.route_path(route("dead_letters"), _query=query))
