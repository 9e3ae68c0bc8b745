"""The Pyramid application the tests (and their ws-celery workers) load."""
from pyramid.config import Configurator
from pyramid.response import Response
from sqlalchemy import text
from transaction.interfaces import TransientError

from tests.apps import sample_tasks


def main(global_config, **settings):
    config = Configurator(settings=settings)
    config.include("pyramid_tm")
    config.include("pyramid_retry")
    config.include("websauna_tasks")
    config.scan("tests.apps.sample_tasks")
    # More task modules, scanned after the include (pyramid.includes run before it): a deploy in a test.
    for module in settings.get("tests.scan", "").split():
        config.scan(module)
    config.add_route("home", "/")
    config.add_route("write", "/write/{value}")
    config.add_route("write_fail", "/write-fail/{value}")
    config.add_view(write, route_name="write")
    config.add_view(write_fail, route_name="write_fail")
    config.add_view(lambda request: Response("home"), route_name="home")
    config.add_route("flaky", "/flaky/{value}")
    config.add_view(flaky, route_name="flaky")
    config.add_route("eager_transient", "/write-then-eager-transient/{value}")
    config.add_view(write_then_eager_transient, route_name="eager_transient")
    config.add_route("eager_boom", "/eager-boom")
    config.add_view(eager_boom, route_name="eager_boom")
    return config.make_wsgi_app()


def write(request):
    """Insert a row and schedule a task that records the same value."""
    value = request.matchdict["value"]
    request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES (:v)"), {"v": value})
    result = sample_tasks.record.apply_async(args=(value,), tm=request.tm)
    return Response(result.id)


def write_fail(request):
    value = request.matchdict["value"]
    request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES (:v)"), {"v": value})
    sample_tasks.record.apply_async(args=(value,), tm=request.tm)
    raise RuntimeError("view failed after scheduling")


def flaky(request):
    """Schedules, then fails with a transient error on the first attempt only."""
    value = request.matchdict["value"]
    result = sample_tasks.add.apply_async(args=(value, request.environ["retry.attempt"]), tm=request.tm)
    if request.environ["retry.attempt"] == 0:
        raise TransientError("first attempt conflicts")
    return Response(result.id)


def eager_boom(request):
    sample_tasks.boom.apply_async(tm=request.tm)
    return Response("scheduled")


# --- Worker-side tests: added through the ``pyramid.includes`` setting, main() stays as it is.

def warm_pool_at_startup(config):
    """Open a database connection in the process that builds the app, before any fork.

    The connection goes back to the pool idle, so prefork children inherit it:
    exactly the situation the loader's after-fork dispose must defuse. Its
    backend pid is recorded so tests can check no child ever uses it.
    """
    from pyramid.events import ApplicationCreated

    config.add_subscriber(_record_startup_connection, ApplicationCreated)


def _record_startup_connection(event):
    import os

    from websauna_tasks.db import get_engine

    with get_engine(event.app.registry).begin() as conn:
        backend_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.execute(text("INSERT INTO ws_test_effects (task_id, value) VALUES ('startup', :value)"),
                     {"value": f"{os.getpid()}:{backend_pid}"})


def inspect_views(config):
    """A view scheduling ``tests.inspect_request`` on the web request's transaction."""
    config.add_route("inspect_eager", "/inspect-eager/{label}")
    config.add_view(inspect_eager, route_name="inspect_eager")


def inspect_eager(request):
    result = sample_tasks.inspect_request.apply_async(args=(request.matchdict["label"],), tm=request.tm)
    return Response(result.id)


def write_then_eager_transient(request):
    value = request.matchdict["value"]
    request.dbsession.execute(text("INSERT INTO ws_test_rows (value) VALUES (:v)"), {"v": value})
    sample_tasks.conflict.apply_async(tm=request.tm)
    return Response("written")
