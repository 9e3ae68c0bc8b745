"""Websauna-style task code for tests/test_websauna_compat.py.

Its own app (``main``), which ws-celery workers load from an INI too.
The tasks are written as Websauna's docs and demo tasks wrote them:
``self.request.request``, ``request.transaction_manager``,
``@retryable(tm=request.tm)`` steps inside a plain ``WebsaunaTask``.
"""
from __future__ import annotations

import os

import transaction
from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import text

from websauna_tasks import (
    ScheduleOnCommitTask,
    TransactionalTask,
    WebsaunaTask,
    retryable,
    task,
)
from websauna_tasks.db import get_engine


def main(global_config: dict, **settings: str):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.scan("tests.apps.websauna_compat_app")
    config.add_route("home", "/")
    config.add_view(lambda request: Response("home"), route_name="home")
    config.add_route("compat_tm_alias", "/compat/tm-alias")
    config.add_view(tm_alias_view, route_name="compat_tm_alias")
    config.add_route("compat_retryable_in_view", "/compat/retryable-in-view")
    config.add_view(retryable_in_view, route_name="compat_retryable_in_view")
    return config.make_wsgi_app()


def tm_alias_view(request):
    same = request.transaction_manager is request.tm
    replacement = transaction.TransactionManager(explicit=True)
    original = request.tm
    request.transaction_manager = replacement
    follows = request.tm is replacement
    request.transaction_manager = original
    return Response(f"same={same} follows={follows}")


def retryable_in_view(request):
    """``retryable`` on the request's own manager while pyramid_tm's transaction is open: refused clearly."""
    @retryable(tm=request.tm)
    def step():
        return "ran"

    try:
        return Response(step())
    except transaction.interfaces.AlreadyInTransaction as exc:
        return Response(f"refused: {exc}")


def request_report(task_self) -> dict:
    """What Websauna code reaches through ``self.request.request``."""
    request = task_self.request.request
    return {
        "same_as_get_request": request is task_self.get_request(),
        "alias_is_tm": request.transaction_manager is request.tm,
        "tm_explicit": request.tm.explicit,
        "route_url": request.route_url("home"),
        "pid": os.getpid(),
        # Custom message headers Celery would send again on a retry: never the request.
        "custom_headers": sorted(task_self.request.headers or {}),
    }


@task(name="compat.request_of_context", base=WebsaunaTask, bind=True)
def request_of_context(self):
    return request_report(self)


@task(name="compat.retry_once", base=WebsaunaTask, bind=True, max_retries=1)
def retry_once(self):
    """Reaches ``self.request.request``, then asks Celery for a retry: the republished message must not carry it."""
    report = request_report(self)
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return dict(report, retries=self.request.retries)


@task(name="compat.transactional_request", base=TransactionalTask, bind=True)
def transactional_request(self):
    # Websauna's demo tasks: dbsession = self.request.request.dbsession
    dbsession = self.request.request.dbsession
    dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, 'via self.request.request')"),
                      {"id": self.request.id})
    return request_report(self)


@task(name="compat.dbsession_outside_tm", base=ScheduleOnCommitTask, bind=True)
def dbsession_outside_tm(self, value):
    """Touches request.dbsession outside any transaction, then does it right."""
    request = self.get_request()
    error = None
    try:
        request.dbsession.execute(text("SELECT 1"))
    except transaction.interfaces.NoTransaction as exc:
        error = f"{type(exc).__name__}: {exc}"
    with request.tm:
        request.dbsession.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                                  {"id": self.request.id, "value": value})
    return error


def read_then_write(dbsession, engine, counter_id: int, interfere: bool) -> int:
    """Read a counter and write it back plus one; ``interfere``: another transaction commits in between."""
    value = dbsession.execute(text("SELECT value FROM ws_test_counter WHERE id = :id"),
                              {"id": counter_id}).scalar_one()
    if interfere:
        # The snapshot of this SERIALIZABLE transaction predates this commit: the
        # UPDATE below fails with a serialization failure (SQLSTATE 40001).
        with engine.begin() as other:
            other.execute(text("UPDATE ws_test_counter SET value = value + 100 WHERE id = :id"), {"id": counter_id})
    dbsession.execute(text("UPDATE ws_test_counter SET value = :v WHERE id = :id"),
                      {"v": value + 1, "id": counter_id})
    return value + 1


def build_counters(request, interfere_with: int) -> dict:
    """The shape of the seed's ``_build_seo_data``: one retried transaction per step."""
    dbsession = request.dbsession  # taken outside any transaction, used inside each
    engine = get_engine(request.registry)
    attempts: dict[int, int] = {}

    @retryable(tm=request.tm)
    def _get_ids():
        return list(dbsession.execute(text("SELECT id FROM ws_test_counter ORDER BY id")).scalars())

    @retryable(tm=request.tm)
    def _run_for_id(counter_id):
        attempts[counter_id] = attempts.get(counter_id, 0) + 1
        interfere = counter_id == interfere_with and attempts[counter_id] == 1
        return read_then_write(dbsession, engine, counter_id, interfere)

    # Transaction 1
    ids = _get_ids()
    # Transactions 2...N
    values = {counter_id: _run_for_id(counter_id) for counter_id in ids}
    return {"values": values, "attempts": attempts}


@task(name="compat.build_counters", bind=True, time_limit=60 * 30, soft_time_limit=60 * 15, base=WebsaunaTask)
def build_counters_task(self: WebsaunaTask, interfere_with: int):
    result = build_counters(self.get_request(), interfere_with)
    # JSON keys are strings: send them as such so the test compares like with like.
    return {kind: {str(key): value for key, value in values.items()} for kind, values in result.items()}


@task(name="compat.retryable_in_transactional", base=TransactionalTask, bind=True)
def retryable_in_transactional(self):
    request = self.get_request()

    @retryable(tm=request.tm)
    def step():
        return "ran"

    return step()
