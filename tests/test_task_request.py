"""Task requests keep Pyramid's and zope.sqlalchemy's behaviour on the cheap path.

``websauna_tasks/request.py`` builds each task request from what all runs of
a registry share (the blank environ, a request class carrying the app's
extensions) and ``websauna_tasks/db.py`` registers zope.sqlalchemy's event
listeners once per sessionmaker. These tests pin what those shortcuts must
keep: the app's own request methods and properties (reified values per
request), the root factory's context, request factories of the app's own,
savepoints and retryable errors through ``request.tm``, and a configuration
changed after the first run.
"""
from __future__ import annotations

import json

import pytest
from pyramid.config import Configurator
from sqlalchemy import text

from tests.apps import task_request_app
from tests.test_worker_request import worker_settings
from websauna_tasks.request import task_request

SITE_URL = "https://tasks.example.com/base"


def app_settings(database_url: str, **extra: str) -> dict[str, str]:
    settings = {"websauna.celery_config": repr({"broker_url": "memory://"}), "sqlalchemy.url": database_url,
                "websauna.site_url": SITE_URL}
    settings.update(extra)
    return settings


def committed_values(db, task_id: str) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(text("SELECT value FROM ws_test_effects WHERE task_id = :id ORDER BY id"),
                                 {"id": task_id}).scalars())


def check_run(db, task_id: str, seen: dict, label: str) -> None:
    assert seen["label"] == label
    assert seen["greeting"] == f"hello {label} from the test app"
    first, again = seen["reified"]
    assert first == again, "a reified request property was computed twice in one request"
    first, again = seen["property"]
    assert again == first + 1, "a plain request property was not computed on each access"
    assert seen["context_is_root"], "request.context is not the root factory's root for this request"
    assert seen["current_request"]
    assert seen["home"] == SITE_URL + "/"
    assert seen["retryable"] is True, "zope.sqlalchemy did not join the session to request.tm"
    assert seen["tm_explicit"]
    # Raw SQL was committed (initial state "changed"); the savepoint's work was not.
    assert committed_values(db, task_id) == ["before savepoint", "after savepoint", json.dumps(seen)]


def test_app_extensions_and_transaction_behaviour_in_process(database_url, db):
    task_request_app.main({}, **app_settings(database_url))
    results = [task_request_app.report.apply(args=(label,), throw=True) for label in ("one", "two")]
    for result, label in zip(results, ("one", "two")):
        seen = result.get()
        check_run(db, result.id, seen, label)
        assert seen["instance_of"] == [] and seen["flavour"] is None
    first, second = (result.get() for result in results)
    assert first["reified"][0] != second["reified"][0], "a reified value was shared between two requests"


@pytest.mark.parametrize("factory, made_by", [("own_class", None), ("own_blank", "OwnBlankRequest.blank")])
def test_request_factory_of_the_app(database_url, db, factory, made_by):
    task_request_app.main({}, **app_settings(database_url, **{"task_request_app.request_factory": factory}))
    for label in ("one", "two"):
        result = task_request_app.report.apply(args=(label,), throw=True)
        seen = result.get()
        check_run(db, result.id, seen, label)
        assert seen["instance_of"] == [factory]
        assert seen["flavour"] == task_request_app.FACTORIES[factory].flavour
        assert seen["made_by"] == made_by


def test_configuration_changed_after_the_first_run_is_seen(database_url, db):
    router = task_request_app.main({}, **app_settings(database_url))
    registry = router.registry
    with task_request(registry) as request:
        assert request.route_url("home") == SITE_URL + "/"
        assert not hasattr(request, "late")

    config = Configurator(registry=registry)
    config.add_request_method(lambda request: "added late", "late", reify=True)
    config.commit()
    registry.settings["websauna.site_url"] = "https://elsewhere.example.com"
    with task_request(registry) as request:
        assert request.late == "added late"
        assert request.route_url("home") == "https://elsewhere.example.com/"
        assert request.greeting("again") == "hello again from the test app"


@pytest.mark.slow
def test_worker_runs_keep_app_extensions_and_transaction_behaviour(redis_url, database_url, queue_name, db,
                                                                    tmp_path, ws_celery_worker_factory,
                                                                    subprocess_env):
    settings = worker_settings(redis_url, database_url, queue_name, **{"websauna.site_url": SITE_URL})
    lines = ["[app:main]", "use = call:tests.apps.task_request_app:main"]
    # ConfigParser interpolation: percent signs in values must be doubled.
    lines += [f"{key} = {value.replace('%', '%%')}" for key, value in settings.items()]
    ini = tmp_path / "task_request.ini"
    ini.write_text("\n".join(lines) + "\n")
    worker = ws_celery_worker_factory(str(ini), "worker", "-c", "2", "-l", "info", env=subprocess_env)
    task_request_app.main({}, **settings)  # the sending side
    labels = [f"run-{index}" for index in range(6)]
    results = [task_request_app.report.apply_async(args=(label,), tm=None) for label in labels]
    reified = set()
    for result, label in zip(results, labels):
        seen = result.get(timeout=30)
        check_run(db, result.id, seen, label)
        reified.add((seen["pid"], seen["reified"][0]))
    # Six runs on at most two children (each counting on its own): no child
    # handed a reified value from one request to the next.
    assert len(reified) == len(labels), f"reified values repeat: {sorted(reified)}\n{worker.output()[-2000:]}"
    assert worker.pid not in {pid for pid, _ in reified}


def test_the_session_is_closed_once_a_run_and_still_whenever_it_holds_something(database_url, db):
    """zope.sqlalchemy closes request.dbsession at its transaction's end; the request's end closes it only
    when that left something to close (a transaction, objects, a first close of a session that closes for good)."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from websauna_tasks.db import close_unless_closed

    registry = task_request_app.main({}, **app_settings(database_url)).registry
    closes = []
    with task_request(registry) as request:
        session = request.dbsession
        original = session.close
        session.close = lambda: (closes.append(1), original())[1]
        with request.tm:
            session.execute(text("SELECT 1"))
        assert closes == [1], "zope.sqlalchemy no longer closes the session at the transaction's end"
    assert closes == [1], "closed a second time at the request's end"

    engine = sa.create_engine("sqlite://")
    begun = Session(engine)
    begun.execute(text("SELECT 1"))
    close_unless_closed(begun)
    assert not begun.in_transaction()

    class Row:
        pass

    sa.orm.registry().map_imperatively(Row, sa.Table("rows", sa.MetaData(), sa.Column("id", sa.Integer,
                                                                                      primary_key=True)))
    holding = Session(engine)
    pending = Row()
    holding.add(pending)
    close_unless_closed(holding)
    assert pending not in holding

    for_good = Session(engine, close_resets_only=False)
    close_unless_closed(for_good)
    with pytest.raises(sa.exc.InvalidRequestError):
        for_good.execute(text("SELECT 1"))
