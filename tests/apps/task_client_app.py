"""The application, tasks and deferred functions of tests/test_task_client.py.

Every task writes its effect through the run's ``request.dbsession`` into
``ws_test_effects`` (PostgreSQL), so a test sees a run by its committed row.
"""
from __future__ import annotations

import json
import typing as t

from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from sqlalchemy import text

from websauna_tasks import TransactionalTask, defer, get_current_request, task

#: Runs of ``flaky`` per key, in this process (the retry tests count on it).
flaky_runs: dict[str, int] = {}


def main(global_config: t.Any, **settings: str) -> t.Any:
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("tests.apps.task_client_app")
    config.add_route("home", "/")
    config.add_view(lambda request: Response("home"), route_name="home")
    config.add_route("order", "/order/{value}")
    config.add_view(order, route_name="order")
    config.add_route("deferring", "/defer/{value}")
    config.add_view(deferring, route_name="deferring")
    return config.make_wsgi_app()


def write_effect(key: str, value: t.Any) -> None:
    """Insert a row in the current run's transaction (so it exists only if the run commits)."""
    get_current_request().dbsession.execute(
        text("INSERT INTO ws_test_effects (task_id, value) VALUES (:key, :value)"),
        {"key": key, "value": json.dumps(value)})


# -- views ----------------------------------------------------------------------------------

def order(request: Request) -> Response:
    """Write a row and schedule ``write_row`` on the request's transaction; ``/order/fail`` then raises."""
    value = request.matchdict["value"]
    request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES (:v)"), {"v": value})
    result = write_row.apply_async(args=(value,), tm=request.tm)
    if value == "fail":
        raise RuntimeError("the view failed after scheduling")
    return Response(result.id)


def deferring(request: Request) -> Response:
    """``defer()`` inside a view: sent when pyramid_tm commits; ``/defer/broken`` defers a failing one."""
    value = request.matchdict["value"]
    fn = explode if value == "broken" else record
    return Response(defer(fn, value, _queue="emails"))


# -- tasks ----------------------------------------------------------------------------------

@task(base=TransactionalTask, bind=True)
def write_row(self: t.Any, value: str) -> str:
    """Report what the run saw of its request, in its own transaction."""
    request = self.get_request()
    write_effect(value, {
        "task_id": self.request.id,
        "tm_explicit": request.tm.explicit,
        "is_current_request": get_current_request() is request,
        "home": request.route_url("home"),
        "headers": dict(self.request.headers or {}),
    })
    return value.upper()


@task(base=TransactionalTask, bind=True, queue="mail")
def send_mail(self: t.Any, to: str) -> str:
    """A task whose own option routes it to the ``mail`` queue."""
    write_effect(f"mail:{to}", {"to": to})
    return to


@task(base=TransactionalTask, bind=True)
def routed(self: t.Any, value: str) -> str:
    """Routed by the app's ``task_routes`` (the tests' settings send it to ``reports``)."""
    write_effect(f"routed:{value}", value)
    return value


@task(base=TransactionalTask, bind=True)
def chain_step(self: t.Any, remaining: int) -> int:
    """Write a row, then schedule the next step and a deferred call on this run's transaction."""
    request = self.get_request()
    write_effect(f"step:{remaining}", {"task_id": self.request.id})
    if remaining > 0:
        chain_step.apply_async(args=(remaining - 1,), tm=request.tm)
        defer(record, f"deferred-by-step-{remaining}")
    return remaining


@task(base=TransactionalTask, bind=True)
def schedule_then_fail(self: t.Any, value: str) -> None:
    """Schedule a follow-up on this run's transaction, then fail: the follow-up must never exist."""
    write_row.apply_async(args=(f"never-{value}",), tm=self.get_request().tm)
    raise ValueError(f"{value}: failing after scheduling")


@task(base=TransactionalTask, bind=True)
def forever(self: t.Any, generation: int) -> int:
    """Schedules itself after every run: only the drain's bound stops it."""
    forever.apply_async(args=(generation + 1,), tm=self.get_request().tm)
    return generation


@task(base=TransactionalTask, bind=True)
def fail_always(self: t.Any, value: str) -> None:
    """Write, then raise: the write is rolled back with the run's transaction."""
    write_effect(f"failed:{value}", value)
    raise ValueError(f"{value}: always fails")


@task(base=TransactionalTask, bind=True)
def flaky(self: t.Any, key: str, failures: int) -> int:
    """Fail the first ``failures`` runs for ``key``, then write a row and succeed."""
    runs = flaky_runs[key] = flaky_runs.get(key, 0) + 1
    if runs <= failures:
        raise ConnectionError(f"{key}: run {runs} fails")
    write_effect(f"flaky:{key}", {"runs": runs})
    return runs


@task(base=TransactionalTask, bind=True)
def add(self: t.Any, a: int, b: int) -> int:
    """For chains: the result of one step is the first argument of the next."""
    total = a + b
    write_effect(f"add:{a}+{b}", total)
    return total


@task(base=TransactionalTask, bind=True)
def shape(self: t.Any, value: t.Any, when: t.Any = None) -> list[str]:
    """The types the run received (a worker gets what the serializer gives back)."""
    return [type(value).__name__, type(when).__name__]


# -- deferred functions ---------------------------------------------------------------------

def record(value: str) -> str:
    """Write through the run's request; defer()'s transaction commits it."""
    write_effect(f"record:{value}", {"tm_explicit": get_current_request().tm.explicit})
    return value


def explode(value: str) -> None:
    raise LookupError(f"{value}: deferred function failed")


def do_something() -> None:
    """The Blue Alliance's example function; module level so that a worker could find it."""
    write_effect("do_something", "done")
