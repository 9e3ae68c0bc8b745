"""An app whose task requests carry the app's own extensions (tests/test_task_request.py).

It adds a request method, a reified property, a plain property and a root
factory, optionally a request factory of its own, and one task that commits
a JSON report of what its request offered.
"""
from __future__ import annotations

import itertools
import json
import os

from pyramid.config import Configurator
from pyramid.request import Request
from pyramid.response import Response
from pyramid.threadlocal import get_current_request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from websauna_tasks import TransactionalTask, task

# Each evaluation of the properties takes the next number: a value shared
# between two requests shows that it was computed once, not per request.
_reified_numbers = itertools.count(1)
_property_numbers = itertools.count(1)


class Root:
    def __init__(self, request: Request):
        self.request = request


class OwnRequest(Request):
    """A request factory that only adds an attribute."""

    flavour = "own class"


class OwnBlankRequest(Request):
    """A request factory with its own ``blank``, which must still be called for each run."""

    flavour = "own blank"

    @classmethod
    def blank(cls, path, *args, **kwargs):
        request = super().blank(path, *args, **kwargs)
        request.environ["task_request_app.made_by"] = "OwnBlankRequest.blank"
        return request


FACTORIES = {"own_class": OwnRequest, "own_blank": OwnBlankRequest}


def greeting(request: Request, name: str) -> str:
    return f"hello {name} from {request.registry.settings['task_request_app.name']}"


def includeme(config: Configurator) -> None:
    """The app's own request extensions, as an add-on would add them."""
    config.add_request_method(greeting, "greeting")
    config.add_request_method(lambda request: next(_reified_numbers), "reified_number", reify=True)
    config.add_request_method(lambda request: next(_property_numbers), "property_number", property=True)
    config.set_root_factory(Root)


def main(global_config: dict, **settings: str):
    settings.setdefault("task_request_app.name", "the test app")
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("websauna_tasks")
    config.include(includeme)
    factory = settings.get("task_request_app.request_factory")
    if factory:
        config.set_request_factory(FACTORIES[factory])
    config.scan("tests.apps.task_request_app")
    config.add_route("home", "/")
    config.add_view(lambda request: Response("home"), route_name="home")
    return config.make_wsgi_app()


RAISE_SERIALIZATION_FAILURE = text(
    "DO $$ BEGIN RAISE EXCEPTION 'made up conflict' USING ERRCODE = '40001'; END $$")


@task(name="tests.task_request.report", base=TransactionalTask, bind=True)
def report(self, label: str) -> dict:
    """Commit rows around a rolled back savepoint and a report of the request."""
    request = self.get_request()
    session = request.dbsession

    def insert(value: str) -> None:
        session.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES (:id, :value)"),
                        {"id": self.request.id, "value": value})

    insert("before savepoint")
    savepoint = request.tm.savepoint()
    insert("rolled back")
    savepoint.rollback()
    # A serialization failure is retryable only when zope.sqlalchemy's data
    # manager joined the session to request.tm (it answers should_retry).
    savepoint = request.tm.savepoint()
    try:
        session.execute(RAISE_SERIALIZATION_FAILURE)
    except DBAPIError as exc:
        retryable = request.tm.get().isRetryableError(exc)
    else:  # pragma: no cover - the statement always raises
        retryable = None
    savepoint.rollback()
    insert("after savepoint")
    seen = {
        "label": label,
        "pid": os.getpid(),
        "greeting": request.greeting(label),
        "reified": [request.reified_number, request.reified_number],
        "property": [request.property_number, request.property_number],
        "context_is_root": isinstance(request.context, Root) and request.context.request is request,
        "current_request": get_current_request() is request,
        "instance_of": [name for name, cls in FACTORIES.items() if isinstance(request, cls)],
        "flavour": getattr(request, "flavour", None),
        "made_by": request.environ.get("task_request_app.made_by"),
        "home": request.route_url("home"),
        "retryable": retryable,
        "tm_explicit": request.tm.explicit,
    }
    insert(json.dumps(seen))
    return seen
