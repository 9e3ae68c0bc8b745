"""Tasks: recent runs (runs.py), search by id, and one task's page from the result backend.

A task's page asks the result backend what it knows (state, result or
exception, traceback, when it finished and, with ``result_extended``, its
name, worker and arguments), next to the runs the console recorded for that
id (each retry is a run). Without a result backend the runs are all there is.
"""
from __future__ import annotations

import typing as t

from pyramid.httpexceptions import HTTPSeeOther

from ..cancel import cancel, is_cancelled
from ..progress import task_progress
from ._common import RENDERER, app_of, ask, failure, page, preview, route, task_id_param, unconfirmed
from .runs import recent_runs

if t.TYPE_CHECKING:
    from pyramid.config import Configurator
    from pyramid.request import Request

    from ._common import ConsoleConfig

#: Runs on the Tasks page.
SHOWN_RUNS = 100


def add_views(config: Configurator, console: ConsoleConfig) -> None:
    config.add_route(route("tasks"), f"{console.prefix}/tasks")
    config.add_route(route("task"), f"{console.prefix}/tasks/{{task_id}}")
    config.add_view(list_view, route_name=route("tasks"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"tasks{RENDERER}")
    config.add_view(task_view, route_name=route("task"), request_method=("GET", "HEAD"),
                    permission=console.permission, renderer=f"task{RENDERER}")
    config.add_route(route("task_cancel"), f"{console.prefix}/tasks/{{task_id}}/cancel")
    config.add_view(cancel_view, route_name=route("task_cancel"), request_method="POST", require_csrf=True,
                    permission=console.permission, renderer=f"confirm{RENDERER}")


def has_result_backend(app: t.Any) -> bool:
    backend = app.conf.result_backend
    return bool(backend) and not str(backend).startswith("disabled")


def list_view(request: Request) -> t.Any:
    wanted = request.params.get("id", "").strip()
    if wanted:
        return HTTPSeeOther(request.route_path(route("task"), task_id=task_id_param(wanted)))
    runs = recent_runs(request, limit=SHOWN_RUNS)
    return page(request, "tasks", "Tasks", runs=runs, backend=has_result_backend(app_of(request)))


def task_view(request: Request) -> dict[str, t.Any]:
    task_id = task_id_param(request.matchdict["task_id"])
    app = app_of(request)
    result: dict[str, t.Any] | None = None
    error = ""
    if has_result_backend(app):
        try:
            meta = app.backend.get_task_meta(task_id)
            result = {"state": meta.get("status"), "date_done": meta.get("date_done"),
                      "traceback": meta.get("traceback") or "", "name": meta.get("name"),
                      "worker": meta.get("worker"), "queue": meta.get("queue"), "retries": meta.get("retries"),
                      "args": preview(meta.get("args"), 500), "kwargs": preview(meta.get("kwargs"), 500),
                      "result": preview(meta.get("result"), 1000)}
        except Exception as exc:
            error = f"the result backend could not be read: {failure(exc)}"
        try:
            figures = task_progress(task_id, app)
        except Exception:
            figures = None  # the state above already says what the backend holds
        if result is not None and figures is not None:
            result["progress"] = figures
    try:
        cancelled = is_cancelled(task_id, request.registry)
    except Exception:
        cancelled = None  # no store to keep cancellations: no button either
    runs = recent_runs(request, limit=50, task_id=task_id)
    return page(request, "tasks", f"Task {task_id}", task_id=task_id, result=result, error=error, runs=runs,
                backend=has_result_backend(app), cancelled=cancelled,
                cancelled_now=request.params.get("cancelled") == "1")


def cancel_view(request: Request) -> t.Any:
    """POST: confirmation first, then ``cancel(task_id)``; the task page says it is cancelled."""
    task_id = task_id_param(request.matchdict["task_id"])
    if unconfirmed(request):
        return ask(request, "tasks", "Cancel this task?", action="cancel", cancel_task={"task_id": task_id},
                   back=request.route_path(route("task"), task_id=task_id),
                   target=request.route_path(route("task_cancel"), task_id=task_id))
    cancel(task_id, request.registry)
    return HTTPSeeOther(request.route_path(route("task"), task_id=task_id, _query={"cancelled": "1"}))
